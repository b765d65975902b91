"""Hydra entry point: ``lightning-freeze`` (console script) and ``python -m lightning_freeze``.

``main()`` is the Hydra app; ``train(cfg)`` is one run in the current process. Every object is built from the
config with ``hydra.utils.instantiate``: the model and the datamodule (``task``, whose ``split`` is the
``split`` group's splitter), the freezing callback(s) (``freeze``), the checkpoints (``checkpoint``) and the
``trainer``. Everything that can be checked without training is checked first. Each run writes
``metrics.json`` to its run directory and prints a short result table.

Examples::

    lightning-freeze                                   # digits, backbone frozen, holdout split
    lightning-freeze freeze=none trainer.max_epochs=5
    lightning-freeze -m freeze=none,layer_freeze seed=0,1,2
    lightning-freeze resume=last hydra.run.dir=<an interrupted run's dir>
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_freeze.app.arguments import ConfigError, check_arguments
from lightning_freeze.app.checkpoints import (
    RESUME_CHOICES,
    check_checkpoint_file,
    checkpoint_dir,
    newest_checkpoint,
)
from lightning_freeze.app.config_dir import CONFIG_NAME, conf_dir
from lightning_freeze.app.results import METRICS_FILE, RunResult, format_result, write_result
from lightning_freeze.validation import check_choice, check_int, check_str

__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAME",
    "METRICS_FILE",
    "build_callbacks",
    "build_checkpoint",
    "build_trainer",
    "job_value",
    "main",
    "resume_checkpoint",
    "train",
    "validate_config",
]

CONFIG_DIR = str(conf_dir())
_APP = "lightning-freeze"


def build_callbacks(node: Any, where: str = "freeze") -> list[Any]:
    """Instantiate the callbacks a config node describes.

    Args:
        node: empty/null (no callback), a node with ``_target_`` (one callback), or a mapping (or list) of
            such nodes (several callbacks, in order; a null entry is skipped).
        where: the node's key in the config, named by errors (``freeze``, ``cache``, ``callbacks``).

    Raises:
        TypeError: an entry is not a ``_target_`` node.
    """
    from hydra.utils import instantiate

    if node is None:
        return []
    if isinstance(node, DictConfig | Mapping):
        if "_target_" in node:
            return [instantiate(node)]
        items = list(node.items())
    elif isinstance(node, ListConfig | list | tuple):
        items = [(str(i), item) for i, item in enumerate(node)]
    else:
        raise TypeError(
            f"{where}: expected a config node with _target_, a mapping of them, or null; got {node!r}"
        )
    callbacks = []
    for key, sub in items:
        if sub is None:
            continue
        if not (isinstance(sub, DictConfig | Mapping) and "_target_" in sub):
            raise TypeError(f"{where}.{key}: expected a config node with _target_, got {sub!r}")
        callbacks.append(instantiate(sub))
    return callbacks


def _node_values(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})  # type: ignore[return-value]


def validate_config(cfg: DictConfig) -> None:
    """Every check that needs no model, data or training.

    Args:
        cfg: the job's composed config.

    Raises:
        ConfigError: a value the job cannot run with; the message names the key to change.
    """
    from hydra.utils import get_class

    from lightning_freeze.app.optimizers import check_optimizer_nodes

    for key in ("seed", "split_seed"):
        if key in cfg:
            check_int(cfg.get(key), key, minimum=0, allow_none=True, where=_APP, error=ConfigError)
    check_choice(
        cfg.get("resume"),
        "resume",
        RESUME_CHOICES,
        where=_APP,
        error=ConfigError,
        hint="last: resume from the run dir's last.ckpt",
    )
    check_str(cfg.get("ckpt_path"), "ckpt_path", allow_none=True, where=_APP, error=ConfigError)
    check_str(cfg.get("optimized_metric"), "optimized_metric", allow_none=True, where=_APP, error=ConfigError)
    if cfg.get("ckpt_path") and cfg.get("resume"):
        raise ConfigError(
            f"{_APP}: set ckpt_path or resume, not both (got ckpt_path={cfg.ckpt_path!r}, resume={cfg.resume!r})"
        )
    for key in ("trainer", "checkpoint"):
        node = cfg.get(key)
        if isinstance(node, DictConfig) and "_target_" in node:
            check_arguments(get_class(node._target_), _node_values(node), key)
    trainer = _node_values(cfg.get("trainer"))
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if key in trainer and trainer[key] is not None and trainer[key] == 0:
            raise ConfigError(
                f"trainer.{key}=0 trains nothing, and the run would report untrained metrics; set trainer.{key} "
                f"to a positive value" + (" (-1 for no limit)" if key != "limit_train_batches" else "")
            )
    if cfg.get("resume") and trainer.get("enable_checkpointing") is False:
        raise ConfigError(
            f"resume={cfg.resume!r} needs checkpoints, but trainer.enable_checkpointing=false writes none"
        )
    check_optimizer_nodes(cfg.get("task"), "task")


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start).

    Args:
        cfg: the job's config: ``ckpt_path`` names a file; ``resume=last`` picks the newest ``last*.ckpt`` in
            the run's checkpoint dir (none there yet: the first attempt of a requeued job starts fresh).
        run_dir: the run directory.

    Raises:
        ConfigError: the checkpoint is missing, empty, truncated or corrupt (naming the option).
    """
    if cfg.get("ckpt_path"):
        return check_checkpoint_file(cfg.ckpt_path, "ckpt_path")
    if cfg.get("resume") == "last":
        last = newest_checkpoint(checkpoint_dir(cfg.get("checkpoint"), run_dir), "last*.ckpt")
        return None if last is None else check_checkpoint_file(last, "resume=last")
    return None


