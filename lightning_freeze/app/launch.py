"""DDP inside a Hydra job (single run or multirun), started the way torchrun starts it.

Lightning's own subprocess launcher starts ranks 1..N-1 by re-running ``sys.argv``. Under ``-m`` every child
re-runs the whole sweep (in a second sweep dir), and with a non-deterministic sweeper (random, Optuna) the
ranks silently train different configs. :func:`run_job` therefore launches the ranks itself, on the external
launcher path that torchrun uses:

1. it asks Lightning how many processes this job's trainer would start on this node (a Trainer built from
   the job's ``trainer`` node, with no callbacks and no logger). Nothing to start (one process, spawn,
   torchrun, SLURM): the task simply runs;
2. otherwise it sets ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``NODE_RANK``/``LOCAL_RANK`` and starts
   ``python -m lightning_freeze.app.launch`` for every other local rank, writing the job's composed config
   (resolved, with the ``hydra`` node) to its stdin: nothing is left in the run dir, however the job ends.
   With ``LOCAL_RANK`` set, Lightning joins these processes and starts none of its own. Each rank is tied to
   its launcher (:func:`exit_with_launcher`): when the launcher dies, even by SIGKILL, the rank exits at once
   instead of training on until gloo notices the missing peer;
3. every rank runs the task on exactly that config, then meets the others at a barrier and destroys the
   process group before it exits (a rank that exits first can abort its peer at interpreter exit);
4. rank 0 waits for the other ranks, checks their exit codes, and restores every DDP environment variable,
   so the next job of the sweep starts clean. A failing rank fails its job (the others are stopped), not the
   whole sweep.

    @hydra.main(config_path=..., config_name="my_app", version_base="1.3")
    def main(cfg):
        return run_job(train, cfg)   # train(cfg) builds the Trainer from cfg.trainer and fits, on every rank
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "DDP_ENV_VARS",
    "LAUNCHER_PID_ENV",
    "RankProcessError",
    "exit_with_launcher",
    "load_rank_config",
    "rank_config_text",
    "run_job",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

LAUNCHER_PID_ENV = "LIGHTNING_FREEZE_LAUNCHER_PID"  # the pid a rank process exits with
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Everything a DDP job may leave behind in os.environ (our launcher, Lightning, seed_everything, torchrun).
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
_CHILD_WAIT_S = 120.0


class RankProcessError(RuntimeError):
    """A rank process of the job failed although rank 0's task returned.

    Args:
        failures: ``(local rank, exit code)`` of each rank process that failed.
        result: what rank 0's task returned (the app records it as failed).
    """

    def __init__(self, failures: list[tuple[int, int]], result: Any) -> None:
        super().__init__(f"DDP rank process(es) of this job failed: (local rank, exit code) {failures}")
        self.failures, self.result = failures, result


# ----------------------------------------------------------------------------------------------- the job's config


def _task_ref(task: Callable[..., Any]) -> dict[str, str]:
    """How a rank process finds ``task``: an importable module, or the file of a ``python script.py`` app."""
    module = task.__module__
    ref = {"module": module, "qualname": task.__qualname__}
    if "<locals>" in task.__qualname__:
        raise ValueError(f"run_job needs a module-level task function, got {task.__qualname__}")
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


def rank_config_text(task: Callable[..., Any], cfg: DictConfig) -> str:
    """What a rank needs to run exactly this job, as YAML: task reference, cwd, composed config, hydra node.

    Args:
        task: the job's task function (module level: a rank process imports it).
        cfg: the job's composed config (interpolations resolved where they resolve here).
    """
    from hydra.core.hydra_config import HydraConfig

    payload = {
        "task": _task_ref(task),
        "cwd": os.getcwd(),
        "config": _resolved(cfg),
        "hydra": _resolved(HydraConfig.get()),
    }
    return OmegaConf.to_yaml(OmegaConf.create(payload))


def load_rank_config(text: str) -> tuple[Callable[..., Any], DictConfig]:
    """Load a job written by :func:`rank_config_text`: set Hydra's runtime config as the job had it, change to
    its working directory, and return ``(task, cfg)``.

    Args:
        text: the YAML :func:`rank_config_text` wrote.
    """
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig

    saved = OmegaConf.create(text)
    assert isinstance(saved, DictConfig)
    hydra_node = OmegaConf.structured(HydraConf)
    OmegaConf.set_struct(hydra_node, False)  # composed hydra nodes carry keys HydraConf lacks (e.g. `env`)
    hydra_node = OmegaConf.merge(hydra_node, saved.hydra)
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_node}))
    cfg = saved.config
    assert isinstance(cfg, DictConfig)
    os.chdir(saved.cwd)
    return _load_task(OmegaConf.to_container(saved.task)), cfg  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- how many ranks


def local_processes(trainer_node: Any) -> tuple[int, int] | None:
    """``(processes per node, nodes)`` that Lightning would start itself for this trainer config, by re-running
    the script; ``None`` when it would start none (one process, spawn/fork, torchrun, SLURM, a bad config).

    Lightning is asked, not imitated: a Trainer is built from the node (no callbacks, logger or checkpoints),
    and its strategy's launcher and cluster environment say whether it would launch subprocesses.

    Args:
        trainer_node: the job's ``trainer`` node (``_target_: lightning.pytorch.Trainer``).
    """
    if not (isinstance(trainer_node, DictConfig) and "_target_" in trainer_node):
        return None
    from hydra.utils import instantiate
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = instantiate(
                trainer_node,
                callbacks=[],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
    except Exception:  # the task builds the same trainer and reports the error where the job records it
        return None
    finally:
        quiet.setLevel(level)
    launcher = probe.strategy.launcher
    if (
        not isinstance(launcher, _SubprocessScriptLauncher)
        or launcher.cluster_environment.creates_processes_externally
    ):
        return None
    if probe.num_devices * probe.num_nodes < 2:
        return None
    return int(probe.num_devices), int(probe.num_nodes)


# ----------------------------------------------------------------------------------------------- the ranks


def end_process_group(ok: bool) -> None:
    """Leave the job's process group cleanly, so no rank exits while a peer still talks to it.

    Args:
        ok: the job went well: meet every rank at a barrier first; otherwise only destroy the group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok:
            dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class _RankWatcher(threading.Thread):
    """Watches the other ranks of one job. If one fails, the rest are stopped; rank 0 (this process) then fails
    by itself (gloo raises when a peer disappears). A rank 0 still blocked ``grace_s`` later (waiting for a peer
    that died before the process group formed: that wait cannot be interrupted) is killed, as Lightning's own
    launcher does."""

    def __init__(self, procs: list[subprocess.Popen], grace_s: float = 60.0) -> None:
        super().__init__(daemon=True, name="lightning-freeze-rank-watcher")
        self.procs, self.grace_s = procs, grace_s
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.5):
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes):
                log.error("a DDP rank of this job failed (exit codes %s); stopping the other ranks", codes)
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


