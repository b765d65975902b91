"""``python -m benchmarks [--quick] [--only NAME ...] [--device cpu|cuda] [--rounds N] [--list]``.

Runs the registered comparisons (every module in ``benchmarks/comparisons/``), writes
``benchmarks/results/<name>.json`` for each, then regenerates ``benchmarks/results/README.md`` from all
json files present.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, BenchContext, discover, format_error, machine_info, resolve_device
from benchmarks.report import write_readme, write_result


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
        "--rounds", type=int, default=None, help="override every comparison's number of recorded rounds"
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="torch intra-op threads: a number, 'default' (torch's choice: one per core), or 'auto' "
        "(the default: 1 when the machine is already busy, i.e. 1-minute load average >= cores, "
        "because multi-threaded kernels on oversubscribed cores stall; torch's choice otherwise)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where json files and README.md go")
    p.add_argument("--list", action="store_true", help="list the comparisons and exit")
    p.add_argument("--readme-only", action="store_true", help="only regenerate README.md from the json files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def choose_threads(arg: str) -> tuple[int | None, str]:
    """The torch thread count to use (None: leave torch's default) and why."""
    if arg == "default":
        return None, "--threads default"
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


def main(argv=None) -> int:
    args = parse_args(argv)
    registry = discover()
    order = {name: c.order for name, c in registry.items()}
    if args.list:
        for name, c in registry.items():
            print(f"{name:24s} {c.title}")
        return 0
    if args.readme_only:
        print(write_readme(args.results_dir, order))
        return 0
    unknown = [n for n in args.only if n not in registry]
    if unknown:
        print(f"unknown comparison(s) {unknown}; choose from {list(registry)}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    threads, why = choose_threads(args.threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # memory workers inherit it
    ctx = BenchContext(
        quick=args.quick,
        device=device,
        rounds=args.rounds,
        verbose=not args.quiet,
        results_dir=args.results_dir,
    )
    ctx.log(f"torch threads: {threads or 'torch default'} ({why})")
    selected = [registry[n] for n in (args.only or registry)]
    failures = 0
    t_all = time.perf_counter()
    for comp in selected:
        ctx.log(f"== {comp.name} ({ctx.mode}, {device}) ==")
        machine = machine_info(device)
        machine["threads_choice"] = why
        t0 = time.perf_counter()
        try:
            result = comp.run(ctx)
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
        path = write_result(payload, args.results_dir)
        ctx.log(f"  wrote {path} ({time.perf_counter() - t0:.1f} s)")
    readme = write_readme(args.results_dir, order)
    ctx.log(f"wrote {readme}; total {time.perf_counter() - t_all:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
