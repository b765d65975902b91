"""Fold ensembles: the k fold models of one cross-validation averaged on the fixed test part.

Each fold's job records its model's outputs on the test part (``predictions.test.npz``, written by
:class:`~lightning_freeze.splitrun.predictions.PredictionRecorder` during the job's final test pass). The
ensemble averages them per sample, as probabilities (``average="probs"``: softmax of each fold's logits, then
the mean) or as logits (``average="logits"``: the mean logit, then softmax), and is scored next to the folds'
own scores (mean and 95% CI). All folds must have tested the same samples: every job's split manifest must
record one test part hash, and the recorded rows must be that part; anything else is refused. No torch.

    lightning-freeze-report SWEEP --ensemble [--ensemble-average logits]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_freeze.splitrun.assign import part_hash
from lightning_freeze.splitrun.oof import OOFSet, oof_sets, prediction_metrics, probabilities
from lightning_freeze.splitrun.prediction_files import predictions_path, read_predictions
from lightning_freeze.splitrun.stats import describe

__all__ = ["ENSEMBLE_SPLITTERS", "EnsembleError", "FoldEnsemble", "fold_ensemble", "fold_ensembles"]

Average = Literal["probs", "logits"]
# Splitters whose folds share one fixed test part (with test_ratio > 0).
ENSEMBLE_SPLITTERS = ("KFold", "GroupKFold", "StratifiedGroupKFold", "RepeatedKFold", "TimeSeriesSplit")


class EnsembleError(ValueError):
    """A fold ensemble that cannot be made: a fold is missing, or the folds tested different samples."""


@dataclass
class FoldEnsemble:
    """One cross-validation's fold models averaged on its test part.

    Args:
        name: the set of folds (the overrides that tell it apart; ``all`` if the sweep has one).
        average: ``probs`` or ``logits`` (or ``values`` for regression outputs).
        index: the test part's dataset indices, sorted.
        target: their targets (None when the batches had none).
        output: the ensemble's output per sample (probabilities for class outputs, values otherwise).
        metrics: the ensemble's metrics (``acc``, ``log_loss``, ``brier`` or ``mse``, ``mae``).
        fold_metrics: per metric, the folds' own scores on the test part: n, mean, std, 95% CI and values.
        jobs: fold -> its job dir.
    """

    name: str
    average: str
    index: np.ndarray
    target: np.ndarray | None
    output: np.ndarray
    metrics: dict[str, float]
    fold_metrics: dict[str, dict[str, Any]]
    jobs: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready part of the result (no arrays), for the summary."""
        return {
            "name": self.name,
            "average": self.average,
            "n_folds": len(self.jobs),
            "n_samples": int(self.index.size),
            "metrics": self.metrics,
            "fold_metrics": self.fold_metrics,
            "jobs": {str(k): v for k, v in self.jobs.items()},
        }


def _ensemble(found: OOFSet, average: Average) -> FoldEnsemble:
    if not found.complete:
        raise EnsembleError(f"fold ensemble {found.name!r} is incomplete: " + "; ".join(found.missing))
    hashes = {}
    for fold, manifest in found.manifests.items():
        test = ((manifest.get("parts") or {}).get((manifest.get("roles") or {}).get("test", "test"))) or {}
        hashes[fold] = test.get("sha256")
    if None in hashes.values():
        folds = sorted(f for f, h in hashes.items() if h is None)
        raise EnsembleError(
            f"fold ensemble {found.name!r}: the split manifests of folds {folds} record no test part; run the folds "
            "with a fixed test part (split.test_ratio > 0)"
        )
    if len(set(hashes.values())) > 1:
        groups: dict[str, list[int]] = {}
        for fold, digest in sorted(hashes.items()):
            groups.setdefault(str(digest)[:12], []).append(fold)
        raise EnsembleError(
            f"fold ensemble {found.name!r}: the folds come from different splits (their manifests record different "
            f"test parts: {groups}); ensemble only the folds of one split (same splitter, split_seed and data)"
        )
    outputs, fold_scores = [], {}
    index = target = None
    kind = "values"
    for fold, job_dir in sorted(found.folds.items()):
        rows = read_predictions(predictions_path(job_dir, "test"))
        if part_hash(rows["index"]) != hashes[fold]:
            raise EnsembleError(
                f"fold ensemble {found.name!r}: {predictions_path(job_dir, 'test')} is not the test part of its split manifest "
                "(written by another run or a partial pass)"
            )
        if index is None:
            index, target, kind = rows["index"], rows.get("target"), rows.get("kind", "values")
        fold_scores[fold] = prediction_metrics(rows.get("target"), rows["output"], rows.get("kind", "values"))
        outputs.append(rows["output"])
    assert index is not None
    stacked = np.stack([np.asarray(o, dtype=np.float64) for o in outputs])
    if kind == "values":
        output, used = stacked.mean(axis=0), "values"
    elif average == "logits" and kind == "logits":
        output, used = probabilities(stacked.mean(axis=0), "logits"), "logits"
    else:
        output = np.mean([probabilities(o, kind) for o in stacked], axis=0)
        used = "probs"
    names = sorted({m for scores in fold_scores.values() for m in scores})
    return FoldEnsemble(
        name=found.name,
        average=used,
        index=index,
        target=target,
        output=output,  # type: ignore[arg-type]
        metrics=prediction_metrics(target, output, "probs" if used != "values" else "values"),  # type: ignore[arg-type]
        fold_metrics={m: describe([s[m] for s in fold_scores.values() if m in s]) for m in names},
        jobs={fold: str(path) for fold, path in sorted(found.folds.items())},
    )


def fold_ensembles(jobs: Sequence[Any], average: Average = "probs") -> list[FoldEnsemble | EnsembleError]:
    """Every fold ensemble a sweep's jobs allow (an :class:`EnsembleError` in place of one that cannot be made).

    Args:
        jobs: the sweep's jobs (:func:`lightning_freeze.splitrun.report.collect_jobs`).
        average: ``"probs"`` or ``"logits"``.
    """
    out: list[FoldEnsemble | EnsembleError] = []
    for found in oof_sets(jobs, stage="test", splitters=ENSEMBLE_SPLITTERS):
        try:
            out.append(_ensemble(found, average))
        except EnsembleError as err:
            out.append(err)
    return out


def fold_ensemble(sweep_dir: str | Path, name: str | None = None, average: Average = "probs") -> FoldEnsemble:
    """The fold ensemble of a k-fold sweep with a fixed test part (``split.test_ratio > 0``).

    Args:
        sweep_dir: the sweep root.
        name: which set of folds when the sweep holds several (conditions, repeats, seeds); see
            :func:`~lightning_freeze.splitrun.oof_predictions`.
        average: ``"probs"`` (mean of the folds' probabilities) or ``"logits"`` (mean logit, then softmax).

    Raises:
        EnsembleError: a fold is missing or failed (named), or the folds come from different splits.
    """
    from lightning_freeze.splitrun.report import collect_jobs

    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
    sets = oof_sets(collect_jobs(sweep_dir), stage="test", splitters=ENSEMBLE_SPLITTERS)
    chosen = sets if name is None else [s for s in sets if s.name == name or name in s.name.split(", ")]
    if len(chosen) != 1:
        raise EnsembleError(
            f"{sweep_dir}: {len(chosen)} sets of folds match (of {[s.name for s in sets]}); "
            + ("none holds a k-fold sweep" if not sets else "pass name= to pick one")
        )
    return _ensemble(chosen[0], average)
