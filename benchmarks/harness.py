"""The benchmark harness: contenders, alternation, statistics, registry, machine info.

Every comparison follows one protocol so that its numbers can be trusted on a noisy machine:

1. All contenders of a comparison run in ONE process.
2. After ``warmup_rounds`` unrecorded rounds, rounds alternate the contenders: A B C, A B C, ...
3. Each round yields one sample per contender (for step times: the median step time of that round).
4. A contender is compared with the baseline *pair by pair*: per round, contender / baseline, then the
   median of those ratios.  Slow drift of the machine (other jobs, thermal state) hits both members of
   a pair and cancels.
5. A contender that raises is kept, with the exception text, and never silently dropped.

Example::

    from benchmarks.harness import Contender, alternate, Table

    ms = alternate([Contender("a", lambda: 1.0), Contender("b", lambda: 2.0)], rounds=3)
    table = Table.build("demo", ms, baseline="a", metric="value", unit="s")
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Sample = float | Mapping[str, float]
"""What one round of one contender returns: one number, or several named numbers."""

DEFAULT_METRIC = "value"


# --------------------------------------------------------------------------------------------------
# Contenders and alternation
# --------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One side of a comparison.

    ``run_round`` performs one round (e.g. a short fit of N steps) and returns its sample: a float or a
    dict of named floats (``{"step_s": 0.1, "peak_rss": 1e9}``).  ``setup``, if given, runs once before
    the first round; an exception there is recorded like one in a round.  ``info`` is a dict that the
    rounds may fill with non-numeric findings (e.g. a correctness check); it ends up in
    ``Measurement.extra``.
    """

    name: str
    run_round: Callable[[], Sample]
    note: str = ""
    setup: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    """The recorded samples of one contender: ``samples[metric][round]``, or the error that stopped it."""

    name: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def values(self, metric: str = DEFAULT_METRIC) -> list[float]:
        return list(self.samples.get(metric, []))

    def add(self, sample: Sample) -> None:
        if not isinstance(sample, Mapping):
            sample = {DEFAULT_METRIC: float(sample)}
        for key, value in sample.items():
            self.samples.setdefault(key, []).append(float(value))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "samples": self.samples,
            "error": self.error,
            "note": self.note,
            "extra": self.extra,
        }


def format_error(exc: BaseException) -> str:
    """One line naming the exception, plus the innermost frame, for the results table."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(exc).__name__}: {text}{where}"


def alternate(
    contenders: Sequence[Contender],
    *,
    rounds: int,
    warmup_rounds: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[Measurement]:
    """Run ``contenders`` in alternation: ``warmup_rounds`` unrecorded rounds, then ``rounds`` recorded ones.

    Within a round the order is the order given (A B C, A B C, ...).  A contender that raises is marked
    with the error and skipped for the remaining rounds; the others go on.  Returns one
    :class:`Measurement` per contender, in the order given.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    results = [Measurement(c.name, note=c.note) for c in contenders]
    for contender, result in zip(contenders, results, strict=True):
        if contender.setup is not None:
            try:
                contender.setup()
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
                result.error = format_error(exc)
    for r in range(warmup_rounds + rounds):
        recorded = r >= warmup_rounds
        for contender, result in zip(contenders, results, strict=True):
            if result.error is not None:
                continue
            try:
                sample = contender.run_round()
            except Exception as exc:  # noqa: BLE001
                result.error = format_error(exc)
                if log:
                    log(f"    {contender.name}: FAILED: {result.error}")
                continue
            if recorded:
                result.add(sample)
        if log:
            label = (
                f"round {r - warmup_rounds + 1}/{rounds}" if recorded else f"warm-up {r + 1}/{warmup_rounds}"
            )
            log(f"    {label} done")
    for contender, result in zip(contenders, results, strict=True):
        result.extra.update(contender.info)
    return results


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Median and spread of a list of samples."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        v = np.asarray(list(values), dtype=float)
        if v.size == 0:
            raise ValueError("no samples to summarise")
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        return cls(int(v.size), float(med), float(q1), float(q3), float(v.min()), float(v.max()))

    def to_json(self) -> dict[str, float]:
        return {
            "n": self.n,
            "median": self.median,
            "q1": self.q1,
            "q3": self.q3,
            "min": self.min,
            "max": self.max,
        }