@contextlib.contextmanager
def _restored_environment() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in DDP_ENV_VARS}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name in ("lightning.fabric.utilities.rank_zero", "lightning_utilities.core.rank_zero"):
            fn = getattr(sys.modules.get(name), "rank_zero_only", None)
            if fn is not None and hasattr(fn, "rank"):
                fn.rank = 0


def exit_with_launcher(launcher_pid: int, *, parent_death_signal: bool = True, poll_s: float = 0.2) -> None:
    """Tie this process to the process that launched it: when the launcher dies, this process exits.

    On Linux the kernel kills this process the moment its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
    the parent is the launcher's thread that started it, which waits for its ranks). Everywhere, a daemon
    thread also polls the parent pid every ``poll_s`` seconds and exits when it changed (the process was
    re-parented), for systems without ``prctl``. A launcher that died before this call is caught by the same
    comparison at once.

    Args:
        launcher_pid: the launcher's pid (the rank's parent).
        parent_death_signal: use ``prctl`` where there is one (False: the watchdog thread alone).
        poll_s: the watchdog's polling interval in seconds.
    """
    if parent_death_signal and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # no libc prctl (e.g. a static interpreter): the watchdog stays
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    def launcher_is_gone() -> bool:
        return os.getppid() != launcher_pid

    def watch() -> None:
        while not launcher_is_gone():
            time.sleep(poll_s)
        sys.stderr.write(
            f"lightning-freeze: the launcher of this rank (pid {launcher_pid}) is gone; exiting\n"
        )
        sys.stderr.flush()
        os._exit(1)

    if launcher_is_gone():
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="lightning-freeze-launcher-watchdog").start()


