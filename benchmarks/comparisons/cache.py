"""FrozenPrefixCache: time per step once the cache is warm, and the wall-clock time of a whole fit.

Two workloads, each with every contender in one process, alternated round by round (the harness):

- **cnn**: a 7-layer plain CNN (4 conv blocks of the frozen prefix at full resolution, 2 strided conv
  blocks and a linear head) on synthetic in-memory batches; the prefix is ~70% of the forward FLOPs;
- **digits**: the built-in digits task (:mod:`lightning_freeze.tasks.digits`, 3 conv blocks + linear
  head), where the whole step is a few milliseconds.

Contenders: plain PyTorch with nothing frozen; **the limit**: hand-written PyTorch that computes the
prefix outputs once before training and trains the rest on them; the same limit inside Lightning (a
LightningModule fed the precomputed features, so Lightning's own per-step cost is in both); Lightning
with ``LayerFreeze``, with ``LayerFreeze + FrozenPrefixCache``, with ``FreezeOut`` and with
``FreezeOut + FrozenPrefixCache``; on the CNN also the cache capped at half of what it needs.

A round is one fit of a few epochs; its samples are the median step time of the *last* epoch (the
cache is warm there), the median step time of the first epoch (the cache is filling), and the wall
time of the whole fit (for the limits: the precomputation plus the training). Run alone:
``python -m benchmarks --only cache [--quick]``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from benchmarks.harness import (
    BenchContext,
    Contender,
    Measurement,
    Result,
    Table,
    alternate,
    comparison,
    fmt_num,
    now,
)
from benchmarks.lit import BatchList, BenchModule, make_trainer, quiet
from benchmarks.models import Head, SplitNet

LIMIT = "PyTorch, prefix precomputed (the limit)"
LIMIT_LIT = "Lightning, prefix precomputed"
FULL = "PyTorch, nothing frozen"
GOAL = 0.9
LABELS = {
    "step_cpu_s": "CPU time per step",
    "step_s": "wall time per step",
    "first_epoch_step_cpu_s": "CPU time per step",
    "first_epoch_step_s": "wall time per step",
    "fit_cpu_s": "fit CPU time",
    "fit_s": "fit wall time",
}


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    make_net: Callable[[], SplitNet]
    batches: list
    epochs: int
    description: str
    prefix_share: float


def _cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def cnn_net(width: int, classes: int = 10, seed: int = 0) -> SplitNet:
    """Seven layers: ``backbone`` = 4 conv blocks at full resolution, ``trunk`` = 2 conv blocks at half resolution,
    a linear head. The backbone is about two thirds of the forward FLOPs."""
    torch.manual_seed(seed)
    w = width
    backbone = nn.Sequential(_cbr(3, w), _cbr(w, w), _cbr(w, w), _cbr(w, w))
    trunk = nn.Sequential(_cbr(w, 2 * w, 2), _cbr(2 * w, 2 * w))
    return SplitNet(backbone, trunk, Head(2 * w, classes))


def forward_share(net: SplitNet, x: torch.Tensor) -> float:
    """The backbone's share of the forward FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as c1:
            f = net.backbone(x)
        with FlopCounterMode(display=False) as c2:
            net.head(net.trunk(f))
    a, b = c1.get_total_flops(), c2.get_total_flops()
    return a / (a + b)


def cnn_workload(ctx: BenchContext, device) -> Workload:
    width, batch, n_batches, image = ctx.pick((16, 16, 6, 32), (32, 32, 6, 32))
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(batch, 3, image, image, generator=g).to(device),
            torch.randint(0, 10, (batch,), generator=g).to(device),
        )
        for _ in range(n_batches)
    ]
    template = cnn_net(width)
    share = forward_share(template, batches[0][0].cpu())
    return Workload(
        "cnn",
        lambda: copy.deepcopy(template),
        batches,
        3,
        f"7-layer CNN (width {width}), {n_batches} synthetic batches of {batch}×3×{image}×{image} per epoch",
        share,
    )


