"""The ``predictions.<stage>.npz`` file: one job's per-sample outputs with their dataset indices. Pure numpy.

Written by :class:`~lightning_freeze.splitrun.predictions.PredictionRecorder` (rank 0, atomically), read by the
out-of-fold merge and the fold ensembles, so reading a sweep's predictions never imports torch. Arrays:

- ``index``: dataset indices, sorted, each once; ``part_sha256``: their hash, as in the split manifest;
- ``output``: one row per sample (``kind``: ``logits``, ``probs`` or ``values``); ``target`` when known;
- ``stage`` (``val``/``test``), ``epoch`` and ``global_step`` of the pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_freeze.splitrun.assign import part_hash

__all__ = ["PREDICTIONS_FILE", "predictions_path", "read_predictions", "write_predictions"]

PREDICTIONS_FILE = "predictions.{stage}.npz"


def predictions_path(directory: str | os.PathLike[str], stage: str) -> Path:
    """Where a run dir's predictions of ``stage`` live.

    Args:
        directory: the run dir.
        stage: ``val`` or ``test``.
    """
    return Path(directory) / PREDICTIONS_FILE.format(stage=stage)


def write_predictions(
    path: str | os.PathLike[str],
    *,
    index: np.ndarray,
    output: np.ndarray,
    kind: str,
    stage: str,
    target: np.ndarray | None = None,
    epoch: int = 0,
    global_step: int = 0,
) -> Path:
    """Write one pass's predictions atomically (a reader never sees half a file).

    Args:
        path: the file (see :func:`predictions_path`).
        index: dataset indices, sorted, each once.
        output: one output row per index.
        kind: ``logits``, ``probs`` or ``values``.
        stage: ``val`` or ``test``.
        target: one target per index, or None.
        epoch: the trainer's epoch at the pass.
        global_step: the trainer's global step at the pass.
    """
    path = Path(path)
    arrays: dict[str, Any] = {
        "index": index,
        "output": output,
        "kind": np.str_(kind),
        "part_sha256": np.str_(part_hash(index)),
        "stage": np.str_(stage),
        "epoch": np.int64(epoch),
        "global_step": np.int64(global_step),
    }
    if target is not None:
        arrays["target"] = target
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_predictions(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One predictions file as a dict of arrays, with its metadata as plain strings and ints.

    Args:
        path: the file.
    """
    with np.load(path, allow_pickle=False) as data:
        out = {name: data[name] for name in data.files}
    for name in ("kind", "part_sha256", "stage"):
        if name in out:
            out[name] = str(out[name])
    for name in ("epoch", "global_step"):
        if name in out:
            out[name] = int(out[name])
    return out
