"""FrozenPrefixCache on an inductor-compiled transformers ResNet: LayerFreeze with and without the cache, the
whole fit (compilation included) and the warm step. Run alone: ``python -m benchmarks --only cache_compiled``.
"""

from __future__ import annotations

import torch

from benchmarks.cache_bench import (
    LF,
    LF_CACHE,
    cache_result,
    compile_contenders,
    resnet_workload,
    simple_table,
)
from benchmarks.harness import BenchContext, Result, alternate, comparison

NAME, TITLE = "cache_compiled", "FrozenPrefixCache on a compiled model"


@comparison(NAME, TITLE, order=43)
def run(ctx: BenchContext) -> Result:
    device = torch.device(ctx.device)
    rounds = ctx.n_rounds(1, 2)
    resnet = resnet_workload(ctx, device)
    result = cache_result(device, rounds, {"description": resnet.description, "epochs": resnet.epochs})
    ctx.log(f"  {resnet.description}")
    cs, infos = compile_contenders(resnet, device)
    ms = alternate(cs, rounds=rounds, warmup_rounds=ctx.pick(0, 1), log=ctx.log)
    uncached = {f"{LF_CACHE}, compiled": f"{LF}, compiled"}
    for metric, what in (
        ("fit_s", f"whole fit ({resnet.epochs} epochs, compilation included), wall time"),
        ("step_s", "warm step, wall time"),
    ):
        result.tables.append(
            simple_table(f"{resnet.description} — {what}", ms, infos, f"{LF}, compiled", metric, uncached)
        )
    return result
