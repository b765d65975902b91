"""Overhead of our callbacks during steps where nothing changes (goal: at most 2% of a step).

Each case is a Trainer *with* one of our callbacks, configured so that the measured steps are no-op
steps, against the same Trainer *without* it, where the same static state is set up by hand (e.g. the
backbone frozen by hand with ``torch.no_grad()`` + eval mode).  The difference is what the callback
costs per step: its hooks, its per-layer parameter groups, its bookkeeping.

Adding a case for another callback (FreezeOut, ProgressiveUnfreezing, FrozenPrefixCache, ...) is one
call in that callback's own benchmark module (``benchmarks/comparisons/<yours>.py``)::

    from benchmarks.comparisons.overhead import OverheadCase, register_overhead_case

    register_overhead_case(OverheadCase(
        name="FreezeOut (between freezes)",
        make_callbacks=lambda module: [FreezeOut(layers="backbone.*", t0=0.99, plot=False)],
        baseline="nothing_frozen",        # or "hand_frozen": which hand-written run has the same state
        note="t0 so late that no layer freezes during the measured steps",
    ))
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from benchmarks import peers
from benchmarks.harness import (
    BenchContext,
    Result,
    Table,
    alternate,
    comparison,
    fmt_num,
)
from benchmarks.lit import BenchModule, lightning_contender
from benchmarks.models import NetSpec, SplitNet, make_batches, make_blocks, pick_prefix

Baseline = Literal["hand_frozen", "nothing_frozen"]
BASELINE_NAMES: dict[str, str] = {
    "hand_frozen": "Lightning, backbone frozen by hand (no callback)",
    "nothing_frozen": "Lightning, nothing frozen (no callback)",
}


@dataclass(frozen=True)
class OverheadCase:
    """One of our callbacks in a no-op configuration, and the hand-written run it must match.

    ``make_callbacks(module)`` returns the callbacks for a fresh :class:`BenchModule` (whose
    ``backbone`` is the first ~70% of the network's blocks, then ``trunk`` and ``head``; the optimizer
    is SGD over ``self.parameters()``, unfiltered).  ``baseline`` names the callback-free run with the
    same static state.
    """

    name: str
    make_callbacks: Callable[[BenchModule], list]
    baseline: Baseline = "hand_frozen"
    note: str = ""
    module_kw: dict = field(default_factory=dict)


OVERHEAD_CASES: dict[str, OverheadCase] = {}

# The per-batch and per-step Lightning hooks a callback may implement: where a no-op step's cost of ours lives.
_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class HookClock:
    """CPU time spent inside our callbacks' per-step hooks, measured with ``time.thread_time_ns`` around each call
    (the thread's CPU time: a busy shared machine's preemptions do not count as ours).

    ``instrument(callbacks)`` wraps the hooks of the given callback objects; :meth:`us_per_step` is the total
    divided by the batches seen (one ``on_train_batch_start`` per batch). It is the profile of our own Python
    work per step, free of the step-time noise of the whole fit.
    """

    def __init__(self) -> None:
        self.ns = 0
        self.batches = 0

    def instrument(self, callbacks: list) -> list:
        for callback in callbacks:
            for name in _STEP_HOOKS:
                setattr(callback, name, self._timed(getattr(callback, name), name == "on_train_batch_start"))
        return callbacks

    def _timed(self, hook: Callable, counts_batch: bool) -> Callable:
        def timed(*args, **kwargs):
            start = time.thread_time_ns()
            try:
                return hook(*args, **kwargs)
            finally:
                self.ns += time.thread_time_ns() - start
                self.batches += counts_batch

        return timed

    def us_per_step(self) -> float:
        return self.ns / max(self.batches, 1) / 1e3


def register_overhead_case(case: OverheadCase) -> OverheadCase:
    if case.baseline not in BASELINE_NAMES:
        raise ValueError(f"baseline must be one of {list(BASELINE_NAMES)}, got {case.baseline!r}")
    OVERHEAD_CASES[case.name] = case
    return case


register_overhead_case(
    OverheadCase(
        name="LayerFreeze (ours), frozen throughout",
        make_callbacks=peers.layer_freeze,
        baseline="hand_frozen",
        note='LayerFreeze(layers="backbone"), no until_*: every measured step is a no-op step',
    )
)


def _freezeout(module: BenchModule) -> list:
    from lightning_freeze import FreezeOut

    return [FreezeOut(layers="backbone.*", t0=1.0)]


def _unfreezing(module: BenchModule) -> list:
    from lightning_freeze import ProgressiveUnfreezing

    return [ProgressiveUnfreezing(["backbone"], phases=[{"layers": "backbone", "at_epoch": 10_000}])]


def _adaptive(module: BenchModule) -> list:
    from lightning_freeze import AdaptiveFreeze

    return [AdaptiveFreeze(["backbone.*"], check_every_n_steps=10, min_steps=10**9)]


register_overhead_case(
    OverheadCase(
        name="FreezeOut (ours), no layer due",
        make_callbacks=_freezeout,
        baseline="nothing_frozen",
        note="FreezeOut(backbone.*, t0=1.0): every t_i = 1, so it only sets each group's LR every step",
    )
)
register_overhead_case(
    OverheadCase(
        name="ProgressiveUnfreezing (ours), between thaws",
        make_callbacks=_unfreezing,
        baseline="hand_frozen",
        note="backbone frozen, its thaw far beyond the measured steps: the per-step thaw check and LR hooks only",
    )
)
register_overhead_case(
    OverheadCase(
        name="AdaptiveFreeze (ours), measuring",
        make_callbacks=_adaptive,
        baseline="nothing_frozen",
        note="AdaptiveFreeze(backbone.*, check every 10 steps, min_steps too far to freeze): per-layer gradient "
        "norms every step and a decision every 10",
    )
)


@comparison("overhead", "Overhead of our callbacks on no-op steps", order=20)
def run(ctx: BenchContext) -> Result:
    spec = ctx.pick(
        NetSpec(width=16, blocks_per_stage=5, batch=8), NetSpec(width=16, blocks_per_stage=6, batch=16)
    )
    skip = ctx.pick(3, 5)
    measured = ctx.pick(10, 60)
    rounds = ctx.n_rounds(1, 9)
    warmup_rounds = ctx.pick(0, 1)  # quick mode is a smoke run: every case, no evidence
    device = torch.device(ctx.device)
    blocks = make_blocks(spec, seed=0)
    k, flop_share = pick_prefix(blocks, spec, 0.7)
    batches = make_batches(spec, skip + measured, device=device, seed=1)

    def make_net() -> SplitNet:
        return SplitNet.from_blocks(blocks, k, spec.num_classes)

    def lightning(name: str, module_kw: dict, make_callbacks: Callable[[BenchModule], list], note: str):
        return lightning_contender(name, make_net, batches, skip, device, make_callbacks, note, **module_kw)

    used = {case.baseline for case in OVERHEAD_CASES.values()}
    contenders = [
        lightning(
            BASELINE_NAMES["hand_frozen"],
            {"hand_frozen": True},
            lambda m: [],
            "no_grad + eval backbone, optimizer over trainable params",
        ),
        lightning(BASELINE_NAMES["nothing_frozen"], {}, lambda m: [], "plain Lightning"),
    ]
    contenders = [c for c, kind in zip(contenders, BASELINE_NAMES, strict=True) if kind in used]
    clocks = {name: HookClock() for name in OVERHEAD_CASES}
    for case in OVERHEAD_CASES.values():
        clock = clocks[case.name]

        def make_callbacks(module: BenchModule, case: OverheadCase = case, clock: HookClock = clock) -> list:
            return clock.instrument(case.make_callbacks(module))

        contenders.append(lightning(case.name, case.module_kw, make_callbacks, case.note))
    ctx.log(f"  {len(OVERHEAD_CASES)} case(s), {measured} measured steps per round, {rounds} rounds")
    ms = alternate(contenders, rounds=rounds, warmup_rounds=warmup_rounds, log=ctx.log)
    by_name = {m.name: m for m in ms}
    for name, clock in clocks.items():
        by_name[name].extra["hook_us_per_step"] = clock.us_per_step()

    result = Result(
        description=(
            "Per-step time of a Trainer with one of our callbacks, during steps where the callback changes "
            "nothing, against the same Trainer without it and the same state set up by hand. Goal: the "
            "callback costs at most 2% of a step (ratio ≤ 1.02×). Model: the benchmark ResNet with "
            f"{k} of {len(blocks)} blocks ({flop_share:.0%} of forward FLOPs) as the backbone, small batch "
            "so that per-step overhead is visible."
        ),
        config={
            "net": spec.to_json(),
            "backbone_blocks": k,
            "warmup_steps_per_round": skip,
            "measured_steps_per_round": measured,
            "rounds": rounds,
            "device": str(device),
            "cases": {n: {"baseline": c.baseline, "note": c.note} for n, c in OVERHEAD_CASES.items()},
        },
    )
    for kind in BASELINE_NAMES:
        cases = [c for c in OVERHEAD_CASES.values() if c.baseline == kind]
        if not cases:
            continue
        base = by_name[BASELINE_NAMES[kind]]
        rows = [base] + [by_name[c.name] for c in cases]
        for m in rows[1:]:
            if m.error is None and base.error is None:
                diffs = [(a - b) * 1e6 for a, b in zip(m.values(), base.values(), strict=True)]
                m.extra["overhead_us"] = statistics.median(diffs)
                r = statistics.median(a / b for a, b in zip(m.values(), base.values(), strict=True))
                m.extra["goal"] = "met" if r <= 1.02 else f"missed ({(r - 1) * 100:+.1f}%)"
        result.tables.append(
            Table.build(
                f"Against: {base.name}",
                rows,
                baseline=base.name,
                unit="ms",
                scale=1e3,
                label="step time",
                extra_columns={
                    "overhead per step (µs, median of per-round differences)": lambda m: (
                        fmt_num(m.extra["overhead_us"]) if "overhead_us" in m.extra else "—"
                    ),
                    "≤ 2% goal": lambda m: m.extra.get("goal", "—" if m.error is None else "n/a"),
                    "our hooks per step (µs of CPU time around each hook; goal ≤ 50 on no-op steps)": (
                        lambda m: (
                            fmt_num(m.extra["hook_us_per_step"]) if "hook_us_per_step" in m.extra else "—"
                        )
                    ),
                    "backbone bit-identical after fit": lambda m: m.extra.get(
                        "frozen_prefix_unchanged", "n/a"
                    ),
                },
                notes=[f"{measured} measured steps per round after {skip} warm-up steps."],
            )
        )
    return result
