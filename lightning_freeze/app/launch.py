"""DDP inside a Hydra job (single run or multirun), done right.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running ``sys.argv``. Under ``-m`` every child
re-runs the whole sweep (in a second sweep dir), and with a non-deterministic sweeper ranks silently train
different configs; the launcher also leaves ``LOCAL_RANK``/``MASTER_PORT``/``WORLD_SIZE`` in the environment
and the process group alive, so the next job in the same process believes its ranks already exist.

:func:`run_job` fixes all three for one job:

1. when Lightning starts the other ranks, it saves the job's composed config (resolved, with the ``hydra``
   node) to ``<job dir>/.rank_config.yaml`` and makes Lightning start every other rank as
   ``python -m lightning_freeze.app.launch <job dir>/.rank_config.yaml`` (that exact config, never argv);
2. all ranks of job j write under job j's output dir; no second sweep exists;
3. afterwards it waits for the rank processes, destroys the process group and restores every DDP
   environment variable, so job j+1 starts clean.

A failing rank fails its job (the other ranks are stopped), not the whole sweep.

    @hydra.main(config_path=..., config_name="config", version_base="1.3")
    def main(cfg):
        return run_job(train, cfg)   # train(cfg) builds the Trainer and fits, on every rank
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

__all__ = ["DDP_ENV_VARS", "RANK_CONFIG", "load_rank_config", "run_job"]

log = logging.getLogger(__name__)
T = TypeVar("T")

RANK_CONFIG = ".rank_config.yaml"
# Everything a DDP job may leave behind in os.environ (Lightning's launcher, seed_everything, torchrun).
DDP_ENV_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "RANK",
    "LOCAL_WORLD_SIZE",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
# Lightning modules whose launcher we steer for the duration of a job (both copies of the code).
_LAUNCHER_MODULES = (
    "lightning.pytorch.strategies.launchers.subprocess_script",
    "lightning.fabric.strategies.launchers.subprocess_script",
    "pytorch_lightning.strategies.launchers.subprocess_script",
    "lightning_fabric.strategies.launchers.subprocess_script",
)
_CHILD_WAIT_S = 120.0


def _task_ref(task: Callable[..., Any]) -> dict[str, str]:
    """How a rank process finds ``task``: an importable module, or the file of a ``python script.py`` app."""
    module = task.__module__
    ref = {"module": module, "qualname": task.__qualname__}
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if getattr(main, task.__qualname__.split(".")[0], None) is not task:
            # e.g. a function pickled by value into a joblib worker: find it by its source file
            ref["file"] = os.path.abspath(task.__code__.co_filename)
        elif spec is not None and spec.name:
            ref["module"] = spec.name  # python -m package.module
        else:
            ref["file"] = os.path.abspath(main.__file__)  # python script.py
    if "<locals>" in task.__qualname__:
        raise ValueError(f"run_job needs a module-level task function, got {task.__qualname__}")
    return ref


def _load_task(ref: dict[str, str]) -> Callable[..., Any]:
    if ref.get("file"):
        spec = importlib.util.spec_from_file_location("_lightning_freeze_job", ref["file"])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(ref["module"])
    obj: Any = module
    for part in ref["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def _resolved(node: Any) -> Any:
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation only the task can resolve: ship it unresolved
        return OmegaConf.to_container(node, resolve=False)


def write_rank_config(task: Callable[..., Any], cfg: DictConfig, job_dir: Path) -> Path:
    """Save what a rank needs to run exactly this job: task reference, cwd, composed config, hydra node."""
    from hydra.core.hydra_config import HydraConfig

    payload = {
        "task": _task_ref(task),
        "cwd": os.getcwd(),
        "config": _resolved(cfg),
        "hydra": _resolved(HydraConfig.get()),
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / RANK_CONFIG
    tmp = path.with_name(f"{RANK_CONFIG}.{os.getpid()}.tmp")
    OmegaConf.save(OmegaConf.create(payload), tmp)
    os.replace(tmp, path)
    return path


def load_rank_config(path: str | os.PathLike[str]) -> tuple[Callable[..., Any], DictConfig]:
    """Load a saved job: set Hydra's runtime config as the job had it; return ``(task, cfg)``."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig

    saved = OmegaConf.load(path)
    hydra_node = OmegaConf.structured(HydraConf)
    OmegaConf.set_struct(hydra_node, False)  # composed hydra nodes carry keys HydraConf lacks (e.g. `env`)
    hydra_node = OmegaConf.merge(hydra_node, saved.hydra)
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_node}))
    cfg = saved.config
    assert isinstance(cfg, DictConfig)
    os.chdir(saved.cwd)
    return _load_task(OmegaConf.to_container(saved.task)), cfg  # type: ignore[arg-type]


