"""Aggregate a sweep into ``summary.json``, ``summary.md`` and ``summary.png`` at the sweep root.

Every job dir holds ``metrics.json`` (written by the app: ``status``, ``metrics``, ``fit_time_s``,
``wall_time_s`` ...), ``split_manifest.json`` and Hydra's ``.hydra/overrides.yaml``. Jobs are grouped by the
overrides that vary across the sweep:

- *replicate* axes (``split.fold``, ``split.repeat``, ``seed``, ``split_seed`` by default) are averaged over:
  per metric the report gives n, mean, sample std and a 95% CI from Student's t;
- every other varying override (``freeze``, ``split.arm``, ``freeze.t0`` ...) defines a *condition*. With two
  or more conditions each one is compared with the baseline, **paired by what the split manifest says**: two
  jobs pair when they trained on the same split (the same part hashes) with the same run seed. Runs of
  ``split=kfold`` and ``split=stratified_kfold`` never pair, although both have a fold 0. Jobs without a
  manifest pair on their replicate overrides. Mean difference, its 95% CI and the two-sided paired t-test
  p-value come from ``scipy.stats.ttest_rel``; pairs that all differ by the same amount get a note instead.

Failed jobs (``status`` not ``ok``, or no ``metrics.json``) are listed and never averaged in. The library part
(this module) needs no Hydra; the Hydra callback that runs it as a sweep ends is
``lightning_freeze.app.sweep.SweepSummary``.

    lightning-freeze-report multirun/2026-01-01/12-00-00 [--baseline freeze=none]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_freeze.splitrun.decision import (
    best_condition,
    default_metric,
    is_higher_better,
    nested_selection,
    optuna_best,
)
from lightning_freeze.splitrun.jobs import (
    EXTRA_METRICS,
    METRICS_FILE,
    REPLICATE_KEYS,
    Job,
    NoJobsError,
    collect_jobs,
    optimized_metric,
)
from lightning_freeze.splitrun.prediction_files import predictions_path
from lightning_freeze.splitrun.stats import describe, paired

__all__ = [
    "EXTRA_METRICS",
    "REPLICATE_KEYS",
    "Job",
    "NoJobsError",
    "cli",
    "collect_jobs",
    "json_ready",
    "metric_range",
    "summarize",
    "to_markdown",
    "write_summary",
]

log = logging.getLogger(__name__)

SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats as None, so the JSON written is always valid.

    Args:
        value: a JSON-like value (mappings, lists, tuples, scalars).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- the summary


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def metric_range(values: Sequence[float]) -> tuple[float, float]:
    """The range a metric lives in, judged from its values: [0, 1] when they all lie there (accuracy, F1,
    fractions), [0, inf) when none is negative (losses, times), else unbounded. CIs are drawn clipped to it.

    Args:
        values: the metric's values across jobs.
    """
    if values and all(0.0 <= v <= 1.0 for v in values):
        return (0.0, 1.0)
    if values and all(v >= 0.0 for v in values):
        return (0.0, math.inf)
    return (-math.inf, math.inf)


def summarize(
    jobs: Sequence[Job],
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
    baseline: str | None = None,
    metric: str | None = None,
    direction: str | None = None,
) -> dict[str, Any]:
    """The summary dict: conditions x metrics statistics, paired comparisons, failed jobs.

    Args:
        jobs: the sweep's jobs (:func:`collect_jobs`).
        replicate_keys: overrides averaged over (folds, repeats, seeds); every other varying override
            defines a condition.
        baseline: the condition the others are compared with (a condition label or one ``key=value`` of it);
            default: a condition with ``=none``, else the first.
        metric: the metric the best condition is chosen on (default: the sweep's ``optimized_metric``, else the
            first ``val/`` metric where higher is better).
        direction: ``"maximize"`` or ``"minimize"`` (default: from the metric's name; losses and errors are
            minimised).
    """
    ok = [j for j in jobs if j.status == "ok"]
    failed = [
        {"dir": str(j.path), "status": j.status, "overrides": j.overrides, "error": j.error}
        for j in jobs
        if j.status != "ok"
    ]
    keys = sorted({k for j in jobs for k in j.overrides})
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    replicate = [k for k in varying if k in replicate_keys]
    compare = [k for k in varying if k not in replicate_keys]
    by_manifest = bool(ok) and all(j.split_key is not None for j in ok)

    def label(job: Job) -> str:
        return ", ".join(f"{k}={job.overrides.get(k)}" for k in compare) or "all"

    def pair_key(job: Job) -> tuple[Any, ...]:
        return job.split_key if by_manifest else tuple(job.overrides.get(k) for k in replicate)  # type: ignore[return-value]

    def replicate_of(job: Job) -> dict[str, Any]:
        return {k: job.overrides.get(k) for k in replicate}

    groups: dict[str, list[Job]] = {}
    for job in sorted(ok, key=lambda j: [_natural(str(j.overrides.get(k))) for k in compare]):
        groups.setdefault(label(job), []).append(job)
    metric_names = sorted({m for j in ok for m in j.metrics}, key=lambda m: (m in EXTRA_METRICS, m))
    conditions = [
        {
            "condition": name,
            "overrides": {k: members[0].overrides.get(k) for k in compare},
            "n": len(members),
            "replicates": [replicate_of(j) for j in members],
            "splits": [j.split for j in members],
            "metrics": {m: describe([j.metrics[m] for j in members if m in j.metrics]) for m in metric_names},
        }
        for name, members in groups.items()
    ]
    comparisons = []
    names = list(groups)
    base = _pick_baseline(names, baseline) if names else None
    if len(names) >= 2:
        conditions.sort(key=lambda c: c["condition"] != base)  # the baseline first

        def unique_keys(members: list[Job]) -> dict[tuple[Any, ...], Job]:
            seen: dict[tuple[Any, ...], list[Job]] = {}
            for j in members:
                seen.setdefault(pair_key(j), []).append(j)
            return {k: js[0] for k, js in seen.items() if len(js) == 1}  # an ambiguous key pairs nothing

        by_key = {name: unique_keys(members) for name, members in groups.items()}
        for name in names:
            if name == base:
                continue
            common = sorted(
                set(by_key[base]) & set(by_key[name]),
                key=lambda k: [_natural(str(v)) for v in replicate_of(by_key[base][k]).values()],
            )
            for m in metric_names:
                pairs = [(by_key[base][k], by_key[name][k]) for k in common]
                pairs = [(b, o) for b, o in pairs if m in b.metrics and m in o.metrics]
                result = paired([b.metrics[m] for b, _ in pairs], [o.metrics[m] for _, o in pairs])
                result.update(
                    metric=m,
                    baseline=base,
                    other=name,
                    pairs=[replicate_of(b) for b, _ in pairs],
                    unpaired=len(groups[base]) + len(groups[name]) - 2 * len(pairs),
                )
                if not pairs:
                    result["note"] = (
                        "no pairs: no job of the two conditions trained on the same split and seed"
                    )
                comparisons.append(result)
    if direction not in (None, "maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    if metric is not None and metric_names and metric not in metric_names:
        raise ValueError(f"metric {metric!r} is not a metric of this sweep; its metrics are {metric_names}")
    if metric is None:  # the sweep's optimized_metric when its jobs produced it, else a validation metric
        configured = optimized_metric(ok)
        metric = configured if configured in metric_names else default_metric(metric_names, EXTRA_METRICS)
    higher = (direction == "maximize") if direction else (metric is not None and is_higher_better(metric))
    decision = None if metric is None else best_condition(groups, metric, higher, pair_key)
    nested = None
    if metric is not None and metric.startswith("val/"):
        nested = nested_selection(ok, label, metric, higher)
    return {
        "decision": decision,
        "nested": nested,
        "n_jobs": len(jobs),
        "n_ok": len(ok),
        "failed": failed,
        "replicate_axes": replicate,
        "compare_axes": compare,
        "paired_by": "split manifest (part hashes) and run seed" if by_manifest else f"overrides {replicate}",
        "baseline": base,
        "metrics": metric_names,
        "metric_ranges": {
            m: list(metric_range([j.metrics[m] for j in ok if m in j.metrics])) for m in metric_names
        },
        "conditions": conditions,
        "comparisons": comparisons,
    }


def _pick_baseline(names: Sequence[str], baseline: str | None) -> str:
    if baseline:
        hits = [n for n in names if baseline == n or baseline in n.split(", ")]
        if not hits:
            raise ValueError(
                f"baseline {baseline!r} matches no condition of this sweep; its conditions are {list(names)}"
            )
        return hits[0]
    for n in names:  # "freeze=none" (full fine-tuning) is the natural baseline
        if any(part.endswith("=none") for part in n.split(", ")):
            return n
    return names[0]


# ----------------------------------------------------------------------------------------------- output


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _decision_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The decision sections: best condition, Optuna's best trial, nested CV, OOF sets, fold ensembles."""
    lines: list[str] = []
    best = summary.get("decision")
    if best:
        line = (
            f"**Best condition on {best['metric']} ({best['direction']}): {best['best']}**, mean "
            f"{_fmt(best['mean'])}, 95% CI {_ci(best['ci95'])}, n={best['n']}"
        )
        comparison = best.get("comparison")
        if best.get("runner_up") is not None and comparison is not None:
            verdict = (
                "not tested"
                if best["significant"] is None
                else "significantly better"
                if best["significant"]
                else "not significantly better"
            )
            line += (
                f"; {verdict} than the runner-up {best['runner_up']} ({_fmt(best['runner_up_mean'])}): paired "
                f"difference {_fmt(comparison['mean_diff'])}, 95% CI {_ci(comparison['ci95'])}, "
                f"p={_fmt(comparison['p_value'], 3)}, {comparison['pairs']} pairs"
                + (f" ({comparison['note']})" if comparison.get("note") else "")
            )
        lines += ["## Decision", "", line + ".", ""]
    optuna = summary.get("optuna")
    if optuna:
        overrides = " ".join(f"{k}={v}" for k, v in optuna["overrides"].items())
        lines += [
            f"Optuna's best trial: value {_fmt(optuna['best_value'])} with `{overrides}`, run dir "
            f"{optuna['run_dir'] or '(not found)'}.",
            "",
        ]
    nested = summary.get("nested")
    if nested:
        est = nested["estimate"]
        lines += [
            f"## Nested cross-validation (select on {nested['selection_metric']} of inner folds only, score on "
            f"{nested['score_metric']} of the outer test fold)",
            "",
            "| outer fold | selected | inner score | outer score | test part held out |",
            "|---|---|---|---|---|",
        ]
        for fold in nested["outer_folds"]:
            lines.append(
                f"| {fold['outer_fold']} | {fold['selected']} | {_fmt(fold['inner_scores'][fold['selected']])} | "
                f"{_fmt(fold['outer_score'])} | {'yes' if fold['test_part_held_out'] else 'NO'} |"
            )
        naive = nested.get("naive_best") or {}
        lines += [
            "",
            f"Nested estimate ({nested['score_metric']}): {_fmt(est['mean'])}, 95% CI {_ci(est['ci95'])}, "
            f"n={est['n']} outer folds; naive best: {naive.get('condition')} with {naive.get('metric')} "
            f"{_fmt(naive.get('mean'))} (selected and scored on the same validation folds: optimistic).",
            "",
        ]
    if summary.get("oof"):
        lines += [
            "## Out-of-fold predictions",
            "",
            "| set | folds | samples | metrics | file |",
            "|---|---|---|---|---|",
        ]
        for entry in summary["oof"]:
            if entry["complete"]:
                metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in entry.get("metrics", {}).items()) or "-"
                lines.append(
                    f"| {entry['name']} | {entry['k']} | {entry['n']} | {metrics} | {entry['file']} |"
                )
            else:
                lines.append(
                    f"| {entry['name']} | {entry['k']} | - | incomplete, no OOF score: {'; '.join(entry['missing'])} | - |"
                )
        lines.append("")
    if summary.get("ensembles"):
        lines += [
            "## Fold ensembles on the test part",
            "",
            "| set | folds | average | metric | ensemble | folds' mean | folds' 95% CI |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in summary["ensembles"]:
            if "error" in entry:
                lines.append(f"| - | - | - | - | not made: {entry['error']} | - | - |")
                continue
            for name, value in entry["metrics"].items():
                folds = entry["fold_metrics"].get(name, {})
                lines.append(
                    f"| {entry['name']} | {entry['n_folds']} | {entry['average']} | test/{name} | {_fmt(value)} | "
                    f"{_fmt(folds.get('mean'))} | {_ci(folds.get('ci95'))} |"
                )
        lines.append("")
    return lines


def to_markdown(summary: Mapping[str, Any], title: str = "Sweep summary") -> str:
    """The summary as a Markdown document (what ``summary.md`` holds and the CLI prints).

    Args:
        summary: what :func:`summarize` returned.
        title: the document's heading.
    """
    lines = [f"# {title}", ""]
    lines.append(
        f"{summary['n_ok']} of {summary['n_jobs']} jobs ok; averaged over "
        f"{', '.join(summary['replicate_axes']) or 'nothing (one job per condition)'}; "
        f"conditions by {', '.join(summary['compare_axes']) or '-'}."
    )
    lines.append("")
    for m in summary["metrics"]:
        lines += [f"## {m}", "", "| condition | n | mean | std | 95% CI |", "|---|---|---|---|---|"]
        for c in summary["conditions"]:
            s = c["metrics"].get(m)
            if s and s["n"]:
                lines.append(
                    f"| {c['condition']} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_ci(s['ci95'])} |"
                )
        lines.append("")
    if summary["comparisons"]:
        lines += [
            f"## Paired comparisons (other - baseline, paired by {summary['paired_by']})",
            "",
            "| metric | baseline | other | n pairs | mean diff | 95% CI | t | p | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["comparisons"]:
            lines.append(
                f"| {r['metric']} | {r['baseline']} | {r['other']} | {r['n']} | {_fmt(r['mean_diff'])} | {_ci(r['ci95'])} "
                f"| {_fmt(r['t'], 3)} | {_fmt(r['p_value'], 3)} | {r['note'] or ''} |"
            )
        lines.append("")
    lines += _decision_markdown(summary)
    if summary["failed"]:
        lines += [
            "## Failed jobs (not averaged)",
            "",
            "| job dir | status | overrides | error |",
            "|---|---|---|---|",
        ]
        for f in summary["failed"]:
            ov = " ".join(f"{k}={v}" for k, v in f["overrides"].items())
            err = (f["error"] or "").splitlines()[0][:120] if f["error"] else ""
            lines.append(f"| {f['dir']} | {f['status']} | {ov} | {err} |")
        lines.append("")
    return "\n".join(lines)


def plot(
    summary: Mapping[str, Any],
    path: Path,
    max_metrics: int = 4,
    oof: Mapping[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> bool:
    """One panel per metric: a point per job, lines joining the same replicate (legend) across conditions, and
    the mean with its 95% CI (black), clipped to the metric's range. With fold ensembles, a panel of the folds'
    test scores against the ensemble's; with OOF class predictions, the first set's OOF confusion matrix.

    Args:
        summary: what :func:`summarize` returned.
        path: the PNG to write (atomically).
        max_metrics: the most metric panels drawn (extra metrics such as times come last).
        oof: OOF set name -> (targets, class probabilities or None), for the confusion matrix.

    Returns:
        False when matplotlib is missing or there is nothing to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return False
    metrics = [m for m in summary["metrics"] if m not in EXTRA_METRICS][:max_metrics] or summary["metrics"][
        :1
    ]
    conds = summary["conditions"]
    if not metrics or not conds:
        return False
    ensembles = [e for e in summary.get("ensembles") or [] if "error" not in e]
    confusion = next(((name, t, p) for name, (t, p) in (oof or {}).items() if p is not None), None)
    panels = len(metrics) + bool(ensembles) + bool(confusion)
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.8), squeeze=False)
    extra_axes = list(axes[0][len(metrics) :])
    if ensembles:
        _plot_ensembles(extra_axes.pop(0), ensembles)
    if confusion:
        _plot_confusion(extra_axes.pop(0), *confusion)
    for ax, m in zip(axes[0], metrics, strict=False):
        low, high = summary["metric_ranges"].get(m, (-math.inf, math.inf))
        series: dict[str, list[tuple[int, float]]] = {}
        for x, c in enumerate(conds):
            s = c["metrics"].get(m)
            if not s or not s["n"]:
                continue
            for rep, v in zip(c["replicates"], s["values"], strict=False):
                name = ", ".join(f"{k}={v}" for k, v in rep.items()) or "job"
                series.setdefault(name, []).append((x, v))
            if s["ci95"] is not None:
                lo, hi = max(s["ci95"][0], low), min(s["ci95"][1], high)
                err = [[s["mean"] - lo], [hi - s["mean"]]]
            else:
                err = None
            ax.errorbar([x + 0.18], [s["mean"]], yerr=err, fmt="s", color="black", capsize=4, zorder=3)
        for name, pts in series.items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-", alpha=0.6, markersize=4, label=name)
        ax.set_xticks(range(len(conds)))
        ax.set_xticklabels([c["condition"] for c in conds], rotation=20, ha="right", fontsize=8)
        ax.set_title(m)
        ax.grid(alpha=0.3)
        if 1 < len(series) <= 12:
            ax.legend(title=", ".join(summary["replicate_axes"]) or None, fontsize=7, title_fontsize=7)
    fig.suptitle("per job (points, joined by replicate) and mean with 95% CI (black)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _plot_ensembles(ax: Any, ensembles: Sequence[Mapping[str, Any]]) -> None:
    """Folds' test scores (points, mean with CI) next to the ensemble's score (a star), per set and metric."""
    ticks = []
    for entry in ensembles:
        name = next((m for m in ("acc", "mse") if m in entry["metrics"]), next(iter(entry["metrics"]), None))
        if name is None:
            continue
        x = len(ticks)
        folds = entry["fold_metrics"].get(name) or {}
        values = folds.get("values") or []
        ax.plot([x - 0.1] * len(values), values, "o", color="tab:blue", alpha=0.6, markersize=4)
        if folds.get("ci95"):
            low, high = folds["ci95"]
            ax.errorbar(
                [x],
                [folds["mean"]],
                yerr=[[folds["mean"] - low], [high - folds["mean"]]],
                fmt="s",
                color="black",
                capsize=4,
            )
        ax.plot([x + 0.15], [entry["metrics"][name]], "*", color="tab:red", markersize=12)
        ticks.append(f"{entry['name']}\ntest/{name}")
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels(ticks, fontsize=7)
    ax.set_title("folds (o, mean+CI) vs ensemble (*)")
    ax.grid(alpha=0.3)


def _plot_confusion(ax: Any, name: str, target: np.ndarray, probs: np.ndarray) -> None:
    """The OOF confusion matrix of one set, as row-normalised shares."""
    classes = probs.shape[1]
    truth = np.asarray(target).astype(np.int64).reshape(-1)
    counts = np.bincount(truth * classes + probs.argmax(axis=1), minlength=classes * classes).reshape(
        classes, classes
    )
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(classes):
        for j in range(classes):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shares[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("target")
    ax.set_title(f"OOF confusion ({name})", fontsize=9)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _oof_and_ensembles(
    root: Path, jobs: Sequence[Job], ensemble: bool, average: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Merge each OOF set into ``oof_predictions[.<set>].npz`` and score it; score the fold ensembles.

    Returns the summary entries and, for the plot, the arrays (OOF targets and probabilities per set).
    """
    from lightning_freeze.splitrun.ensemble import EnsembleError, fold_ensembles
    from lightning_freeze.splitrun.oof import (
        OOF_FILE,
        IncompleteOOFError,
        merge_oof,
        oof_sets,
        prediction_metrics,
        probabilities,
    )

    oof_entries, arrays = [], {}
    sets = oof_sets(jobs)
    for found in sets:
        entry: dict[str, Any] = {
            "name": found.name,
            "k": found.k,
            "complete": found.complete,
            "missing": found.missing,
        }
        if found.complete:
            try:
                oof = merge_oof(found)
            except (
                IncompleteOOFError,
                OSError,
                ValueError,
            ) as err:  # a set it cannot merge, or an unreadable file
                entry.update(complete=False, missing=[f"{type(err).__name__}: {err}"])
            else:
                slug = (
                    ""
                    if len(sets) == 1
                    else "." + "".join(c if c.isalnum() or c in "-_=." else "_" for c in found.name)
                )
                path = root / OOF_FILE.replace(".npz", f"{slug}.npz")
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
                data = {"index": oof.index, "output": oof.output, "fold": oof.fold, "kind": np.str_(oof.kind)}
                if oof.target is not None:
                    data["target"] = oof.target
                np.savez(tmp, **data)
                os.replace(tmp, path)
                entry.update(
                    file=path.name,
                    n=int(oof.index.size),
                    metrics={
                        f"oof/{k}": v for k, v in prediction_metrics(oof.target, oof.output, oof.kind).items()
                    },
                )
                if oof.target is not None:
                    arrays[found.name] = (oof.target, probabilities(oof.output, oof.kind))
        oof_entries.append(entry)
    ensembles: list[dict[str, Any]] = []
    if ensemble:
        for result in fold_ensembles(jobs, average):  # type: ignore[arg-type]
            if isinstance(result, EnsembleError):
                ensembles.append({"error": str(result)})
            else:
                ensembles.append(result.as_dict())
    return oof_entries, ensembles, arrays


def write_summary(
    sweep_dir: str | Path,
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
    baseline: str | None = None,
    with_plot: bool = True,
    *,
    metric: str | None = None,
    direction: str | None = None,
    ensemble: bool | None = None,
    average: str = "probs",
) -> dict[str, Any]:
    """Collect the jobs of ``sweep_dir`` and write summary.json / summary.md / summary.png there.

    Besides the conditions' statistics, the summary names the best condition (:func:`summarize`), merges
    out-of-fold predictions into ``oof_predictions.npz`` and scores them, and scores the fold ensembles.

    Raises ``FileNotFoundError`` for a missing dir, :class:`NoJobsError` when it holds no job and ``ValueError``
    for an unknown ``baseline`` or ``metric``, before anything is written.

    Args:
        sweep_dir: the sweep root.
        replicate_keys: overrides averaged over (see :func:`summarize`).
        baseline: the condition the others are compared with (see :func:`summarize`).
        with_plot: also write ``summary.png``.
        metric: the metric the best condition is chosen on (see :func:`summarize`).
        direction: ``"maximize"`` or ``"minimize"`` (see :func:`summarize`).
        ensemble: score fold ensembles on the test part (None: when the jobs recorded test predictions;
            True: also report why an ensemble cannot be made).
        average: the ensembles' average: ``"probs"`` or ``"logits"``.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep dir {root}")
    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
    jobs = collect_jobs(root)
    if not jobs:
        raise NoJobsError(
            f"{root} holds no job of a sweep (no {METRICS_FILE} and no .hydra/ in any subdirectory)"
        )
    summary = summarize(jobs, replicate_keys, baseline, metric, direction)
    summary["sweep_dir"] = str(root)
    summary["optuna"] = optuna_best(root, jobs)
    if ensemble is None:
        ensemble = any(predictions_path(j.path, "test").is_file() for j in jobs)
    summary["oof"], summary["ensembles"], oof_arrays = _oof_and_ensembles(root, jobs, ensemble, average)
    _write_atomic(root / "summary.json", json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n")
    _write_atomic(root / "summary.md", to_markdown(summary, f"Sweep summary: {root}") + "\n")
    if with_plot:
        plot(summary, root / "summary.png", oof=oof_arrays)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """``lightning-freeze-report SWEEP_DIR [options]``: write the summary files and print the Markdown.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 when at least one job succeeded.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-freeze-report", description="Summarise a Hydra sweep dir (summary.json/.md/.png)."
    )
    parser.add_argument("sweep_dir")
    parser.add_argument(
        "--replicate",
        default=",".join(REPLICATE_KEYS),
        help="comma-separated overrides averaged over (default: %(default)s)",
    )
    parser.add_argument(
        "--baseline", default=None, help="the condition others are compared with, e.g. freeze=none"
    )
    parser.add_argument(
        "--metric",
        default=None,
        help="the metric the best condition is chosen on (default: optimized_metric)",
    )
    parser.add_argument("--direction", choices=("maximize", "minimize"), default=None)
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="average the folds' test predictions (predictions.test.npz) into a fold ensemble and score it",
    )
    parser.add_argument(
        "--ensemble-average",
        choices=("probs", "logits"),
        default="probs",
        help="average the folds' probabilities or their logits (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        summary = write_summary(
            args.sweep_dir,
            [k for k in args.replicate.split(",") if k],
            args.baseline,
            metric=args.metric,
            direction=args.direction,
            ensemble=True if args.ensemble else None,
            average=args.ensemble_average,
        )
    except FileNotFoundError as err:
        parser.error(f"{err}; pass the sweep dir of a multirun (hydra.sweep.dir)")
    except ValueError as err:  # NoJobsError, an unknown --baseline or --metric
        hint = (
            "; fix --baseline" if "baseline" in str(err) else "; fix --metric" if "metric" in str(err) else ""
        )
        parser.error(str(err) + hint)
    if args.ensemble and not any("error" not in e for e in summary["ensembles"]):
        reasons = "; ".join(e["error"] for e in summary["ensembles"]) or (
            "the sweep has no k-fold jobs with a fixed test part and recorded test predictions (run the folds "
            "with split.test_ratio > 0 and PredictionRecorder)"
        )
        parser.error(f"--ensemble: no fold ensemble can be made here: {reasons}")
    print(to_markdown(summary, f"Sweep summary: {args.sweep_dir}"))
    return 0 if summary["n_ok"] else 1


if __name__ == "__main__":
    sys.exit(cli())
