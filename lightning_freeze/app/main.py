"""Hydra entry point: ``lightning-freeze`` (console script) and ``python -m lightning_freeze``.

``main()`` is the Hydra app; ``train(cfg)`` is one run in the current process. Every object is built
from the config with ``hydra.utils.instantiate``: the model and datamodule (``task``), the split
(``split``, merged into the datamodule's arguments), the freezing callback(s) (``freeze``) and the
``trainer``. Each run writes ``metrics.json`` to its run directory and prints a short result table.

Examples::

    lightning-freeze                                   # digits, backbone frozen, holdout split
    lightning-freeze freeze=none trainer.max_epochs=5
    lightning-freeze -m freeze=none,layer_freeze seed=0,1,2
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.lightning_freeze_searchpath.searchpath import conf_dir

__all__ = ["CONFIG_DIR", "build_callbacks", "build_datamodule", "main", "train"]

CONFIG_DIR = str(conf_dir())
METRICS_FILE = "metrics.json"


def build_callbacks(node: Any, where: str = "freeze") -> list[Any]:
    """Instantiate the callbacks a config node describes.

    The node is empty/null (no callback), a node with ``_target_`` (one callback), or a mapping of
    names to such nodes (several callbacks, in key order; a null entry is skipped).
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


def build_datamodule(cfg: DictConfig) -> Any:
    """``task.datamodule`` with the ``split`` group's keys added to its arguments."""
    from hydra.utils import instantiate

    split = cfg.get("split")
    extra: dict[str, Any] = {}
    if split is not None:
        extra = {
            k: v for k, v in OmegaConf.to_container(split, resolve=True).items() if not k.startswith("_")
        }
    return instantiate(cfg.task.datamodule, **extra)


def _hydra_runtime() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_global_zero(trainer: Any | None) -> bool:
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _float_metrics(results: list[Mapping[str, Any]] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for result in results or []:
        for key, value in result.items():
            out[str(key)] = float(value)
    return out


def _has_stage(datamodule: Any, stage: str) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if datamodule is None or not is_overridden(f"{stage}_dataloader", datamodule):
        return False
    return bool(getattr(datamodule, f"has_{stage}", True))  # SplitRunDataModule: a split may lack a part


def train(cfg: DictConfig, run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run one job in this process: fit, validate, test; write ``metrics.json``; return the result.

    ``run_dir`` defaults to Hydra's output directory (or the current directory outside Hydra).
    On failure ``metrics.json`` records ``status: "failed"`` with the error, and the error is
    re-raised. Under DDP every rank runs this function; only global rank 0 writes and prints.
    """
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    from lightning_freeze.app._trainable import TrainableFraction, count_params

    start = time.perf_counter()
    hydra_cfg = _hydra_runtime()
    if run_dir is None:
        run_dir = hydra_cfg.runtime.output_dir if hydra_cfg is not None else os.getcwd()
    run_dir = Path(run_dir)
    result: dict[str, Any] = {
        "status": "failed",
        "error": None,
        "metrics": {},
        "val": {},
        "test": {},
        "wall_time_s": None,
        "fit_time_s": None,
        "trainable_fraction": None,
        "trainable_params": None,
        "total_params": None,
        "epochs": None,
        "global_step": None,
        "seed": cfg.get("seed"),
        "overrides": list(hydra_cfg.overrides.task) if hydra_cfg is not None else [],
        "choices": (
            {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
            if hydra_cfg is not None
            else {}
        ),
        "run_dir": str(run_dir),
    }
    trainer = None
    threads = None
    try:
        if cfg.task.get("num_threads"):
            threads = torch.get_num_threads()
            torch.set_num_threads(int(cfg.task.num_threads))
        if cfg.get("seed") is not None:
            pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        model = instantiate(cfg.task.model)
        trainable = TrainableFraction()
        callbacks = [
            *build_callbacks(cfg.get("freeze"), "freeze"),
            *build_callbacks(cfg.get("cache"), "cache"),
            *build_callbacks(cfg.get("callbacks"), "callbacks"),
        ]
        trainer = instantiate(cfg.trainer, callbacks=[*callbacks, trainable], default_root_dir=str(run_dir))
        fit_start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        result["fit_time_s"] = time.perf_counter() - fit_start
        if trainable.at_end is None:  # fit ended before training started (e.g. interrupted)
            trainable.at_end = count_params(model)
        result["trainable_params"], result["total_params"] = trainable.at_end
        result["trainable_fraction"] = trainable.at_end[0] / max(trainable.at_end[1], 1)
        result["epochs"], result["global_step"] = trainer.current_epoch, trainer.global_step
        if getattr(trainer, "interrupted", False):
            raise RuntimeError("training was interrupted")
        if _has_stage(datamodule, "val"):
            result["val"] = _float_metrics(trainer.validate(model, datamodule=datamodule, verbose=False))
        if _has_stage(datamodule, "test"):
            result["test"] = _float_metrics(trainer.test(model, datamodule=datamodule, verbose=False))
        result["metrics"] = {**result["val"], **result["test"]}
        result["status"] = "ok"
    except BaseException as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        result["wall_time_s"] = time.perf_counter() - start
        if _is_global_zero(trainer):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / METRICS_FILE).write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(format_result(result), flush=True)
    return result


def format_result(result: Mapping[str, Any]) -> str:
    """A short, human-readable table of one run's result."""
    rows: list[tuple[str, str]] = [("status", str(result["status"]))]
    if result.get("error"):
        rows.append(("error", str(result["error"]).splitlines()[0][:200]))
    for key, value in sorted(result.get("metrics", {}).items()):
        rows.append(
            (key, f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value))
        )
    if result.get("trainable_fraction") is not None:
        rows.append(
            (
                "trainable params",
                f"{100 * result['trainable_fraction']:.1f}% "
                f"({result['trainable_params']:,} of {result['total_params']:,})",
            )
        )
    if result.get("epochs") is not None:
        rows.append(("epochs / steps", f"{result['epochs']} / {result['global_step']}"))
    if result.get("wall_time_s") is not None:
        rows.append(("wall time", f"{result['wall_time_s']:.1f} s"))
    rows.append(("run dir", str(result.get("run_dir"))))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    overrides = " ".join(result.get("overrides") or []) or "(defaults)"
    return f"\nlightning-freeze: {overrides}\n{line}\n{body}\n{line}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra app behind ``lightning-freeze``; one call per job (multirun: one per sweep point)."""
    from lightning_freeze.app.launch import run_job  # DDP ranks run exactly this job's config

    return run_job(train, cfg)


if __name__ == "__main__":
    main()
