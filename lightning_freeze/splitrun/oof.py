"""Out-of-fold (OOF) predictions: every sample predicted once by the fold model that did not train on it.

A k-fold sweep whose jobs ran with :class:`~lightning_freeze.splitrun.predictions.PredictionRecorder` leaves one
``predictions.val.npz`` per job. Jobs that differ only in ``split.fold`` form one cross-validation (one *OOF
set*: a condition, and a repeat or seed if those vary too); its folds' validation rows are merged in dataset
order. A set is complete when every fold 0..k-1 has a successful job whose recorded rows are exactly its
validation part (the hash in its split manifest), and the parts together cover every sample outside the
fixed test part once. An incomplete set names what is missing, and no OOF score is made from it.

The merge scatters each fold's rows into arrays of the dataset's length (no sort), so it is linear in the
number of samples. Metrics: accuracy, log loss and Brier score for class outputs (softmax of logits), mean
squared and absolute error for values. No torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_freeze.splitrun.assign import part_hash
from lightning_freeze.splitrun.prediction_files import PREDICTIONS_FILE, predictions_path, read_predictions

__all__ = [
    "OOF_FILE",
    "OOF_SPLITTERS",
    "IncompleteOOFError",
    "OOFPredictions",
    "OOFSet",
    "oof_predictions",
    "oof_sets",
    "prediction_metrics",
    "merge_oof",
    "probabilities",
]

OOF_FILE = "oof_predictions.npz"
# The splitters whose validation parts tile the data (outside a fixed test part) across `fold`.
OOF_SPLITTERS = ("KFold", "GroupKFold", "StratifiedGroupKFold", "RepeatedKFold")
_FOLD_KEY = "split.fold"


class IncompleteOOFError(ValueError):
    """An OOF set lacks a fold (failed, missing or unrecorded job) or its parts do not tile the data."""


@dataclass
class OOFPredictions:
    """One cross-validation's out-of-fold predictions, in dataset order.

    Args:
        index: dataset indices, sorted (every sample outside the fixed test part, once).
        target: each sample's target (None when the batches had none).
        output: each sample's output from the fold model that validated on it (logits, probs or values).
        fold: the fold (``split.fold``) whose model predicted each sample.
        kind: ``logits``, ``probs`` or ``values`` (as :class:`PredictionRecorder` recorded it).
        name: the OOF set (the overrides that tell it apart from the sweep's other sets; ``all`` if one).
        jobs: the job dirs, by fold.
    """

    index: np.ndarray
    target: np.ndarray | None
    output: np.ndarray
    fold: np.ndarray
    kind: str
    name: str = "all"
    jobs: dict[int, str] = field(default_factory=dict)


@dataclass
class OOFSet:
    """The jobs of one cross-validation (one OOF set) and what keeps it from being complete.

    Args:
        name: the overrides that tell this set apart (``all`` when the sweep has one set).
        k: the number of folds its splitter makes.
        folds: fold -> the job dir that validated on it (successful jobs with recorded predictions).
        missing: one line per fold that has no usable job, naming the job and why.
        manifests: fold -> that job's split manifest.
    """

    name: str
    k: int
    folds: dict[int, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    manifests: dict[int, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every fold has a job with recorded predictions."""
        return not self.missing and len(self.folds) == self.k


def _fold_of(job: Any) -> int | None:
    value = job.overrides.get(_FOLD_KEY)
    if value is None and job.manifest:
        value = (job.manifest.get("spec") or {}).get("fold")
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def oof_sets(
    jobs: Sequence[Any],
    stage: str = "val",
    splitters: Sequence[str] = OOF_SPLITTERS,
    requires: str | None = None,
) -> list[OOFSet]:
    """The sweep's OOF sets: k-fold jobs grouped by every varying override except ``split.fold``.

    Args:
        jobs: the sweep's jobs (:func:`lightning_freeze.splitrun.report.collect_jobs`).
        stage: whose recorded predictions a fold needs: ``"val"`` (OOF) or ``"test"`` (fold ensembles).
        splitters: the splitter kinds whose jobs are grouped.
        requires: the file (relative to the job dir) a fold's job needs instead of its predictions, e.g.
            ``checkpoints/last.ckpt``.
    """
    predictions_file = requires or PREDICTIONS_FILE.format(stage=stage)
    kinds = {id(j): (j.manifest.get("spec") or {}).get("kind") for j in jobs if j.manifest is not None}
    if not any(kind in splitters for kind in kinds.values()):
        return []
    keys = sorted({k for j in jobs for k in j.overrides if k != _FOLD_KEY})
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    grouped: dict[str, list[Any]] = {}
    for job in jobs:
        if kinds.get(id(job), splitters[0]) not in splitters:
            continue  # another splitter's job (a failed job without a manifest may still belong here)
        name = ", ".join(f"{k}={job.overrides.get(k)}" for k in varying) or "all"
        grouped.setdefault(name, []).append(job)
    any_spec = next(
        (j.manifest["spec"] for j in jobs if j.manifest is not None and kinds.get(id(j)) in splitters), {}
    )
    sets = []
    for name, members in grouped.items():
        specs = [j.manifest["spec"] for j in members if j.manifest is not None]
        # a set whose jobs all failed before splitting has no manifest: its k is the override's or the sweep's
        k_value = specs[0].get("k") if specs else members[0].overrides.get("split.k", any_spec.get("k"))
        try:
            k = int(k_value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        found = OOFSet(name, k)
        by_fold: dict[int, list[Any]] = {}
        for job in members:
            fold = _fold_of(job)
            if fold is not None:
                by_fold.setdefault(fold, []).append(job)
        for fold in range(k):
            candidates = by_fold.get(fold, [])
            usable = [j for j in candidates if j.status == "ok" and (j.path / predictions_file).is_file()]
            if len(usable) > 1:
                found.missing.append(
                    f"fold {fold}: {len(usable)} jobs ({', '.join(str(j.path) for j in usable)}) ran it; "
                    "a set takes one job per fold"
                )
            elif usable:
                found.folds[fold] = usable[0].path
                found.manifests[fold] = usable[0].manifest or {}
            elif candidates:
                job = candidates[0]
                why = (
                    f"status {job.status}"
                    + (f": {str(job.error).splitlines()[0][:160]}" if job.error else "")
                    if job.status != "ok"
                    else f"no {predictions_file}" + ("" if requires else " (run it with PredictionRecorder)")
                )
                found.missing.append(f"fold {fold}: job {job.path} ({why})")
            else:
                found.missing.append(f"fold {fold}: no job of this sweep ran it")
        sets.append(found)
    return sets


def merge_oof(oof_set: OOFSet) -> OOFPredictions:
    """Merge a complete OOF set's recorded validation rows in dataset order.

    Args:
        oof_set: one of :func:`oof_sets`.

    Raises:
        IncompleteOOFError: the set lacks a fold (named), or its rows do not tile the data outside the test part.
    """
    if not oof_set.complete:
        raise IncompleteOOFError(
            f"OOF set {oof_set.name!r} is incomplete, so no OOF predictions or score are made from it: "
            + "; ".join(oof_set.missing)
        )
    n = int(next(iter(oof_set.manifests.values())).get("n", 0))
    output: np.ndarray | None = None
    target: np.ndarray | None = None
    fold_of = np.full(n, -1, dtype=np.int32)
    kind = "values"
    expected = None
    for fold, job_dir in sorted(oof_set.folds.items()):
        rows = read_predictions(predictions_path(job_dir, "val"))
        manifest = oof_set.manifests[fold]
        parts = manifest.get("parts") or {}
        roles = manifest.get("roles") or {"val": "val"}
        val_hash = (parts.get(roles.get("val", "val")) or {}).get("sha256")
        if val_hash is not None and part_hash(rows["index"]) != val_hash:
            raise IncompleteOOFError(
                f"OOF set {oof_set.name!r}: {predictions_path(job_dir, 'val')} does not hold exactly the job's validation part "
                "(its index hash differs from split_manifest.json): it was written by another run or a partial pass"
            )
        if int(manifest.get("n", n)) != n:
            raise IncompleteOOFError(
                f"OOF set {oof_set.name!r}: the folds' jobs split data sets of different sizes"
            )
        index = rows["index"]
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IncompleteOOFError(
                f"OOF set {oof_set.name!r}: {job_dir} recorded indices outside 0..{n - 1}"
            )
        if output is None:
            output = np.empty((n, *rows["output"].shape[1:]), dtype=rows["output"].dtype)
            kind = rows.get("kind", "values")
            if "target" in rows:
                target = np.empty((n, *rows["target"].shape[1:]), dtype=rows["target"].dtype)
            test = parts.get("test")
            expected = n - int(test["size"]) if test else n
        twice = fold_of[index] >= 0
        if twice.any():
            other = int(fold_of[index[twice][0]])
            raise IncompleteOOFError(
                f"OOF set {oof_set.name!r}: folds {other} and {fold} both validated on {int(twice.sum())} samples "
                f"(e.g. index {int(index[twice][0])}); their splits differ"
            )
        fold_of[index] = fold
        output[index] = rows["output"]
        if target is not None:
            if "target" not in rows:
                target = None
            else:
                target[index] = rows["target"]
    assert output is not None
    covered = np.flatnonzero(fold_of >= 0)
    if expected is not None and covered.size != expected:
        raise IncompleteOOFError(
            f"OOF set {oof_set.name!r}: the folds' validation parts cover {covered.size} samples, but "
            f"{expected} lie outside the test part"
        )
    return OOFPredictions(
        index=covered,
        target=None if target is None else target[covered],
        output=output[covered],
        fold=fold_of[covered],
        kind=kind,
        name=oof_set.name,
        jobs={fold: str(path) for fold, path in sorted(oof_set.folds.items())},
    )


def oof_predictions(sweep_dir: str | Path, name: str | None = None) -> OOFPredictions:
    """The out-of-fold predictions of a k-fold (or repeated k-fold) sweep, merged in dataset order.

    Args:
        sweep_dir: the sweep root.
        name: which OOF set, when the sweep holds several (conditions, repeats or seeds): its name as the
            summary lists it (e.g. ``"freeze=none"``), or one ``key=value`` of it that picks one set.

    Raises:
        IncompleteOOFError: a fold's job failed, is missing or recorded no predictions (the message names it),
            or the recorded rows do not tile the data.
        ValueError: the sweep has no OOF set, or ``name`` picks none or several.

    >>> # oof = oof_predictions("multirun/2026-12-06/10-00-00"); oof.index, oof.target, oof.output, oof.fold
    """
    from lightning_freeze.splitrun.jobs import collect_jobs

    sets = oof_sets(collect_jobs(sweep_dir))
    if not sets:
        raise ValueError(
            f"{sweep_dir} holds no k-fold sweep ({', '.join(OOF_SPLITTERS)}) whose folds' out-of-fold predictions "
            "could be merged"
        )
    chosen = sets
    if name is not None:
        chosen = [s for s in sets if s.name == name or name in s.name.split(", ")]
    if len(chosen) != 1:
        names = [s.name for s in sets]
        raise ValueError(
            f"{sweep_dir} holds the OOF sets {names}; pass name= to pick one"
            if name is None
            else f"name={name!r} picks {len(chosen)} of the OOF sets {names}; name one exactly"
        )
    return merge_oof(chosen[0])


def probabilities(output: np.ndarray, kind: str) -> np.ndarray | None:
    """Class probabilities from an output: softmax of 2-d logits, sigmoid of 1-d logits (as 2 columns).

    Args:
        output: per-sample outputs.
        kind: ``logits``, ``probs`` or ``values`` (values have no probabilities: None).
    """
    out = np.asarray(output, dtype=np.float64)
    if kind == "probs":
        return out if out.ndim == 2 else np.stack([1.0 - out, out], axis=1)
    if kind != "logits":
        return None
    if out.ndim == 1:
        p = 1.0 / (1.0 + np.exp(-out))
        return np.stack([1.0 - p, p], axis=1)
    shifted = out - out.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def prediction_metrics(target: np.ndarray | None, output: np.ndarray, kind: str) -> dict[str, float]:
    """Metrics of per-sample outputs against targets.

    Class outputs (``logits``/``probs``): ``acc``, ``log_loss`` (natural log, probabilities clipped at 1e-15)
    and ``brier`` (mean squared error of the probability vector). Values: ``mse`` and ``mae``.

    Args:
        target: the targets (integer classes for class outputs); None gives no metrics.
        output: the outputs, one row per target.
        kind: ``logits``, ``probs`` or ``values``.
    """
    if target is None or len(target) == 0:
        return {}
    probs = probabilities(output, kind)
    if probs is None:
        diff = np.asarray(output, dtype=np.float64).reshape(len(target), -1) - np.asarray(
            target, dtype=np.float64
        ).reshape(len(target), -1)
        return {"mse": float(np.mean(diff**2)), "mae": float(np.mean(np.abs(diff)))}
    classes = np.asarray(target).astype(np.int64).reshape(-1)
    rows = np.arange(classes.size)
    picked = np.clip(probs[rows, classes], 1e-15, 1.0)
    onehot = np.zeros_like(probs)
    onehot[rows, classes] = 1.0
    return {
        "acc": float(np.mean(probs.argmax(axis=1) == classes)),
        "log_loss": float(-np.mean(np.log(picked))),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
    }