def _start_ranks(config_text: str, per_node: int, nodes: int) -> list[subprocess.Popen]:
    """Set this process up as local rank 0 and start local ranks 1..per_node-1 (the torchrun environment),
    each reading the job from its stdin."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    common = {
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(find_free_network_port()),
        "WORLD_SIZE": str(per_node * nodes),
        "NODE_RANK": str(node_rank),
        "LOCAL_WORLD_SIZE": str(per_node),
    }
    os.environ.update({**common, "LOCAL_RANK": "0", "RANK": str(node_rank * per_node)})
    procs = []
    for local in range(1, per_node):
        env = {
            **os.environ,
            **common,
            "LOCAL_RANK": str(local),
            "RANK": str(node_rank * per_node + local),
            LAUNCHER_PID_ENV: str(os.getpid()),
        }
        command = [sys.executable, "-m", "lightning_freeze.app.launch"]
        proc = subprocess.Popen(command, env=env, cwd=os.getcwd(), stdin=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdin is not None
        try:
            proc.stdin.write(config_text.encode("utf-8"))
            proc.stdin.close()
        except OSError:  # the rank died at once: its exit code reports it (see _RankWatcher)
            pass
    return procs


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, int]]:
    """Wait for the rank processes (killing any still running at the deadline); (local rank, code) of failures."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [(local, p.returncode) for local, p in enumerate(procs, start=1) if p.returncode != 0]


def _run_and_leave(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """The task, then a clean exit from its process group (every rank of an external launcher does this)."""
    ok = False
    try:
        result = task(cfg)
        ok = True
        return result
    finally:
        end_process_group(ok)


def run_job(task: Callable[[DictConfig], T], cfg: DictConfig, trainer_key: str = "trainer") -> T:
    """Run ``task(cfg)`` as one Hydra job whose DDP ranks (if any) all run exactly this job's config.

    ``cfg[trainer_key]`` is the job's Trainer node (``_target_: lightning.pytorch.Trainer``). Outside Hydra,
    in a process started by an external launcher (torchrun: ``LOCAL_RANK`` is set; SLURM), or when the trainer
    runs in one process, the task runs as it is, and leaves its process group (if it made one) cleanly.

    Args:
        task: a module-level function ``task(cfg)`` (rank processes import it by name).
        cfg: the job's composed config.
        trainer_key: the key of the job's Trainer node in ``cfg``.

    Returns:
        What ``task(cfg)`` returned on this rank (rank 0).

    Raises:
        RankProcessError: a rank process failed although this rank's task returned.
        ValueError: ``task`` is not importable by a rank process (a local function).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return task(cfg)
    if "LOCAL_RANK" in os.environ:
        return _run_and_leave(task, cfg)
    _task_ref(task)  # fail early on a task a rank process could not import
    layout = local_processes(cfg.get(trainer_key))
    if layout is None:
        return _run_and_leave(task, cfg)
    config_text = rank_config_text(task, cfg)
    ok, left_cleanly = False, False
    result: Any = None
    with _restored_environment():
        procs = _start_ranks(config_text, *layout)
        watcher = _RankWatcher(procs)
        watcher.start()
        try:
            result = task(cfg)
            ok = True
        finally:
            try:
                end_process_group(ok)
                left_cleanly = True
            except Exception:  # a peer that is gone fails the barrier: its exit code says why
                log.exception("the ranks of this job did not meet at the end")
            failures = _wait(procs, _CHILD_WAIT_S if ok else 5.0)
            watcher.stop()
    if ok and (failures or not left_cleanly):
        raise RankProcessError(failures or [(-1, -1)], result)
    return result


def _child_main(argv: list[str]) -> None:
    if argv or LAUNCHER_PID_ENV not in os.environ:
        raise SystemExit(
            "python -m lightning_freeze.app.launch is started by run_job: it reads its job from stdin and "
            f"needs {LAUNCHER_PID_ENV}"
        )
    exit_with_launcher(int(os.environ[LAUNCHER_PID_ENV]))
    from lightning_freeze.app.console import print_each_message_once

    print_each_message_once()  # warnings as rank 0 prints them
    task, cfg = load_rank_config(sys.stdin.read())
    ok = False
    try:
        task(cfg)
        ok = True
    except BaseException:  # reported here; this rank then exits non-zero
        traceback.print_exc()
    finally:
        end_process_group(ok)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
