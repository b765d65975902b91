"""The decision a sweep supports: the best condition with its CI and whether it beats the runner-up, the
best Optuna trial, and nested cross-validation's honest estimate.

- :func:`best_condition`: the condition with the best mean of one metric (``optimized_metric``, or a chosen
  metric and direction), its 95% CI, and the paired comparison with the runner-up (paired by split, as the
  summary's comparisons are).
- :func:`optuna_best`: the trial Hydra's Optuna sweeper reported (``optimization_results.yaml``), with its
  overrides and run dir.
- :func:`nested_selection`: for a ``NestedKFold`` sweep, the condition selected in each outer fold from the
  inner folds' validation scores only, scored on that outer fold's test part; their mean is the unbiased
  estimate, reported next to the naive best (selected and scored on the same validation data). Selection
  reads only the selection metric (``val/...``); the manifests show that every job it reads had the outer
  fold's test part as its held-out test part.

No torch; scipy only through :mod:`lightning_freeze.splitrun.stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_freeze.splitrun.stats import describe, paired

__all__ = [
    "SIGNIFICANCE",
    "best_condition",
    "default_metric",
    "is_higher_better",
    "nested_selection",
    "optuna_best",
    "score_metric_of",
]

SIGNIFICANCE = 0.05  # the two-sided paired test's level for "significantly better than the runner-up"


def is_higher_better(metric: str) -> bool:
    """Whether larger is better for a metric name (losses, errors and times are minimised).

    Args:
        metric: a metric name such as ``val/acc`` or ``oof/log_loss``.
    """
    name = metric.rsplit("/", 1)[-1].lower()
    lower = ("loss", "err", "mse", "mae", "rmse", "brier", "time", "perplexity", "nll")
    return not any(word in name for word in lower)


def _better(higher: bool) -> Callable[[float, float], bool]:
    return (lambda a, b: a > b) if higher else (lambda a, b: a < b)


def best_condition(
    groups: Mapping[str, Sequence[Any]],
    metric: str,
    higher: bool,
    pair_key: Callable[[Any], Any],
) -> dict[str, Any] | None:
    """The best condition on ``metric`` with its CI and the paired test against the runner-up.

    Args:
        groups: condition label -> its successful jobs.
        metric: the metric to decide on (e.g. ``val/acc``).
        higher: whether larger is better.
        pair_key: what pairs a job of one condition with a job of another (the same split and seed).

    Returns:
        None when no condition has the metric; else a dict with ``best``, its ``mean``/``ci95``/``n``, the
        ``runner_up`` and its mean, ``comparison`` (paired runner-up - best) and ``significant``.
    """
    stats = {
        name: describe([j.metrics[metric] for j in members if metric in j.metrics])
        for name, members in groups.items()
    }
    ranked = sorted(
        (name for name, s in stats.items() if s["n"]), key=lambda n: stats[n]["mean"], reverse=higher
    )
    if not ranked:
        return None
    best = ranked[0]
    out: dict[str, Any] = {
        "metric": metric,
        "direction": "maximize" if higher else "minimize",
        "best": best,
        "mean": stats[best]["mean"],
        "ci95": stats[best]["ci95"],
        "n": stats[best]["n"],
        "runner_up": None,
        "runner_up_mean": None,
        "comparison": None,
        "significant": None,
    }
    if len(ranked) < 2:
        return out
    second = ranked[1]

    def by_key(members: Sequence[Any]) -> dict[Any, Any]:
        seen: dict[Any, list[Any]] = {}
        for job in members:
            if metric in job.metrics:
                seen.setdefault(pair_key(job), []).append(job)
        return {k: js[0] for k, js in seen.items() if len(js) == 1}

    a, b = by_key(groups[best]), by_key(groups[second])
    common = sorted(set(a) & set(b), key=str)
    result = paired([b[k].metrics[metric] for k in common], [a[k].metrics[metric] for k in common])
    result["pairs"] = len(common)
    out.update(runner_up=second, runner_up_mean=stats[second]["mean"], comparison=result)
    p = result.get("p_value")
    out["significant"] = None if p is None else bool(p < SIGNIFICANCE)
    return out


def optuna_best(sweep_dir: Path, jobs: Sequence[Any]) -> dict[str, Any] | None:
    """The best trial of an Optuna sweep (Hydra's ``optimization_results.yaml``): value, overrides, run dir.

    Args:
        sweep_dir: the sweep root.
        jobs: the sweep's jobs, to find the trial's run dir by its overrides.
    """
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    params = {str(k): str(v) for k, v in (data.get("best_params") or {}).items()}
    matches = [j for j in jobs if params and all(_same(j.overrides.get(k), v) for k, v in params.items())]
    return {
        "best_value": data.get("best_value"),
        "overrides": params,
        "run_dir": str(matches[0].path) if matches else None,
    }


def _same(value: str | None, wanted: str) -> bool:
    if value is None:
        return False
    try:
        return float(value) == float(wanted)
    except ValueError:
        return value == wanted


def score_metric_of(metric: str) -> str:
    """The test-part metric that scores a selection made on a validation metric: ``val/acc`` -> ``test/acc``.

    Args:
        metric: the selection metric; it must start with ``val``.
    """
    head, sep, rest = metric.partition("/")
    if head != "val" or not sep:
        raise ValueError(
            f"nested CV selects on a validation metric (val/...), got {metric!r}; choose one with --metric"
        )
    return f"test/{rest}"


def nested_selection(
    jobs: Sequence[Any], label: Callable[[Any], str], metric: str, higher: bool
) -> dict[str, Any] | None:
    """Nested CV: per outer fold, the condition with the best mean inner validation score, scored on the outer
    test part; their mean and CI (the unbiased estimate) next to the naive best.

    Args:
        jobs: the sweep's successful jobs; those split by ``NestedKFold`` are used.
        label: a job's condition label.
        metric: the selection metric (``val/...``); the outer score is its ``test/...`` twin.
        higher: whether larger is better.

    Returns:
        None when the sweep has no NestedKFold job.
    """
    nested = [j for j in jobs if j.manifest and (j.manifest.get("spec") or {}).get("kind") == "NestedKFold"]
    if not nested:
        return None
    score_metric = score_metric_of(metric)
    better = _better(higher)
    outer: dict[int, dict[str, list[Any]]] = {}
    for job in nested:
        fold = int(job.manifest["spec"]["outer_fold"])
        outer.setdefault(fold, {}).setdefault(label(job), []).append(job)
    folds = []
    for fold in sorted(outer):
        candidates = {}
        for name, members in outer[fold].items():
            values = [j.metrics[metric] for j in members if metric in j.metrics]
            if values:
                candidates[name] = sum(values) / len(values)
        if not candidates:
            continue
        chosen = None
        for name, value in candidates.items():
            if chosen is None or better(value, candidates[chosen]):
                chosen = name
        assert chosen is not None
        selected = outer[fold][chosen]
        test_hashes = {
            _part_hash(j.manifest, "test") for j in nested if int(j.manifest["spec"]["outer_fold"]) == fold
        }
        scores = [j.metrics[score_metric] for j in selected if score_metric in j.metrics]
        folds.append(
            {
                "outer_fold": fold,
                "selected": chosen,
                "inner_scores": candidates,
                "inner_jobs": len(selected),
                "outer_score": sum(scores) / len(scores) if scores else None,
                # every job read for the selection held this outer fold's test part out of train and val
                "test_part_held_out": len(test_hashes) == 1 and None not in test_hashes,
            }
        )
    outer_scores = [f["outer_score"] for f in folds if f["outer_score"] is not None]
    pooled: dict[str, list[float]] = {}
    for job in nested:
        if metric in job.metrics:
            pooled.setdefault(label(job), []).append(job.metrics[metric])
    naive = None
    for name, values in pooled.items():
        mean = sum(values) / len(values)
        if naive is None or better(mean, naive[1]):
            naive = (name, mean)
    return {
        "selection_metric": metric,
        "score_metric": score_metric,
        "direction": "maximize" if higher else "minimize",
        "outer_folds": folds,
        "estimate": describe(outer_scores),
        "naive_best": None if naive is None else {"condition": naive[0], "mean": naive[1], "metric": metric},
        "selection_reads": f"{metric} of inner jobs only",
    }


def _part_hash(manifest: Mapping[str, Any], role: str) -> str | None:
    name = (manifest.get("roles") or {}).get(role, role)
    return ((manifest.get("parts") or {}).get(name) or {}).get("sha256")


def default_metric(metrics: Sequence[str], extra: Sequence[str]) -> str | None:
    """The metric to decide on when none is chosen: the first ``val/`` metric where higher is better, else the
    first ``val/`` metric, else the first metric.

    Args:
        metrics: the sweep's metric names.
        extra: names that are never a decision metric (times, trainable fraction).
    """
    usable = [m for m in metrics if m not in extra]
    for pick in (
        [m for m in usable if m.startswith("val/") and is_higher_better(m)],
        [m for m in usable if m.startswith("val/")],
        usable,
    ):
        if pick:
            return pick[0]
    return None
