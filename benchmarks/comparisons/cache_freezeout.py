"""FreezeOut with and without FrozenPrefixCache over a longer fit of the CNN workload, where the frozen
boundary settles after two thirds of the fit (t0 = 0.5, cubic): does the cache pay for carrying its rows through
every newly frozen block? Run alone: ``python -m benchmarks --only cache_freezeout [--quick]``.
"""

from __future__ import annotations

import torch

from benchmarks.cache_bench import FO, FO_CACHE, cache_result, cnn_workload, contenders, simple_table
from benchmarks.harness import BenchContext, Result, alternate, comparison

NAME, TITLE = "cache_freezeout", "FrozenPrefixCache under FreezeOut: a whole fit while the boundary moves"


@comparison(NAME, TITLE, order=41)
def run(ctx: BenchContext) -> Result:
    device = torch.device(ctx.device)
    rounds = ctx.n_rounds(1, 4)
    w = cnn_workload(ctx, device)
    w.epochs = ctx.pick(6, 8)
    result = cache_result(device, rounds, {"description": w.description, "epochs": w.epochs})
    ctx.log(f"  {w.description}; {w.epochs} epochs")
    cs, infos = contenders(w, device)
    ms = alternate([c for c in cs if c.name in (FO, FO_CACHE)], rounds=rounds, warmup_rounds=1, log=ctx.log)
    for metric, what in (("fit_cpu_s", "whole fit, CPU time"), ("fit_s", "whole fit, wall time")):
        result.tables.append(
            simple_table(
                f"{w.description}, {w.epochs} epochs — {what}", ms, infos, FO, metric, {FO_CACHE: FO}
            )
        )
    return result
