"""Static freezing, per training step: our ``LayerFreeze`` against plain PyTorch, the hand-written optimum,
Lightning's ``BackboneFinetuning`` and ``finetuning-scheduler`` (phase 0), at three frozen-prefix sizes.

The baseline is the hand-written optimum (frozen prefix under ``torch.no_grad()`` in eval mode, optimizer
holding only the trainable parameters): a freezing tool cannot do better than that, so its ratio says
how much it gives away.  "Lightning, nothing frozen" separates Lightning's own loop cost from freezing.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from benchmarks import hf, peers
from benchmarks.harness import (
    BenchContext,
    Contender,
    Result,
    Table,
    alternate,
    comparison,
    fmt_num,
    pairwise_ratios,
)
from benchmarks.lit import frozen_prefix_report, lightning_contender
from benchmarks.loops import plain_step_round
from benchmarks.models import NetSpec, SplitNet, make_batches, make_blocks, measured_time_share, pick_prefix

TARGET_SHARES = (0.30, 0.70, 0.85)
BASELINE = "PyTorch, hand-frozen (optimum)"


def build_contenders(
    make_net: Callable[[], nn.Module],
    batches,
    skip: int,
    device,
    prefix: list[str] | None = None,
) -> list[Contender]:
    """The six contenders on ``make_net()``: a :class:`SplitNet`, or (``prefix`` given) a transformers model
    whose first blocks ``prefix`` are the frozen part."""
    module_kw = (
        {} if prefix is None else {"module_factory": functools.partial(hf.HFBenchModule, prefix=prefix)}
    )

    def plain(frozen: bool) -> Contender:
        info: dict[str, str] = {}

        def run() -> float:
            net = make_net()
            if prefix is None:
                before = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
                step_s = plain_step_round(net, batches, frozen=frozen, skip=skip, device=device)
                info["frozen_prefix_unchanged"] = frozen_prefix_report(before, net)
                return step_s
            return hf.plain_round(net, prefix, batches, frozen=frozen, skip=skip, device=device)

        name, note = (
            (BASELINE, "prefix under no_grad + eval; optimizer holds trainable params only")
            if frozen
            else ("PyTorch, nothing frozen", "all parameters trained")
        )
        return Contender(name, run, note=note, info=info)

    return [
        plain(False),
        plain(True),
        lightning_contender(
            "Lightning, nothing frozen",
            make_net,
            batches,
            skip,
            device,
            lambda m: [],
            note="Lightning's own loop cost, no freezing",
            **module_kw,
        ),
        lightning_contender(
            "Lightning + LayerFreeze (ours)",
            make_net,
            batches,
            skip,
            device,
            peers.layer_freeze,
            note=peers.NOTES["layer_freeze"],
            **module_kw,
        ),
        lightning_contender(
            "Lightning + BackboneFinetuning",
            make_net,
            batches,
            skip,
            device,
            peers.backbone_finetuning,
            note=peers.NOTES["backbone_finetuning"],
            filter_trainable=True,
            **module_kw,
        ),
        lightning_contender(
            "Lightning + finetuning-scheduler (phase 0)",
            make_net,
            batches,
            skip,
            device,
            peers.finetuning_scheduler,
            note=peers.NOTES["finetuning_scheduler"],
            **module_kw,
        ),
    ]


@comparison("static_freezing", "Static freezing: time per training step", order=10)
def run(ctx: BenchContext) -> Result:
    spec = ctx.pick(NetSpec.quick(), NetSpec.full())
    skip = ctx.pick(2, 3)
    measured = ctx.pick(4, 12)
    rounds = ctx.n_rounds(1, 7)
    warmup_rounds = ctx.pick(0, 1)  # quick mode is a smoke run: every table, no evidence
    device = torch.device(ctx.device)
    blocks = make_blocks(spec, seed=0)
    batches = make_batches(spec, skip + measured, device=device, seed=1)
    result = Result(
        description=(
            "A ResNet-style CNN (stem + 3 stages of basic residual blocks with BatchNorm) on synthetic "
            "in-memory batches, SGD with momentum. The first blocks form the frozen prefix `backbone`. "
            "Each row is the median over rounds of the per-round median step time (time between consecutive "
            "step starts: forward, backward, optimizer step, zero_grad, hooks, data fetch). Baseline: "
            "hand-written PyTorch with the prefix under `torch.no_grad()` in eval mode."
        ),
        config={
            "net": spec.to_json(),
            "warmup_steps_per_round": skip,
            "measured_steps_per_round": measured,
            "rounds": rounds,
            "warmup_rounds": warmup_rounds,
            "device": str(device),
            "optimizer": "SGD(lr=0.05, momentum=0.9)",
        },
    )
    for target in TARGET_SHARES:
        k, flop_share = pick_prefix(blocks, spec, target)

        def make_net(k=k) -> SplitNet:
            return SplitNet.from_blocks(blocks, k, spec.num_classes)

        time_share = measured_time_share(make_net(), batches[0][0], reps=ctx.pick(2, 15), device=device)
        ctx.log(
            f"  prefix ~{target:.0%}: {k}/{len(blocks)} blocks, FLOPs share {flop_share:.1%}, "
            f"time share {time_share:.1%}"
        )
        contenders = build_contenders(make_net, batches, skip, device)
        ms = alternate(contenders, rounds=rounds, warmup_rounds=warmup_rounds, log=ctx.log)
        title = (
            f"Frozen prefix ≈ {target:.0%} of forward compute (measured: {flop_share:.1%} of forward FLOPs, "
            f"{time_share:.1%} of no-grad forward time; {k} of {len(blocks)} blocks)"
        )
        table = _step_table(title, ms)
        base = next(m for m in ms if m.name == BASELINE)
        full = next(m for m in ms if m.name == "PyTorch, nothing frozen")
        if not base.error and not full.error:
            saving = 1 - statistics.median(pairwise_ratios(base.values(), full.values()))
            table.notes.append(
                f"The hand-written optimum saves {fmt_num(saving * 100, 2)}% of a full step here "
                f"(median of per-round ratios)."
            )
        result.tables.append(table)
        result.extra.setdefault("prefix", []).append(
            {
                "target": target,
                "blocks": k,
                "of_blocks": len(blocks),
                "flop_share": flop_share,
                "time_share": time_share,
            }
        )
    for kind in ("resnet", "bert"):
        _transformers_table(ctx, result, kind, skip, measured, rounds, warmup_rounds, device)
    return result


def _step_table(title: str, ms, notes: Sequence[str] = ()) -> Table:
    """Step time against the hand-frozen optimum, with whether each contender left the prefix bit-identical."""
    return Table.build(
        title,
        ms,
        baseline=BASELINE,
        metric="value",
        unit="ms",
        scale=1e3,
        label="step time",
        extra_columns={
            "prefix bit-identical after fit": lambda m: m.extra.get("frozen_prefix_unchanged", "n/a"),
            "how": lambda m: m.note,
        },
        notes=notes,
    )


def _transformers_table(
    ctx: BenchContext,
    result: Result,
    kind: str,
    skip: int,
    measured: int,
    rounds: int,
    warmup_rounds: int,
    device,
) -> None:
    """The same contenders on a transformers model, its first ~70% of blocks frozen."""
    spec = ctx.pick(hf.HFSpec.quick(kind), hf.HFSpec.full(kind))
    batches = hf.make_batches(spec, skip + measured, device=device)
    prefix = hf.prefix_blocks(hf.build_model(spec), spec)
    ctx.log(f"  transformers {kind}: frozen prefix {prefix}")
    contenders = build_contenders(lambda: hf.build_model(spec), batches, skip, device, prefix=prefix)
    ms = alternate(contenders, rounds=rounds, warmup_rounds=warmup_rounds, log=ctx.log)
    model = {"resnet": "ResNetForImageClassification", "bert": "BertForSequenceClassification"}[kind]
    table = _step_table(
        f"transformers {model} (random init), frozen prefix: {len(prefix)} blocks ({', '.join(prefix)})",
        ms,
        notes=[
            "The hand-written optimum here sets requires_grad=False and eval mode on the prefix blocks (autograd then "
            "records nothing for them, as under no_grad) and gives the optimizer only the trainable parameters.",
        ],
    )
    result.tables.append(table)
    result.config.setdefault("transformers", {})[kind] = {**spec.to_json(), "prefix": prefix}