def digits_workload(ctx: BenchContext, device) -> Workload:
    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset

    ds = DigitsDataset(classes=[5, 6, 7, 8, 9])
    batch = 64
    g = torch.Generator().manual_seed(2)
    order = torch.randperm(len(ds), generator=g)
    n = ctx.pick(8, len(ds) // batch) * batch
    batches = [
        (ds.images[order[i : i + batch]].to(device), ds._targets[order[i : i + batch]].to(device))
        for i in range(0, n, batch)
    ]
    torch.manual_seed(0)
    clf = DigitsClassifier(pretrained=False)
    template = SplitNet(clf.backbone, nn.Identity(), clf.head)
    share = forward_share(template, batches[0][0].cpu())
    return Workload(
        "digits",
        lambda: copy.deepcopy(template),
        batches,
        3,
        f"digits task (DigitsClassifier: 3 conv blocks + linear head; random init, the speed does not depend on "
        f"the weights), {len(batches)} batches of {batch}×1×8×8 per epoch",
        share,
    )


# ---------------------------------------------------------------------------------------------- rounds
def clocks(device) -> tuple[float, float]:
    """(wall seconds after the device is idle, this process's CPU seconds)."""
    return now(device), time.process_time()


class EpochTimer(L.Callback):
    """Wall-clock and CPU-time stamps at every batch start and at every train-epoch end.

    CPU time (``time.process_time``) counts only this process's work, so it stays meaningful on a machine
    shared with other jobs, where wall time mostly measures the other jobs.
    """

    def __init__(self, device) -> None:
        self.device = device
        self.marks: list[tuple[int, tuple[float, float]]] = []
        self.ends: dict[int, tuple[float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append((trainer.current_epoch, clocks(self.device)))

    def on_train_epoch_end(self, trainer, pl_module):
        self.ends[trainer.current_epoch] = clocks(self.device)

    def step_times(self, epoch: int, which: int = 0) -> list[float]:
        starts = [t[which] for e, t in self.marks if e == epoch] + [self.ends[epoch][which]]
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def _samples(per_epoch_wall, per_epoch_cpu, fit: tuple[float, float]) -> dict[str, float]:
    return {
        "step_s": statistics.median(per_epoch_wall[-1]),
        "step_cpu_s": statistics.median(per_epoch_cpu[-1]),
        "first_epoch_step_s": statistics.median(per_epoch_wall[0]),
        "first_epoch_step_cpu_s": statistics.median(per_epoch_cpu[0]),
        "fit_s": fit[0],
        "fit_cpu_s": fit[1],
    }


def _lightning_round(module_factory, batches, callbacks, epochs: int, device, info: dict) -> dict[str, float]:
    module = module_factory()
    timer = EpochTimer(torch.device(device))
    with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-cache-") as tmp:
        trainer = make_trainer(
            len(batches) * epochs, [timer, *callbacks], device=device, root_dir=tmp, max_epochs=epochs
        )
        loader = DataLoader(BatchList(batches), batch_size=None, shuffle=True)
        torch.manual_seed(0)
        w0, c0 = clocks(device)
        trainer.fit(module, train_dataloaders=loader)
        w1, c1 = clocks(device)
    info["weights"] = _digest(module)
    for cb in callbacks:
        if getattr(cb, "history", None) and hasattr(cb, "fingerprinter"):
            info["hit_rate"] = cb.history[-1]["hit_rate"]
            info["cache_mb"] = max(h["bytes"] for h in cb.history) / 1e6
            info["off"] = cb.off_reason
    return _samples(
        [timer.step_times(e, 0) for e in range(epochs)],
        [timer.step_times(e, 1) for e in range(epochs)],
        (w1 - w0, c1 - c0),
    )


def _digest(module: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _plain_round(net: SplitNet, batches, epochs: int, device, precompute: bool) -> dict[str, float]:
    net = net.to(device)
    net.train()
    w0, c0 = clocks(device)
    if precompute:
        net.backbone.eval().requires_grad_(False)
        with torch.no_grad():
            data = [(net.backbone(x), y) for x, y in batches]
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        data = batches
        params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    per_epoch: list[list[tuple[float, float]]] = []
    for _ in range(epochs):
        marks = []
        for x, y in data:
            marks.append(clocks(device))
            out = net.head(net.trunk(x if precompute else net.backbone(x)))
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        marks.append(clocks(device))
        per_epoch.append(marks)
    w1, c1 = clocks(device)

    def steps(marks, which):
        return [b[which] - a[which] for a, b in zip(marks, marks[1:], strict=False)]

    return _samples([steps(m, 0) for m in per_epoch], [steps(m, 1) for m in per_epoch], (w1 - w0, c1 - c0))


class FeatureModule(L.LightningModule):
    """The limit inside Lightning: trunk + head trained on precomputed prefix outputs."""

    def __init__(self, net: SplitNet):
        super().__init__()
        self.trunk, self.head = net.trunk, net.head

    def training_step(self, batch, batch_idx):
        f, y = batch
        return F.cross_entropy(self.head(self.trunk(f)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _lightning_limit_round(w: Workload, device, info: dict) -> dict[str, float]:
    net = w.make_net().to(device)
    w0, c0 = clocks(device)
    net.backbone.eval()
    with torch.no_grad():
        feats = [(net.backbone(x), y) for x, y in w.batches]
    w1, c1 = clocks(device)
    out = _lightning_round(lambda: FeatureModule(net), feats, [], w.epochs, device, info)
    out["fit_s"] += w1 - w0
    out["fit_cpu_s"] += c1 - c0
    return out


def contenders(w: Workload, device, cap_bytes: int | None) -> tuple[list[Contender], dict[str, dict]]:
    from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze

    infos: dict[str, dict] = {}

    def lit(name: str, make_callbacks: Callable[[], list], note: str) -> Contender:
        info = infos.setdefault(name, {})
        return Contender(
            name,
            lambda: _lightning_round(
                lambda: BenchModule(w.make_net()), w.batches, make_callbacks(), w.epochs, device, info
            ),
            note=note,
        )

    n_prefix = len(w.make_net().backbone)
    freezeout = lambda: FreezeOut(layers="backbone.*", t0=0.5, plot=False)  # noqa: E731
    out = [
        Contender(
            FULL,
            lambda: _plain_round(w.make_net(), w.batches, w.epochs, device, False),
            note="all parameters trained",
        ),
        Contender(
            LIMIT,
            lambda: _plain_round(w.make_net(), w.batches, w.epochs, device, True),
            note="prefix outputs computed once before training (their time is in the fit time)",
        ),
        Contender(
            LIMIT_LIT,
            lambda: _lightning_limit_round(w, device, infos.setdefault(LIMIT_LIT, {})),
            note="a LightningModule trained on the precomputed prefix outputs",
        ),
        lit(
            "Lightning + LayerFreeze",
            lambda: [LayerFreeze("backbone", plot=False)],
            note='LayerFreeze("backbone")',
        ),
        lit(
            "Lightning + LayerFreeze + FrozenPrefixCache",
            lambda: [LayerFreeze("backbone", plot=False), FrozenPrefixCache()],
            note="the cache fills in epoch 0 and serves from epoch 1 on",
        ),
        lit(
            "Lightning + FreezeOut",
            lambda: [freezeout()],
            note=f'FreezeOut(layers="backbone.*", t0=0.5): the {n_prefix} prefix blocks freeze one by one',
        ),
        lit(
            "Lightning + FreezeOut + FrozenPrefixCache",
            lambda: [freezeout(), FrozenPrefixCache()],
            note="the cache follows the frozen boundary and extends its rows through each newly frozen block",
        ),
    ]
    if cap_bytes is not None:
        out.append(
            lit(
                "Lightning + LayerFreeze + FrozenPrefixCache (budget: half)",
                lambda: [LayerFreeze("backbone", plot=False), FrozenPrefixCache(max_bytes=cap_bytes)],
                note="max_bytes = half of what the whole epoch needs: only the first half is cached",
            )
        )
    return out, infos


def _prefix_bytes(w: Workload) -> int:
    net = w.make_net().eval()
    with torch.no_grad():
        f = net.backbone(w.batches[0][0][:1].cpu())
    return f.numel() * f.element_size() * sum(x.shape[0] for x, _ in w.batches)


# ---------------------------------------------------------------------------------------------- tables
def _ratio(values: Sequence[float], base: Sequence[float]) -> float:
    return statistics.median([b / v for v, b in zip(values, base, strict=True)])


def _table(w: Workload, ms: list[Measurement], infos: dict[str, dict], metric: str, title: str) -> Table:
    by = {m.name: m for m in ms}
    full = by[FULL].values(metric) if by[FULL].error is None else None
    limit = by[LIMIT].values(metric) if by[LIMIT].error is None else None
    limit_lit = by[LIMIT_LIT].values(metric) if by[LIMIT_LIT].error is None else None
    uncached = {
        "Lightning + LayerFreeze + FrozenPrefixCache": "Lightning + LayerFreeze",
        "Lightning + LayerFreeze + FrozenPrefixCache (budget: half)": "Lightning + LayerFreeze",
        "Lightning + FreezeOut + FrozenPrefixCache": "Lightning + FreezeOut",
    }

    def speedup(m: Measurement) -> str:
        if full is None or m.error or not m.values(metric):
            return "—"
        return f"{_ratio(m.values(metric), full):.2f}×"

    def of_limit(ref):
        def cell(m: Measurement) -> str:
            if ref is None or m.error or not m.values(metric):
                return "—"
            return f"{statistics.median([a / b for a, b in zip(ref, m.values(metric), strict=True)]):.2f}"

        return cell

    def cache_cell(m: Measurement) -> str:
        info = infos.get(m.name, {})
        if "hit_rate" not in info:
            return "—"
        off = f"; switched off: {info['off']}" if info.get("off") else ""
        return f"hit rate {info['hit_rate']:.0%} (last epoch), {fmt_num(info['cache_mb'])} MB{off}"

    def exact_cell(m: Measurement) -> str:
        other = uncached.get(m.name)
        if other is None or "weights" not in infos.get(m.name, {}) or "weights" not in infos.get(other, {}):
            return "—"
        return "yes" if infos[m.name]["weights"] == infos[other]["weights"] else "NO"

    for m in ms:
        m.extra.update({k: v for k, v in infos.get(m.name, {}).items() if k != "weights"})
    return Table.build(
        title,
        ms,
        baseline=LIMIT,
        metric=metric,
        unit="s" if metric.startswith("fit") else "ms",
        scale=1.0 if metric.startswith("fit") else 1e3,
        label=LABELS[metric],
        extra_columns={
            "speedup vs PyTorch, nothing frozen": speedup,
            "share of the limit's speedup": of_limit(limit),
            "share of the Lightning limit's speedup": of_limit(limit_lit),
            "cache": cache_cell,
            "weights = uncached run": exact_cell,
        },
        notes=[
            f"'share of the limit's speedup' = limit time ÷ contender time (1.00 = as fast as the limit; "
            f"the goal for the warm cache is ≥ {GOAL})."
        ],
    )


@comparison("cache", "FrozenPrefixCache: the frozen prefix computed once", order=30)
def run(ctx: BenchContext) -> Result:
    # Intra-op threads are the harness's choice (--threads; auto: 1 on a loaded machine).
    device = torch.device(ctx.device)
    rounds = ctx.n_rounds(2, 4)
    result = Result(
        "cache",
        "FrozenPrefixCache: the frozen prefix computed once",
        description=(
            "Time per step once the cache is warm (median step of the last epoch of each fit), per step while "
            "it fills (first epoch), and for the whole fit, per workload. Each is measured as CPU time of the "
            "process (time.process_time: robust on a machine shared with other jobs; with several intra-op "
            "threads it sums their time) "
            "and as wall time. Baseline: hand-written PyTorch with the prefix outputs computed once before "
            "training (the limit). Lightning runs use in-memory batches shuffled per epoch, "
            "SGD(lr=0.05, momentum=0.9), no validation, no logger."
        ),
        config={
            "rounds": rounds,
            "warmup_rounds": 1,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
    )
    for w in (cnn_workload(ctx, device), digits_workload(ctx, device)):
        cap = _prefix_bytes(w) // 2 if w.name == "cnn" else None
        ctx.log(
            f"  {w.name}: {w.description}; prefix = {w.prefix_share:.1%} of forward FLOPs; {w.epochs} epochs"
        )
        cs, infos = contenders(w, device, cap)
        ms = alternate(cs, rounds=rounds, warmup_rounds=1, log=ctx.log)
        result.config[w.name] = {
            "description": w.description,
            "prefix_forward_flops_share": w.prefix_share,
            "epochs": w.epochs,
            "batches_per_epoch": len(w.batches),
            "half_budget_bytes": cap,
        }
        head = f"{w.name}: {w.description}; prefix {w.prefix_share:.0%} of forward FLOPs"
        for metric, what in (
            ("step_cpu_s", f"warm step, CPU time (last of {w.epochs} epochs)"),
            ("step_s", f"warm step, wall time (last of {w.epochs} epochs)"),
            ("first_epoch_step_cpu_s", "step in epoch 0 (cache filling), CPU time"),
            ("fit_cpu_s", f"whole fit ({w.epochs} epochs), CPU time"),
            ("fit_s", f"whole fit ({w.epochs} epochs), wall time"),
        ):
            result.tables.append(_table(w, ms, infos, metric, f"{head} — {what}"))
    return result
