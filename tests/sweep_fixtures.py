"""Sweep dirs written the way the app writes them (metrics.json, split_manifest.json, .hydra/overrides.yaml,
predictions.<stage>.npz from real splitters), for report tests that need no training."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lightning_freeze.splitrun.prediction_files import predictions_path, write_predictions
from lightning_freeze.splitrun.splitters import Splitter


def write_job(
    job_dir: Path,
    overrides: Sequence[str],
    splitter: Splitter | None,
    n: int,
    metrics: Mapping[str, float],
    *,
    status: str = "ok",
    labels: np.ndarray | None = None,
    outputs: Callable[[np.ndarray], np.ndarray] | None = None,
    split_seed: int = 0,
    seed: int = 0,
) -> None:
    """One job dir. ``outputs(indices) -> rows`` writes predictions.val/test.npz for the split's parts."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra").mkdir(exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    result: dict[str, Any] = {
        "status": status,
        "metrics": dict(metrics),
        "seed": seed,
        "overrides": list(overrides),
    }
    if status != "ok":
        result["error"] = "RuntimeError: the job died"
    (job_dir / "metrics.json").write_text(json.dumps(result))
    if splitter is None:
        return
    parts = splitter.split(n, labels=labels, seed=split_seed)
    manifest = {**parts.manifest, "roles": dict(parts.roles)}
    (job_dir / "split_manifest.json").write_text(json.dumps(manifest))
    if outputs is None or status != "ok":
        return
    for stage in ("val", "test"):
        if parts.has(stage):
            index = parts.role(stage)
            write_predictions(
                predictions_path(job_dir, stage),
                index=index,
                output=outputs(index),
                kind="logits",
                stage=stage,
                target=None if labels is None else labels[index],
            )