class _RankWatcher(threading.Thread):
    """Watches the rank processes of one job. If one fails, the others are stopped; rank 0 (this process)
    then fails the job by itself (gloo raises when a peer disappears). A rank 0 still blocked after
    ``grace_s`` (e.g. waiting for a peer that died before the process group formed: that wait cannot be
    interrupted) is killed, as Lightning's own launcher does."""

    def __init__(self, procs: list[subprocess.Popen], grace_s: float = 60.0) -> None:
        super().__init__(daemon=True, name="lightning-freeze-rank-watcher")
        self.procs = procs
        self.grace_s = grace_s
        self.failed: list[tuple[int, int]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(1.0):
            codes = [p.poll() for p in self.procs]
            bad = [(p.pid, c) for p, c in zip(self.procs, codes, strict=True) if c not in (None, 0)]
            if bad:
                self.failed = bad
                log.error("DDP rank process(es) %s failed; stopping the other ranks of this job", bad)
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                if not self._stop.wait(self.grace_s):
                    log.error("rank 0 is still blocked %.0f s after a rank failed: killing it", self.grace_s)
                    logging.shutdown()
                    os.kill(os.getpid(), signal.SIGKILL)
                return
            if all(c == 0 for c in codes):
                return

    def stop(self) -> None:
        self._stop.set()


class _JobLaunch:
    """The per-job replacements for Lightning's ``_hydra_subprocess_cmd`` and ``_launch_process_observer``."""

    def __init__(self, task: Callable[..., Any], cfg: DictConfig, job_dir: Path) -> None:
        self.task, self.cfg, self.job_dir = task, cfg, job_dir
        self.config_path: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self.watchers: list[_RankWatcher] = []

    def command(self, local_rank: int | None = None, **_: Any) -> tuple[list[str], str]:
        if self.config_path is None:  # written once, when the first rank is started
            self.config_path = write_rank_config(self.task, self.cfg, self.job_dir)
        return [sys.executable, "-m", "lightning_freeze.app.launch", str(self.config_path)], os.getcwd()

    def observe(self, child_processes: list[subprocess.Popen], *args: Any, **kwargs: Any) -> None:
        self.procs.extend(child_processes)
        watcher = _RankWatcher(list(child_processes))
        watcher.start()
        self.watchers.append(watcher)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved: list[tuple[Any, str, Any]] = []
        for name in _LAUNCHER_MODULES:
            if name.startswith("lightning.") and name not in sys.modules:
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
            module = sys.modules.get(name)
            if module is None:
                continue
            for attr, replacement in (
                ("_hydra_subprocess_cmd", self.command),
                ("_launch_process_observer", self.observe),
            ):
                if not hasattr(module, attr):
                    raise RuntimeError(
                        f"lightning_freeze.app.launch cannot steer {name}.{attr} (Lightning changed its launcher); "
                        "pin lightning to the tested version in constraints.txt"
                    )
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, replacement)
        try:
            yield
        finally:
            for module, attr, original in reversed(saved):
                setattr(module, attr, original)

    def finish(self, failed_job: bool) -> list[tuple[int, int]]:
        """Wait for the rank processes (kill them after a grace period); return (pid, code) of failures."""
        deadline = time.monotonic() + (5.0 if failed_job else _CHILD_WAIT_S)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for w in self.watchers:
            w.stop()
        return [(p.pid, p.returncode) for p in self.procs if p.returncode not in (0, None)]


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _reset_rank_zero() -> None:
    for name in ("lightning.fabric.utilities.rank_zero", "lightning_utilities.core.rank_zero"):
        module = sys.modules.get(name)
        fn = getattr(module, "rank_zero_only", None) if module else None
        if fn is not None and hasattr(fn, "rank"):
            fn.rank = 0


def run_job(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``task(cfg)`` as one Hydra job whose DDP ranks (if any) all run exactly this job's config.

    Outside Hydra, or in a process started by an external launcher (torchrun, SLURM: ``LOCAL_RANK`` is
    already set), this is just ``task(cfg)``.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or "LOCAL_RANK" in os.environ:
        return task(cfg)
    _task_ref(task)  # fail early on a task a rank process could not import
    launch = _JobLaunch(task, cfg, Path(HydraConfig.get().runtime.output_dir))
    env_before = {k: os.environ.get(k) for k in DDP_ENV_VARS}
    ok = False
    try:
        with launch.installed():
            result = task(cfg)
        ok = True
        return result
    finally:
        failures = launch.finish(failed_job=not ok)
        _destroy_process_group()
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_rank_zero()
        if failures and ok:
            raise RuntimeError(f"DDP rank process(es) of this job failed: (pid, exit code) {failures}")


def _child_main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m lightning_freeze.app.launch <job dir>/.rank_config.yaml")
    task, cfg = load_rank_config(argv[0])
    task(cfg)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
