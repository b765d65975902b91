"""``python -m benchmarks [--quick] [--only NAME ...] [--device cpu|cuda] [--budget S] [--rounds N] [--list]``.

Runs the registered comparisons (every module in ``benchmarks/comparisons/``), writes
``benchmarks/results/<name>.json`` for each, then regenerates ``benchmarks/results/README.md`` from all
json files present.  With ``--budget S`` it runs the chosen subset :data:`BUDGET_PLAN` instead, each comparison
in its own process stopped when the budget is spent, into ``benchmarks/results/gpu/`` on CUDA.  See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, BenchContext, discover, format_error, machine_info, resolve_device
from benchmarks.report import write_readme, write_result

STARTED = time.perf_counter()  # a budget counts from here: imports and discovery are part of it
QUICK_GOAL_S = 180.0  # `--quick` is a smoke run of every comparison: about 3 minutes on 2 shared cores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="small sizes and few rounds (a few minutes on 2 cores)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        default=[],
        help="run only this comparison (repeatable; see --list)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run the budget subset (see --list) within SECONDS of wall-clock, each comparison in its own process "
        "killed when the budget is spent; results go to benchmarks/results/gpu/ on CUDA "
        "(benchmarks/results/budget-cpu/ otherwise) unless --results-dir is given",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="override every comparison's number of recorded rounds"
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="torch intra-op threads: a number, 'default' (torch's choice: one per core), or 'auto' "
        "(the default: 1 with --quick on the CPU, or when the machine is already busy, i.e. 1-minute load "
        "average >= cores, because multi-threaded kernels on oversubscribed cores stall; torch's choice "
        "otherwise)",
    )
    p.add_argument("--results-dir", type=Path, default=None, help="where json files and README.md go")
    p.add_argument("--list", action="store_true", help="list the comparisons and exit")
    p.add_argument("--readme-only", action="store_true", help="only regenerate README.md from the json files")
    p.add_argument(
        "--no-readme", action="store_true", help="write the json files only (the budget run's children)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def choose_threads(arg: str, quick: bool = False, device_type: str = "cpu") -> tuple[int | None, str]:
    """The torch thread count to use (None: leave torch's default) and why."""
    if arg == "default":
        return None, "--threads default"
    if arg == "auto" and quick and device_type == "cpu":
        # A smoke run's length must not depend on the neighbours: with 2 threads on 2 cores shared with other
        # jobs, one comparison took 281 s instead of 28 s on 1 thread.
        return 1, "--threads auto: quick mode on the CPU runs on 1 thread"
    if arg == "auto":
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if cores > 1 and load >= cores:
            return 1, f"--threads auto: 1-minute load average {load:.1f} >= {cores} cores"
        return None, f"--threads auto: load average {load:.1f} < {cores} cores"
    try:
        n = int(arg)
    except ValueError:
        raise SystemExit(f"--threads must be a number, 'default' or 'auto', got {arg!r}") from None
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    return n, f"--threads {n}"


BUDGET_PLAN: tuple[tuple[str, bool, float], ...] = (
    # (comparison, quick sizes, expected seconds on one GPU or a quiet CPU, start-up included), in the order a
    # budget runs them: the user-facing evidence first, then the step-time and memory tables.
    ("transfer", True, 150.0),  # pretrains its two backbones on the device the first time (cached after)
    ("static_freezing", True, 60.0),
    ("freezeout", True, 60.0),
    ("cache", True, 60.0),
    ("memory", True, 60.0),
    ("overhead", True, 60.0),
    ("unfreezing", True, 45.0),
)


def budget_plan(budget_s: float, plan=None) -> list[tuple[str, bool, float]]:
    """The comparisons of ``plan`` (default :data:`BUDGET_PLAN`) whose expected times, added in order, fit
    ``budget_s`` (one that does not fit is left out and the next ones are still considered)."""
    chosen, used = [], 0.0
    for name, quick, expected in BUDGET_PLAN if plan is None else plan:
        if used + expected <= budget_s:
            chosen.append((name, quick, expected))
            used += expected
    return chosen


def default_results_dir(device, budget: float | None) -> Path:
    if budget is None:
        return RESULTS_DIR
    return RESULTS_DIR / ("gpu" if getattr(device, "type", str(device)) == "cuda" else "budget-cpu")


def run_budget(args, device, results_dir: Path, order: dict[str, int], log, started: float) -> int:
    """Each comparison of the budget plan in its own process, with the budget left as its time limit."""
    import subprocess

    plan = budget_plan(args.budget)
    log(
        f"budget {args.budget:.0f} s: "
        + ", ".join(f"{n} ({'quick' if q else 'full'}, ~{e:.0f} s)" for n, q, e in plan)
    )
    start, failures = started, 0
    for name, quick, _ in plan:
        left = args.budget - (time.perf_counter() - start)
        if left <= 5:
            log(f"== {name}: skipped, the budget is spent")
            continue
        cmd = [sys.executable, "-m", "benchmarks", "--only", name, "--device", str(device)]
        cmd += ["--results-dir", str(results_dir), "--threads", args.threads, "--no-readme"]
        cmd += ["--quick"] if quick else []
        cmd += ["--rounds", str(args.rounds)] if args.rounds is not None else []
        cmd += ["-q"] if args.quiet else []
        try:
            rc = subprocess.run(cmd, timeout=left, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            failures += 1
            why = "it ran past the budget and was stopped" if rc is None else f"it exited with code {rc}"
            machine = machine_info(device)
            write_result(
                {
                    "name": name,
                    "title": name,
                    "mode": "quick" if quick else "full",
                    "machine": machine,
                    "error": f"the comparison did not finish: {why} (budget {args.budget:.0f} s)",
                },
                results_dir,
            )
            log(f"== {name}: {why}")
    readme = write_readme(results_dir, order)
    log(f"wrote {readme}; budget run took {time.perf_counter() - start:.1f} s of {args.budget:.0f} s")
    return 1 if failures else 0


def main(argv=None) -> int:
    # from the command line the budget counts from the interpreter's start; called from Python, from here
    started = STARTED if argv is None else time.perf_counter()
    args = parse_args(argv)
    registry = discover()
    order = {name: c.order for name, c in registry.items()}
    if args.list:
        for name, c in registry.items():
            print(f"{name:24s} {c.title}")
        print("budget subset (--budget), in order: " + ", ".join(n for n, _, _ in BUDGET_PLAN))
        return 0
    if args.readme_only:
        print(write_readme(args.results_dir or RESULTS_DIR, order))
        return 0
    unknown = [n for n in args.only if n not in registry]
    if unknown:
        print(f"unknown comparison(s) {unknown}; choose from {list(registry)}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    results_dir = args.results_dir or default_results_dir(device, args.budget)
    if args.budget is not None:
        if args.budget <= 0:
            raise SystemExit(f"--budget must be a positive number of seconds, got {args.budget}")
        log = print if not args.quiet else lambda _m: None
        return run_budget(args, device, results_dir, order, log, started)
    threads, why = choose_threads(args.threads, args.quick, device.type)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # memory workers inherit it
    ctx = BenchContext(
        quick=args.quick,
        device=device,
        rounds=args.rounds,
        verbose=not args.quiet,
        results_dir=results_dir,
    )
    ctx.log(f"torch threads: {threads or 'torch default'} ({why})")
    selected = [registry[n] for n in (args.only or registry)]
    failures = 0
    took: dict[str, float] = {}
    for comp in selected:
        ctx.log(f"== {comp.name} ({ctx.mode}, {device}) ==")
        machine = machine_info(device)
        machine["threads_choice"] = why
        t0 = time.perf_counter()
        try:
            result = comp.run(ctx)
            result.name, result.title = result.name or comp.name, result.title or comp.title
            payload = result.to_json(ctx, machine, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - one broken comparison must not hide the others
            failures += 1
            payload = {
                "name": comp.name,
                "title": comp.title,
                "mode": ctx.mode,
                "machine": machine,
                "error": f"the comparison itself failed: {format_error(exc)}",
            }
            ctx.log(f"  FAILED: {payload['error']}")
        payload["machine"]["load_avg_1_5_15_end"] = machine_info(device)["load_avg_1_5_15"]
        path = write_result(payload, results_dir)
        took[comp.name] = time.perf_counter() - t0
        ctx.log(f"  wrote {path} ({took[comp.name]:.1f} s)")
    if not args.no_readme:
        ctx.log(f"wrote {write_readme(results_dir, order)}")
    # the total counts from the interpreter's start (imports included) when run from the command line
    ctx.log(timing_summary(took, time.perf_counter() - started, args.quick and not args.only))
    return 1 if failures else 0


def timing_summary(took: dict[str, float], total: float, whole_quick_run: bool) -> str:
    """Each comparison's seconds, slowest first, and the total; for a whole ``--quick`` run, whether it kept to
    :data:`QUICK_GOAL_S`."""
    lines = [f"  {name:24s} {s:7.1f} s" for name, s in sorted(took.items(), key=lambda kv: -kv[1])]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"total {total:.1f} s (1-minute load average now {load:.1f} on {os.cpu_count()} cores)")
    if whole_quick_run and total > QUICK_GOAL_S:
        lines.append(
            f"quick mode took longer than its goal of {QUICK_GOAL_S:.0f} s: shrink the quick sizes of the slowest "
            "comparisons above (or the machine is busy: see the load)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