def pairwise_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios ``values[r] / baseline[r]`` (rounds are paired by index)."""
    if len(values) != len(baseline):
        raise ValueError(f"unpaired samples: {len(values)} vs {len(baseline)} rounds")
    return [v / b for v, b in zip(values, baseline, strict=True)]


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval (Student's t over the samples)."""

    mean: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` with its ``level`` confidence interval (t distribution, n - 1 degrees of freedom).

    NaNs are dropped; one value gives an interval of zero width only if it is the only information there is,
    so with fewer than two values the bounds are NaN.
    """
    from scipy import stats

    v = np.asarray([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Interval(mean, mean - half, mean + half, int(v.size))


def ratio_ci(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Interval:
    """Contender ÷ baseline, paired by round, as the mean of the per-round ratios with its confidence interval.

    Every ratio in the benchmarks runs in this one direction: below 1 is better (less time, fewer bytes).
    """
    return mean_ci(pairwise_ratios(values, baseline), level)


def median_step_time(step_times: Sequence[float], skip: int = 0) -> float:
    """The median of ``step_times`` after dropping the first ``skip`` (warm-up) steps."""
    kept = list(step_times)[skip:]
    if not kept:
        raise ValueError(f"no step times left after skipping {skip} warm-up steps (got {len(step_times)})")
    return statistics.median(kept)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def fmt_num(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, without scientific notation for everyday sizes."""
    if x != x:  # NaN
        return "nan"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 10**digits:
        return f"{x:,.0f}"
    decimals = max(0, digits - 1 - int(np.floor(np.log10(mag))))
    return f"{x:.{decimals}f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}×" if x == x else "nan"


@dataclass
class Table:
    """A rendered table (strings for the README) plus the numbers behind it (for the JSON)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    data: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "data": self.data,
        }

    @classmethod
    def build(
        cls,
        title: str,
        measurements: Sequence[Measurement],
        *,
        baseline: str,
        metric: str = DEFAULT_METRIC,
        unit: str = "",
        scale: float = 1.0,
        label: str | None = None,
        lower_is_better: bool = True,
        extra_columns: Mapping[str, Callable[[Measurement], str]] | None = None,
        notes: Sequence[str] = (),
    ) -> Table:
        """Summarise ``metric`` of each measurement and its pairwise ratio to ``baseline``.

        ``scale`` converts the stored unit for display (e.g. 1e3 for seconds -> ms).  Contenders that
        failed are listed with their error.  The ratio column reads "contender / baseline" (below 1 is
        smaller: faster for times, less for memory).
        """
        label = label or metric
        u = f" ({unit})" if unit else ""
        extra_columns = dict(extra_columns or {})
        columns = [
            "contender",
            f"{label} median{u}",
            f"IQR{u}",
            f"min – max{u}",
            f"÷ {baseline} (median of per-round ratios)",
            "ratio IQR",
            *extra_columns,
        ]
        base = next((m for m in measurements if m.name == baseline), None)
        if base is None:
            raise ValueError(f"baseline {baseline!r} is not among {[m.name for m in measurements]}")
        base_vals = base.values(metric)
        rows: list[list[str]] = []
        data: list[dict[str, Any]] = []
        for m in measurements:
            vals = m.values(metric)
            extras = [fn(m) for fn in extra_columns.values()]
            entry: dict[str, Any] = {
                "contender": m.name,
                "metric": metric,
                "unit_scale": scale,
                "samples": vals,
                "error": m.error,
                "note": m.note,
                "extra": m.extra,
            }
            if m.error is not None or not vals:
                reason = m.error or "no samples"
                rows.append([m.name, "—", "—", "—", f"could not run: {reason}", "—", *extras])
                data.append(entry)
                continue
            s = Summary.of(v * scale for v in vals)
            entry["summary"] = s.to_json()
            cells = [
                m.name,
                fmt_num(s.median),
                f"{fmt_num(s.q1)} – {fmt_num(s.q3)}",
                f"{fmt_num(s.min)} – {fmt_num(s.max)}",
            ]
            if m.name == baseline:
                cells += ["1 (baseline)", "—"]
            elif base.error is not None or len(base_vals) != len(vals):
                cells += [f"n/a (baseline: {base.error or 'unpaired rounds'})", "—"]
            else:
                ratios = pairwise_ratios(vals, base_vals)
                r = Summary.of(ratios)
                entry["ratios"] = ratios
                entry["ratio_summary"] = r.to_json()
                cells += [fmt_ratio(r.median), f"{fmt_ratio(r.q1)} – {fmt_ratio(r.q3)}"]
            rows.append(cells + extras)
            data.append(entry)
        notes = list(notes)
        notes.append(
            f"{'Lower' if lower_is_better else 'Higher'} is better. Ratios are taken per round "
            f"(contender ÷ {baseline} in the same round), then their median; n = "
            f"{len(base_vals)} recorded rounds."
        )
        return cls(title, columns, rows, notes, data)


# --------------------------------------------------------------------------------------------------
# Device helpers (CPU and CUDA)
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str):
    """``cpu`` or ``cuda[:i]`` as a torch.device; a clear error when CUDA is asked for but absent."""
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name} was requested but CUDA is not available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run with --device cpu."
        )
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:index], got {name!r}")
    return dev


def sync(device) -> None:
    """Wait for queued device work, so that a wall-clock reading covers it (no-op on CPU)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def now(device=None) -> float:
    """A wall-clock reading in seconds taken after the device has finished its queued work."""
    if device is not None:
        sync(device)
    return time.perf_counter()


class StepClock:
    """The benchmarks' one step timer: a device-synchronised stamp at every step start.

    A step lasts from its start to the next step's start (``close()`` ends the last one), so it covers what the
    user pays for: data fetch, forward, backward, optimizer step, ``zero_grad`` and every hook. Work done only for
    the benchmark (copying weights for a later evaluation, counting bytes) runs inside ``excluded()`` and is left
    out of the step it falls in and of ``elapsed()``. Every stamp is read after ``torch.cuda.synchronize`` on CUDA.

    Args:
        device: the device whose queued work each stamp waits for (``None`` or CPU: no wait).
    """

    def __init__(self, device=None) -> None:
        self.device = device
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # this process's CPU seconds at the same stamps
        self.origin: float | None = None
        self.excluded_s = 0.0
        self.cpu_origin = 0.0
        self.cpu_excluded_s = 0.0

    def _stamp(self) -> float:
        return now(self.device) - self.excluded_s

    def _cpu_stamp(self) -> float:
        return time.process_time() - self.cpu_excluded_s

    def begin(self) -> None:
        """Start the clock for ``elapsed()`` (the fit's start); the first ``step()`` does it if this is not called."""
        self.origin, self.excluded_s, self.starts, self.cpu_starts = now(self.device), 0.0, [], []
        self.cpu_origin, self.cpu_excluded_s = time.process_time(), 0.0

    def step(self) -> None:
        """A step starts now."""
        if self.origin is None:
            self.begin()
        self.starts.append(self._stamp())
        self.cpu_starts.append(self._cpu_stamp())

    def close(self) -> None:
        """The last step ends now."""
        self.starts.append(self._stamp())
        self.cpu_starts.append(self._cpu_stamp())

    def elapsed(self) -> float:
        """Seconds since ``begin()``, excluded spans left out."""
        if self.origin is None:
            raise RuntimeError("the clock was never started")
        return self._stamp() - self.origin

    def cpu_elapsed(self) -> float:
        """This process's CPU seconds since ``begin()``, excluded spans left out: on a machine shared with other
        jobs it measures our own work, where wall time also measures theirs."""
        return self._cpu_stamp() - self.cpu_origin

    @contextmanager
    def excluded(self):
        """Leave the enclosed work out of the step times and of ``elapsed()``."""
        start, cpu_start = now(self.device), time.process_time()
        try:
            yield
        finally:
            self.excluded_s += now(self.device) - start
            self.cpu_excluded_s += time.process_time() - cpu_start

    def step_times(self) -> list[float]:
        """Each step's duration, start to next start (one fewer than the stamps)."""
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]

    def cpu_step_times(self) -> list[float]:
        """Each step's CPU time in this process, on the same stamps."""
        return [b - a for a, b in zip(self.cpu_starts, self.cpu_starts[1:], strict=False)]


# --------------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device=None) -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, load, library versions, device, date, git commit."""
    import torch

    try:
        import lightning

        lightning_version = lightning.__version__
    except ImportError:  # pragma: no cover - lightning is a dependency
        lightning_version = None
    dev = str(device) if device is not None else "cpu"
    gpu = None
    if device is not None and getattr(device, "type", None) == "cuda":
        gpu = torch.cuda.get_device_name(device)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning_version,
        "device": dev,
        "gpu": gpu,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": commit or "none (no commit yet)",
        "git_dirty": bool(dirty) if dirty is not None else None,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------------------
# Comparisons: context, result, registry
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What a comparison is told: mode, device, and an optional override of its round count."""

    quick: bool = True
    device: Any = "cpu"
    rounds: int | None = None
    verbose: bool = True
    results_dir: Path = RESULTS_DIR

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def pick(self, quick, full):
        """``quick`` in quick mode, ``full`` otherwise."""
        return quick if self.quick else full

    def n_rounds(self, quick: int, full: int) -> int:
        return self.rounds if self.rounds is not None else self.pick(quick, full)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)


@dataclass
class Result:
    """What a comparison returns: tables for the README plus its configuration and free-form notes.

    ``name`` and ``title`` default to the ones the comparison was registered with (written once, in
    ``@comparison``); the runner fills them in.
    """

    name: str = ""
    title: str = ""
    description: str = ""
    tables: list[Table] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    """Figures the comparison wrote, as paths relative to the results folder (shown in its README)."""

    def to_json(self, ctx: BenchContext, machine: Mapping[str, Any], elapsed_s: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "mode": ctx.mode,
            "machine": dict(machine),
            "elapsed_s": round(elapsed_s, 2),
            "config": self.config,
            "notes": self.notes,
            "tables": [t.to_json() for t in self.tables],
            "images": self.images,
            "extra": self.extra,
        }


@dataclass(frozen=True)
class Comparison:
    name: str
    title: str
    run: Callable[[BenchContext], Result]
    order: int = 100


COMPARISONS: dict[str, Comparison] = {}


def comparison(name: str, title: str, order: int = 100):
    """Register ``fn(ctx) -> Result`` as the comparison ``name`` (run by ``python -m benchmarks``)."""

    def deco(fn: Callable[[BenchContext], Result]) -> Callable[[BenchContext], Result]:
        if name in COMPARISONS and COMPARISONS[name].run is not fn:
            raise ValueError(f"comparison {name!r} registered twice")
        COMPARISONS[name] = Comparison(name, title, fn, order)
        return fn

    return deco


def discover() -> dict[str, Comparison]:
    """Import every module of ``benchmarks.comparisons`` (each registers itself) and return the registry."""
    import importlib
    import pkgutil

    from benchmarks import comparisons as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one broken module must not take the suite down
            if info.name not in COMPARISONS:
                COMPARISONS[info.name] = Comparison(
                    info.name,
                    f"{info.name} (module failed to import)",
                    _raiser(f"importing benchmarks/comparisons/{info.name}.py failed: {format_error(exc)}"),
                    order=1000,
                )
    return dict(sorted(COMPARISONS.items(), key=lambda kv: (kv[1].order, kv[0])))


def _raiser(message: str) -> Callable[[BenchContext], Result]:
    def run(ctx: BenchContext) -> Result:
        raise RuntimeError(message)

    return run