def build_checkpoint(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The ``checkpoint`` node's callback, as a list (empty for ``checkpoint=none`` or checkpointing off).

    Args:
        cfg: the job's config (its ``checkpoint`` and ``trainer`` nodes).
        run_dir: the run directory: checkpoints go to ``<run dir>/checkpoints`` unless the node names a
            ``dirpath``.
    """
    from hydra.utils import instantiate

    node = cfg.get("checkpoint")
    if not (isinstance(node, DictConfig) and "_target_" in node):
        return []
    if _node_values(cfg.get("trainer")).get("enable_checkpointing") is False:
        return []
    return [instantiate(node, dirpath=str(checkpoint_dir(node, run_dir)))]


def _hydra_runtime() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_global_zero(trainer: Any | None) -> bool:
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _float_metrics(results: list[Mapping[str, Any]] | None) -> dict[str, float]:
    return {str(k): float(v) for result in results or [] for k, v in result.items()}


def _has_stage(datamodule: Any, stage: str) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if datamodule is None or not is_overridden(f"{stage}_dataloader", datamodule):
        return False
    return bool(getattr(datamodule, f"has_{stage}", True))  # SplitRunDataModule: a split may lack a part


def _is_interruption(err: BaseException, trainer: Any | None) -> bool:
    """Ctrl+C (Lightning turns it into SystemExit(1)) or SIGTERM (SIGTERMException) while the job ran."""
    if isinstance(err, KeyboardInterrupt):
        return True
    return isinstance(err, SystemExit) and (trainer is None or bool(getattr(trainer, "interrupted", False)))


@contextlib.contextmanager
def _torch_threads(count: Any) -> Iterator[None]:
    """torch's intra-op thread count for the job (``task.num_threads``; unset: torch's default), restored after."""
    import torch

    if not count:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Any] = ()) -> Any:
    """The job's ``Trainer``: the ``trainer`` node with every callback the config asks for.

    Callbacks, in order: the ``freeze`` and ``cache`` groups' callbacks, the ``callbacks`` node's, the
    ``checkpoint`` node's (writing to ``<run dir>/checkpoints`` unless it names a ``dirpath``),
    :class:`~lightning_freeze.ExactResume`, then ``callbacks`` given here.

    Args:
        cfg: the job's composed config.
        run_dir: the run directory (the Trainer's ``default_root_dir``).
        callbacks: further callbacks the caller needs on this Trainer (the app adds its parameter counter).
    """
    from hydra.utils import instantiate

    from lightning_freeze.callbacks.resume import ExactResume

    configured = [
        *build_callbacks(cfg.get("freeze"), "freeze"),
        *build_callbacks(cfg.get("cache"), "cache"),
        *build_callbacks(cfg.get("callbacks"), "callbacks"),
        *build_checkpoint(cfg, run_dir),
        ExactResume(),
        *callbacks,
    ]
    return instantiate(cfg.trainer, callbacks=configured, default_root_dir=str(run_dir))


def _fit_and_evaluate(
    trainer: Any, model: Any, datamodule: Any, ckpt: Path | None, trainable: Any, record: RunResult
) -> None:
    """Fit (from ``ckpt`` when resuming), then validate and test on the parts the split has."""
    from lightning_freeze.engine.freezing import trainable_counts

    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    record.fit_time_s = time.perf_counter() - fit_start
    # measured before teardown could thaw anything; a fit that never started (a finished run resumed): now
    record.set_trainable(*(trainable.at_end or trainable_counts(model)))
    record.epochs, record.global_step = trainer.current_epoch, trainer.global_step
    if trainer.global_step == 0:
        raise RuntimeError(
            "the fit trained no step (an empty train part on some rank, or limits that skip training); "
            "check the split and trainer.limit_train_batches / max_epochs / max_steps"
        )
    evaluate = {"val": trainer.validate, "test": trainer.test}
    scores = {
        stage: _float_metrics(run(model, datamodule=datamodule, verbose=False))
        for stage, run in evaluate.items()
        if _has_stage(datamodule, stage)
    }
    record.set_evaluation(scores.get("val", {}), scores.get("test", {}))


def train(cfg: DictConfig, run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run one job in this process: check, fit, validate, test; write ``metrics.json``; return its record.

    On failure ``metrics.json`` records ``status: "failed"`` with the error, and the error is re-raised; on
    Ctrl+C or SIGTERM, ``status: "interrupted"`` with the last epoch and step and the checkpoint to resume
    from. Under DDP every rank runs this function; only global rank 0 writes and prints.

    Args:
        cfg: the job's composed config (the app's primary config, or another app's with the same keys).
        run_dir: where the run writes; default: Hydra's output directory, or the current directory outside
            Hydra.

    Returns:
        The run's :class:`~lightning_freeze.app.results.RunResult` as a dict (the keys of ``metrics.json``).
    """
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from lightning_freeze.app._trainable import TrainableFraction

    start = time.perf_counter()
    hydra_cfg = _hydra_runtime()
    run_dir = Path(
        run_dir if run_dir is not None else hydra_cfg.runtime.output_dir if hydra_cfg else os.getcwd()
    )
    record = RunResult(
        run_dir=str(run_dir),
        seed=cfg.get("seed"),
        overrides=list(hydra_cfg.overrides.task) if hydra_cfg is not None else [],
        choices={k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
        if hydra_cfg is not None
        else {},
    )
    trainer = None
    try:
        validate_config(cfg)
        ckpt = resume_checkpoint(cfg, run_dir)
        record.resumed_from = None if ckpt is None else str(ckpt)
        with _torch_threads(cfg.task.get("num_threads")):
            if cfg.get("seed") is not None:
                pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
            datamodule = instantiate(cfg.task.datamodule)
            if hasattr(datamodule, "check_run_dir"):  # a changed split is refused before anything is written
                datamodule.check_run_dir(run_dir)
            model = instantiate(cfg.task.model)
            trainable = TrainableFraction()
            trainer = build_trainer(cfg, run_dir, [trainable])
            _fit_and_evaluate(trainer, model, datamodule, ckpt, trainable, record)
        # an optimized_metric the run lacks fails the run, not the sweep later
        job_value(cfg, record.to_dict())
        record.status = "ok"
    except BaseException as err:
        record.set_error(err)
        if _is_interruption(err, trainer):
            if trainer is not None:
                record.epochs, record.global_step = trainer.current_epoch, trainer.global_step
            record.set_interrupted(newest_checkpoint(checkpoint_dir(cfg.get("checkpoint"), run_dir)))
        raise
    finally:
        record.wall_time_s = time.perf_counter() - start
        if _is_global_zero(trainer):
            record.written_to = str(write_result(run_dir, record.to_dict()))
            print(format_result(record.to_dict()), flush=True)
    return record.to_dict()


def job_value(cfg: DictConfig, result: Mapping[str, Any]) -> Any:
    """What the job returns to Hydra.

    Args:
        cfg: the job's config; its ``optimized_metric`` names the metric a sweeper (Optuna) optimises.
        result: the run's record (``train()``'s return value).

    Returns:
        The ``optimized_metric`` as a float when one is set, else the whole record (a dict).

    Raises:
        ConfigError: ``optimized_metric`` is not a metric of this run.
    """
    name = cfg.get("optimized_metric")
    if not name:
        return dict(result)
    metrics = result.get("metrics") or {}
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} is not a metric of this run; it has {sorted(metrics)}")
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> Any:
    """The Hydra app behind ``lightning-freeze``; one call per job (multirun: one per sweep point).

    Args:
        cfg: the job's composed config (Hydra passes it).

    Returns:
        :func:`job_value` of the run.
    """
    from lightning_freeze.app.console import print_each_message_once
    from lightning_freeze.app.launch import RankProcessError, run_job  # DDP ranks run exactly this job

    print_each_message_once()
    try:
        result = run_job(train, cfg)
    except RankProcessError as err:  # rank 0 finished, another rank did not: the job failed
        result = dict(err.result)
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
        result["written_to"] = str(write_result(Path(result["run_dir"]), result))
        print(format_result(result), flush=True)
        raise
    return job_value(cfg, result)


if __name__ == "__main__":
    main()
