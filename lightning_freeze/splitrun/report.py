"""Aggregate a sweep into ``summary.json``, ``summary.md`` and ``summary.png`` at the sweep root.

Every job dir holds ``metrics.json`` (written by the app: ``status``, ``metrics``, ``wall_time_s``,
``trainable_fraction`` ...) and Hydra's ``.hydra/overrides.yaml``. Jobs are grouped by the overrides that vary
across the sweep:

- *replicate* axes (``split.fold``, ``seed``, ``split.seed`` by default) are averaged over: per metric the
  report gives n, mean, sample std and a 95% CI from Student's t;
- every other varying override (``freeze``, ``split.arm``, ``freeze.t0`` ...) defines a *condition*. With two
  or more conditions each one is compared with the baseline, paired on the replicate values (same fold, same
  seed): mean difference, its 95% CI, and the two-sided paired t-test p-value.

Failed jobs (``status`` not ``ok``, or no ``metrics.json``) are listed and never averaged in.

    python -m lightning_freeze.splitrun.report multirun/2026-01-01/12-00-00      # or lightning-freeze-report
    hydra.callbacks.splitrun_report._target_=lightning_freeze.splitrun.report.SweepSummary  # at sweep end

The statistics are pure Python (a regularised incomplete beta for the t distribution), no scipy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

__all__ = [
    "REPLICATE_KEYS",
    "SweepSummary",
    "collect_jobs",
    "describe",
    "paired",
    "summarize",
    "t_cdf",
    "t_quantile",
    "write_summary",
]

log = logging.getLogger(__name__)

REPLICATE_KEYS = ("split.fold", "seed", "split.seed")
METRICS_FILE = "metrics.json"
EXTRA_METRICS = ("trainable_fraction", "wall_time_s")


# ----------------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf` (bisection; ``t_quantile(0.975, 4) == 2.776...``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def describe(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """n, mean, sample std (ddof=1), and the ``level`` CI of the mean from Student's t."""
    vals = [float(v) for v in values]
    n = len(vals)
    out: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci95": None, "values": vals}
    if n == 0:
        return out
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n >= 2:
        std = statistics.stdev(vals)
        half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
        out["std"], out["ci95"] = std, [mean - half, mean + half]
    return out


