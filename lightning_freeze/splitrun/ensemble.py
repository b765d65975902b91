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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_freeze.splitrun.assign import part_hash
from lightning_freeze.splitrun.oof import OOFSet, oof_sets, prediction_metrics, probabilities
from lightning_freeze.splitrun.prediction_files import predictions_path, read_predictions
from lightning_freeze.splitrun.stats import describe

__all__ = [
    "ENSEMBLE_SPLITTERS",
    "EnsembleError",
    "FoldEnsemble",
    "checkpoint_ensemble",
    "fold_ensemble",
    "fold_ensembles",
]

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


def _test_hash(found: OOFSet) -> str:
    """The one test part every fold's manifest records (refusing folds from different splits)."""
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
    return str(next(iter(hashes.values())))


def _combine(
    found: OOFSet,
    index: np.ndarray,
    target: np.ndarray | None,
    kind: str,
    outputs: dict[int, np.ndarray],
    average: Average,
) -> FoldEnsemble:
    """Average the folds' outputs on the test part and score the ensemble next to the folds."""
    fold_scores = {fold: prediction_metrics(target, out, kind) for fold, out in outputs.items()}
    stacked = np.stack([np.asarray(o, dtype=np.float64) for _, o in sorted(outputs.items())])
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


def _ensemble(found: OOFSet, average: Average) -> FoldEnsemble:
    expected = _test_hash(found)
    outputs = {}
    index = target = None
    kind = "values"
    for fold, job_dir in sorted(found.folds.items()):
        rows = read_predictions(predictions_path(job_dir, "test"))
        if part_hash(rows["index"]) != expected:
            raise EnsembleError(
                f"fold ensemble {found.name!r}: {predictions_path(job_dir, 'test')} is not the test part of its "
                "split manifest (written by another run or a partial pass)"
            )
        if index is None:
            index, target, kind = rows["index"], rows.get("target"), rows.get("kind", "values")
        outputs[fold] = rows["output"]
    assert index is not None
    return _combine(found, index, target, kind, outputs, average)


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
        except (OSError, ValueError) as err:  # an unreadable predictions file
            out.append(EnsembleError(f"fold ensemble {found.name!r}: {type(err).__name__}: {err}"))
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
    from lightning_freeze.splitrun.jobs import collect_jobs

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


def checkpoint_ensemble(
    sweep_dir: str | Path,
    load_model: Callable[[Path], Any],
    dataset: Any,
    *,
    name: str | None = None,
    average: Average = "probs",
    checkpoint: str = "checkpoints/last.ckpt",
    labels: Any = "auto",
    groups: Any = None,
    batch_size: int = 256,
) -> FoldEnsemble:
    """The fold ensemble of a k-fold sweep, from each fold's checkpoint: each model predicts the test part again.

    The test part is the sweep's own: the splitter in the folds' manifests is rebuilt and applied to
    ``dataset`` (with ``labels``/``groups`` as the datamodule had them), and its test part must have the hash the
    manifests record, else the dataset or labels given are not the sweep's and the ensemble is refused.

    Args:
        sweep_dir: the sweep root.
        load_model: checkpoint path -> model in eval mode, e.g. ``DigitsClassifier.load_from_checkpoint``.
        dataset: the sweep's dataset (map-style; items ``(x, y)`` or dicts with a ``labels`` entry).
        name: which set of folds when the sweep holds several (see :func:`fold_ensemble`).
        average: ``"probs"`` or ``"logits"``.
        checkpoint: each fold's checkpoint, relative to its job dir (the app's ``checkpoints/last.ckpt``).
        labels: one label per sample, or a dataset field name; ``"auto"`` reads ``targets``, ``labels`` or
            ``y`` (what stratified splits need to be rebuilt).
        groups: one group id per sample, or a dataset field name (grouped splits).
        batch_size: samples per forward pass.

    Raises:
        EnsembleError: a fold or its checkpoint is missing, the folds come from different splits, or
            ``dataset`` does not reproduce the sweep's test part.
    """
    from lightning_freeze.splitrun import splitters
    from lightning_freeze.splitrun.jobs import collect_jobs

    sets = oof_sets(collect_jobs(sweep_dir), stage="test", splitters=ENSEMBLE_SPLITTERS, requires=checkpoint)
    chosen = sets if name is None else [s for s in sets if s.name == name or name in s.name.split(", ")]
    if len(chosen) != 1:
        raise EnsembleError(
            f"{sweep_dir}: {len(chosen)} sets of folds match (of {[s.name for s in sets]}); "
            + ("none holds a k-fold sweep" if not sets else "pass name= to pick one")
        )
    found = chosen[0]
    expected = _test_hash(found)
    manifest = next(iter(found.manifests.values()))
    spec = dict(manifest["spec"])
    splitter = getattr(splitters, spec.pop("kind"))(**spec)

    def field(value: Any, option: str) -> np.ndarray | None:
        """A per-sample input: an array, or a dataset field by name (``auto`` labels: targets/labels/y)."""
        if value is None or not isinstance(value, str):
            return None if value is None else np.asarray(value)
        names = ("targets", "labels", "y") if value == "auto" and option == "labels" else (value,)
        for field_name in names:
            if hasattr(dataset, field_name):
                return np.asarray(getattr(dataset, field_name))
        if value == "auto":
            return None
        raise EnsembleError(
            f"checkpoint_ensemble: {option}={value!r} names no field of {type(dataset).__name__}"
        )

    extra = {k: field(v, k) for k, v in splitter.per_sample_inputs().items()}
    parts = splitter.split(
        len(dataset), field(labels, "labels"), field(groups, "groups"), manifest["seed"], **extra
    )
    if not parts.has("test") or parts.hashes[parts.roles["test"]] != expected:
        raise EnsembleError(
            f"checkpoint_ensemble: {spec} on the dataset given does not reproduce the sweep's test part (hash "
            f"{expected[:12]}); pass the sweep's dataset, labels and groups"
        )
    index = parts.role("test")
    outputs, target = {}, None
    for fold, job_dir in sorted(found.folds.items()):
        model = load_model(job_dir / checkpoint)
        rows, target = _predict(model, dataset, index, batch_size)
        outputs[fold] = rows
    kind = "logits" if outputs[next(iter(outputs))].ndim == 2 else "values"
    return _combine(found, index, target, kind, outputs, average)


def _predict(
    model: Any, dataset: Any, index: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A model's outputs (and the targets) on ``dataset[index]``, in index order, without gradients."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from lightning_freeze.splitrun.predictions import batch_targets, output_tensor

    model.eval()
    outs, targets = [], []
    with torch.no_grad():
        for batch in DataLoader(Subset(dataset, index.tolist()), batch_size=batch_size):
            if isinstance(batch, Mapping):
                inputs = {
                    k: v for k, v in batch.items() if k not in ("labels", "label", "targets", "target", "y")
                }
                result = model(**inputs)
            else:
                result = model(batch[0])
            out = output_tensor(result)
            if out is None:
                raise EnsembleError("checkpoint_ensemble: the model returned no per-sample output tensor")
            outs.append(out.float().cpu().numpy())
            target = batch_targets(batch)
            targets.append(None if target is None else target.cpu().numpy())
    target = None if any(t is None for t in targets) else np.concatenate(targets)  # type: ignore[arg-type]
    return np.concatenate(outs), target
