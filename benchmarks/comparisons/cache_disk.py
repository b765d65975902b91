"""FrozenPrefixCache's disk tier: the CNN workload with four times the RAM budget's worth of prefix rows, the page
cache warm or dropped before every epoch, against recomputing the prefix (LayerFreeze alone). Run alone:
``python -m benchmarks --only cache_disk [--quick]``.
"""

from __future__ import annotations

import torch

from benchmarks.cache_bench import (
    LF,
    cache_result,
    cnn_workload,
    disk_contenders,
    prefix_row_bytes,
    simple_table,
)
from benchmarks.harness import BenchContext, Result, alternate, comparison

NAME, TITLE = "cache_disk", "FrozenPrefixCache: the disk tier past the RAM budget"


@comparison(NAME, TITLE, order=42)
def run(ctx: BenchContext) -> Result:
    device = torch.device(ctx.device)
    rounds = ctx.n_rounds(1, 4)
    w = cnn_workload(ctx, device, n_batches=ctx.pick(8, 12))
    row_bytes = prefix_row_bytes(w)
    ram = row_bytes * sum(x.shape[0] for x, _ in w.batches) // 4
    result = cache_result(
        device, rounds, {"description": w.description, "ram_budget_bytes": ram, "row_bytes": row_bytes}
    )
    ctx.log(f"  {w.description}; RAM budget {ram / 1e6:.1f} MB = a quarter of the rows")
    cs, infos = disk_contenders(w, device, ram)
    ms = alternate(cs, rounds=rounds, warmup_rounds=ctx.pick(0, 1), log=ctx.log)
    uncached = {m.name: LF for m in ms if m.name != LF}
    for metric, what in (("step_cpu_s", "warm step, CPU time"), ("step_s", "warm step, wall time")):
        result.tables.append(
            simple_table(
                f"{w.description}; RAM budget = a quarter of the rows — {what} (last of {w.epochs} epochs)",
                ms,
                infos,
                LF,
                metric,
                uncached,
            )
        )
    return result