def paired(baseline: Sequence[float], other: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Paired comparison ``other - baseline``: mean difference, its CI, t statistic, two-sided p-value."""
    if len(baseline) != len(other):
        raise ValueError("paired samples must have the same length")
    diffs = [float(o) - float(b) for b, o in zip(baseline, other, strict=True)]
    out = describe(diffs, level)
    out["mean_diff"] = out.pop("mean")
    out["t"], out["p_value"] = None, None
    n = len(diffs)
    if n >= 2:
        sd, mean = out["std"], out["mean_diff"]
        if sd == 0.0:
            out["t"] = math.copysign(math.inf, mean) if mean else 0.0
            out["p_value"] = 0.0 if mean else 1.0
        else:
            t = mean / (sd / math.sqrt(n))
            out["t"] = t
            out["p_value"] = min(1.0, 2.0 * (1.0 - t_cdf(abs(t), n - 1)))
    return out


# ----------------------------------------------------------------------------------------------- sweep files


@dataclass
class Job:
    """One job dir of a sweep: its overrides, status and flat metrics."""

    path: Path
    overrides: dict[str, str]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


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
        from omegaconf import OmegaConf

        return _parse_overrides(OmegaConf.to_container(OmegaConf.load(path)) or [])  # type: ignore[arg-type]
    return {}


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job dir under ``sweep_dir`` (a dir with ``metrics.json`` or ``.hydra/``), sorted by path."""
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
        jobs.append(Job(job_dir, overrides, str(data.get("status", "unknown")), metrics, data.get("error")))
    return jobs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def summarize(
    jobs: Sequence[Job],
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
    baseline: str | None = None,
) -> dict[str, Any]:
    """The summary dict: conditions x metrics statistics, paired comparisons, failed jobs."""
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

    def label(job: Job) -> str:
        return ", ".join(f"{k}={job.overrides.get(k)}" for k in compare) or "all"

    def rep(job: Job) -> tuple[str | None, ...]:
        return tuple(job.overrides.get(k) for k in replicate)

    groups: dict[str, list[Job]] = {}
    for job in sorted(ok, key=lambda j: [_natural(str(j.overrides.get(k))) for k in compare]):
        groups.setdefault(label(job), []).append(job)
    metric_names = sorted({m for j in ok for m in j.metrics}, key=lambda m: (m in EXTRA_METRICS, m))
    conditions = []
    for name, members in groups.items():
        conditions.append(
            {
                "condition": name,
                "overrides": {k: members[0].overrides.get(k) for k in compare},
                "n": len(members),
                "replicates": [dict(zip(replicate, rep(j), strict=True)) for j in members],
                "metrics": {
                    m: describe([j.metrics[m] for j in members if m in j.metrics]) for m in metric_names
                },
            }
        )
    comparisons = []
    names = list(groups)
    if len(names) >= 2:
        base = _pick_baseline(names, baseline)
        conditions.sort(key=lambda c: c["condition"] != base)  # the baseline first
        by_rep = {name: {rep(j): j for j in members} for name, members in groups.items()}
        for name in names:
            if name == base:
                continue
            common = sorted(
                set(by_rep[base]) & set(by_rep[name]), key=lambda r: [_natural(str(v)) for v in r]
            )
            for m in metric_names:
                pairs = [(by_rep[base][r], by_rep[name][r]) for r in common]
                pairs = [(b, o) for b, o in pairs if m in b.metrics and m in o.metrics]
                result = paired([b.metrics[m] for b, _ in pairs], [o.metrics[m] for _, o in pairs])
                result.update(
                    {
                        "metric": m,
                        "baseline": base,
                        "other": name,
                        "pairs": [dict(zip(replicate, rep(b), strict=True)) for b, _ in pairs],
                        "unpaired": len(by_rep[base]) + len(by_rep[name]) - 2 * len(pairs),
                    }
                )
                comparisons.append(result)
    return {
        "n_jobs": len(jobs),
        "n_ok": len(ok),
        "failed": failed,
        "replicate_axes": replicate,
        "compare_axes": compare,
        "metrics": metric_names,
        "conditions": conditions,
        "comparisons": comparisons,
    }


def _pick_baseline(names: Sequence[str], baseline: str | None) -> str:
    if baseline:
        hits = [n for n in names if baseline == n or baseline in n.split(", ")]
        if not hits:
            raise ValueError(f"baseline {baseline!r} matches no condition; conditions are {list(names)}")
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
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def to_markdown(summary: Mapping[str, Any], title: str = "Sweep summary") -> str:
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
            if not s or not s["n"]:
                continue
            ci = "-" if s["ci95"] is None else f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]"
            lines.append(f"| {c['condition']} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {ci} |")
        lines.append("")
    if summary["comparisons"]:
        lines += [
            "## Paired comparisons (other - baseline, paired on "
            f"{', '.join(summary['replicate_axes']) or 'nothing'})",
            "",
            "| metric | baseline | other | n pairs | mean diff | 95% CI | t | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["comparisons"]:
            ci = "-" if r["ci95"] is None else f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]"
            lines.append(
                f"| {r['metric']} | {r['baseline']} | {r['other']} | {r['n']} | {_fmt(r['mean_diff'])} | {ci} "
                f"| {_fmt(r['t'], 3)} | {_fmt(r['p_value'], 3)} |"
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
    """One panel per metric: a point per job (lines join the same fold/seed across conditions) and mean +- CI."""
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
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=False):
        series: dict[tuple, list[tuple[int, float]]] = {}
        for x, c in enumerate(conds):
            s = c["metrics"].get(m)
            if not s or not s["n"]:
                continue
            for rep, v in zip(c["replicates"], s["values"], strict=False):
                series.setdefault(tuple(sorted(rep.items())), []).append((x, v))
            ax.errorbar(
                [x + 0.18],
                [s["mean"]],
                yerr=None if s["ci95"] is None else [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]],
                fmt="s",
                color="black",
                capsize=4,
                zorder=3,
            )
        for pts in series.values():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-", alpha=0.55, markersize=4)
        ax.set_xticks(range(len(conds)))
        ax.set_xticklabels([c["condition"] for c in conds], rotation=20, ha="right", fontsize=8)
        ax.set_title(m)
        ax.grid(alpha=0.3)
    fig.suptitle("per fold/seed (points, joined when paired) and mean with 95% CI (black)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_summary(
    sweep_dir: str | Path,
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Collect the jobs of ``sweep_dir`` and write summary.json / summary.md / summary.png there."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep dir {root}")
    summary = summarize(collect_jobs(root), replicate_keys, baseline)
    summary["sweep_dir"] = str(root)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "summary.md").write_text(to_markdown(summary, f"Sweep summary: {root}") + "\n")
    plot(summary, root / "summary.png")
    return summary


class SweepSummary(Callback):
    """Hydra callback: write the summary when a multirun ends.

    hydra:
      callbacks:
        splitrun_report:
          _target_: lightning_freeze.splitrun.report.SweepSummary
    """

    def __init__(self, replicate_keys: Sequence[str] = REPLICATE_KEYS, baseline: str | None = None) -> None:
        self.replicate_keys = list(replicate_keys)
        self.baseline = baseline

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            summary = write_summary(sweep_dir, self.replicate_keys, self.baseline)
        except Exception as err:  # never turn a finished sweep into a failure
            log.warning("could not summarise %s: %s", sweep_dir, err)
            return
        print(to_markdown(summary, f"Sweep summary: {sweep_dir}"), flush=True)


def cli(argv: Sequence[str] | None = None) -> int:
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
    summary = write_summary(args.sweep_dir, [k for k in args.replicate.split(",") if k], args.baseline)
    print(to_markdown(summary, f"Sweep summary: {args.sweep_dir}"))
    return 0 if summary["n_ok"] else 1


if __name__ == "__main__":
    sys.exit(cli())
