"""FrozenPrefixCache on four workloads: the warm step, the step while the cache fills and the whole fit, against
plain PyTorch, the hand-written limit (prefix outputs computed once) and LayerFreeze / FreezeOut without the cache.

The CNN runs twice: on fixed batches shuffled in their order (``cnn``: a warm cache serves its rows without a
copy) and on the same samples shuffled every epoch by ``DataLoader(batch_size=32, shuffle=True)``
(``cnn_shuffled``: the cache gathers the rows with one indexed copy, and so does the limit's loader).

Workloads, contenders and rounds: :mod:`benchmarks.cache_bench`. The longer FreezeOut fit, the disk tier and the
compiled model are their own comparisons (``cache_freezeout``, ``cache_disk``, ``cache_compiled``). Run alone:
``python -m benchmarks --only cache [--quick]``.
"""

from __future__ import annotations

import torch

from benchmarks.cache_bench import (
    cache_result,
    cnn_workload,
    contenders,
    digits_workload,
    resnet_workload,
    table,
    work_table,
)
from benchmarks.harness import BenchContext, Result, alternate, comparison

NAME, TITLE = "cache", "FrozenPrefixCache: the frozen prefix computed once"


@comparison(NAME, TITLE, order=40)
def run(ctx: BenchContext) -> Result:
    # Intra-op threads are the harness's choice (--threads; auto: 1 on a loaded machine).
    device = torch.device(ctx.device)
    rounds = ctx.n_rounds(1, 4)
    result = cache_result(device, rounds)
    for w in (
        cnn_workload(ctx, device),
        cnn_workload(ctx, device, shuffle_samples=True),
        resnet_workload(ctx, device),
        digits_workload(ctx, device),
    ):
        ctx.log(
            f"  {w.name}: {w.description}; prefix = {w.prefix_share:.1%} of forward FLOPs; {w.epochs} epochs"
        )
        cs, infos = contenders(w, device)
        ms = alternate(cs, rounds=rounds, warmup_rounds=ctx.pick(0, 1), log=ctx.log)
        result.config[w.name] = {
            "description": w.description,
            "prefix_forward_flops_share": w.prefix_share,
            "epochs": w.epochs,
            "batches_per_epoch": len(w.batches),
            **w.extra,
        }
        head = f"{w.name}: {w.description}; prefix {w.prefix_share:.0%} of forward FLOPs"
        for metric, what in (
            ("step_cpu_s", f"warm step, CPU time (last of {w.epochs} epochs)"),
            ("step_s", f"warm step, wall time (last of {w.epochs} epochs)"),
            ("first_epoch_step_cpu_s", "step in epoch 0 (cache filling), CPU time"),
            ("fit_cpu_s", f"whole fit ({w.epochs} epochs), CPU time"),
            ("fit_s", f"whole fit ({w.epochs} epochs), wall time"),
        ):
            result.tables.append(table(w, ms, infos, metric, f"{head} — {what}"))
        result.tables.append(work_table(f"{head} — the cache's own work per warm step", infos))
    return result
