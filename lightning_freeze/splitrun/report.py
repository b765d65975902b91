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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

REPLICATE_KEYS = ("split.fold", "split.repeat", "seed", "split_seed")
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "split_manifest.json"
# Per-job numbers recorded next to the metrics: fit time apart from the wall time (which includes one-time setup
# such as the demo's pretraining).
EXTRA_METRICS = ("trainable_fraction", "fit_time_s", "wall_time_s")
SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")


class NoJobsError(ValueError):
    """The directory holds no job of a sweep (no ``metrics.json`` and no ``.hydra/`` below it)."""


# ----------------------------------------------------------------------------------------------- sweep files


@dataclass
class Job:
    """One job dir of a sweep: its overrides, status, flat metrics and what its split was.

    Args:
        path: the job dir.
        overrides: the job's Hydra overrides as ``key -> value`` strings.
        status: ``ok``, ``failed``, ``interrupted``, ``missing`` or ``unreadable``.
        metrics: the job's numeric metrics (``val/acc`` ...) and times.
        error: the error of a job that did not succeed.
        split_key: the part hashes of its split manifest, the split seed and the run seed (pairs jobs).
        split: a short description of the split, for the tables.
    """

    path: Path
    overrides: dict[str, str]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    split_key: tuple[Any, ...] | None = None  # the part hashes of its split manifest and its run seed
    split: str | None = None  # a short description of that split, for the tables


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


def _parse_overrides(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _read_overrides(job_dir: Path, metrics: Mapping[str, Any] | None) -> dict[str, str]:
    if metrics and metrics.get("overrides") is not None:
        return _parse_overrides(metrics["overrides"])
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        import yaml

        return _parse_overrides(yaml.safe_load(path.read_text()) or [])
    return {}


def _split_identity(job_dir: Path, seed: Any) -> tuple[tuple[Any, ...] | None, str | None]:
    path = job_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        hashes = tuple(sorted((str(name), str(part["sha256"])) for name, part in manifest["parts"].items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    spec = manifest.get("spec") or {}
    kind = spec.get("kind", "?")
    where = "".join(f" {k}={spec[k]}" for k in ("repeat", "fold") if k in spec)
    return (hashes, manifest.get("seed"), seed), f"{kind}{where} split_seed={manifest.get('seed')}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job dir under ``sweep_dir`` (a dir with ``metrics.json`` or ``.hydra/``), sorted naturally.

    Args:
        sweep_dir: the sweep root (Hydra's ``hydra.sweep.dir``).
    """
    root = Path(sweep_dir)
    dirs = {p.parent for p in root.rglob(METRICS_FILE)} | {
        p.parent for p in root.rglob(".hydra") if p.is_dir()
    }
    dirs.discard(root)
    jobs = []
    for job_dir in sorted(
        dirs, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts]
    ):
        data: dict[str, Any] | None = None
        path = job_dir / METRICS_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                jobs.append(Job(job_dir, _read_overrides(job_dir, None), "unreadable", error=str(err)))
                continue
        overrides = _read_overrides(job_dir, data)
        if data is None:
            jobs.append(
                Job(job_dir, overrides, "missing", error=f"no {METRICS_FILE} (the job died or is running)")
            )
            continue
        metrics = {k: float(v) for k, v in (data.get("metrics") or {}).items() if _is_number(v)}
        metrics.update({k: float(data[k]) for k in EXTRA_METRICS if _is_number(data.get(k))})
        key, split = _split_identity(job_dir, data.get("seed"))
        jobs.append(
            Job(
                job_dir, overrides, str(data.get("status", "unknown")), metrics, data.get("error"), key, split
            )
        )
    return jobs


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
    jobs: Sequence[Job], replicate_keys: Sequence[str] = REPLICATE_KEYS, baseline: str | None = None
) -> dict[str, Any]:
    """The summary dict: conditions x metrics statistics, paired comparisons, failed jobs.

    Args:
        jobs: the sweep's jobs (:func:`collect_jobs`).
        replicate_keys: overrides averaged over (folds, repeats, seeds); every other varying override
            defines a condition.
        baseline: the condition the others are compared with (a condition label or one ``key=value`` of it);
            default: a condition with ``=none``, else the first.
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
    return {
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


def plot(summary: Mapping[str, Any], path: Path, max_metrics: int = 4) -> bool:
    """One panel per metric: a point per job, lines joining the same replicate (legend) across conditions, and
    the mean with its 95% CI (black), clipped to the metric's range.

    Args:
        summary: what :func:`summarize` returned.
        path: the PNG to write (atomically).
        max_metrics: the most metric panels drawn (extra metrics such as times come last).

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
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(
    sweep_dir: str | Path,
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
    baseline: str | None = None,
    with_plot: bool = True,
) -> dict[str, Any]:
    """Collect the jobs of ``sweep_dir`` and write summary.json / summary.md / summary.png there.

    Raises ``FileNotFoundError`` for a missing dir, :class:`NoJobsError` when it holds no job and ``ValueError``
    for an unknown ``baseline``, before anything is written.

    Args:
        sweep_dir: the sweep root.
        replicate_keys: overrides averaged over (see :func:`summarize`).
        baseline: the condition the others are compared with (see :func:`summarize`).
        with_plot: also write ``summary.png``.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep dir {root}")
    jobs = collect_jobs(root)
    if not jobs:
        raise NoJobsError(
            f"{root} holds no job of a sweep (no {METRICS_FILE} and no .hydra/ in any subdirectory)"
        )
    summary = summarize(jobs, replicate_keys, baseline)
    summary["sweep_dir"] = str(root)
    _write_atomic(root / "summary.json", json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n")
    _write_atomic(root / "summary.md", to_markdown(summary, f"Sweep summary: {root}") + "\n")
    if with_plot:
        plot(summary, root / "summary.png")
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
    args = parser.parse_args(argv)
    try:
        summary = write_summary(args.sweep_dir, [k for k in args.replicate.split(",") if k], args.baseline)
    except FileNotFoundError as err:
        parser.error(f"{err}; pass the sweep dir of a multirun (hydra.sweep.dir)")
    except ValueError as err:  # NoJobsError, an unknown --baseline
        parser.error(str(err) + ("; fix --baseline" if "baseline" in str(err) else ""))
    print(to_markdown(summary, f"Sweep summary: {args.sweep_dir}"))
    return 0 if summary["n_ok"] else 1


if __name__ == "__main__":
    sys.exit(cli())
