"""What the FrozenPrefixCache comparisons share: workloads, rounds, contenders and tables.

Workloads (each comparison names the ones it runs):

- **cnn**: a 7-layer plain CNN (4 conv blocks of the frozen prefix at full resolution, 2 strided conv
  blocks and a linear head) on synthetic in-memory batches; the prefix is ~70% of the forward FLOPs;
- **cnn_shuffled**: the same CNN and the same samples, loaded the way most users load them: a per-sample data
  set in ``DataLoader(dataset, batch_size=32, shuffle=True)`` (a seeded generator, so every round and every
  contender sees the same order), so every batch is a new mix of samples;
- **digits**: the built-in digits task (:mod:`lightning_freeze.tasks.digits`, 3 conv blocks + linear
  head), where the whole step is a few milliseconds;
- **resnet**: a transformers ``ResNetForImageClassification`` (random init, :mod:`benchmarks.hf`) inside a
  plain LightningModule; the frozen prefix is its first ``auto`` blocks (embedder and the first stages,
  about 70% of the blocks) and the cut falls *inside* ``ResNetModel.forward``.

Contenders: plain PyTorch with nothing frozen; **the limit**: hand-written PyTorch that computes the
prefix outputs once before training and trains the rest on them; the same limit inside Lightning (a
LightningModule fed the precomputed features, so Lightning's own per-step cost is in both); Lightning
with ``LayerFreeze``, with ``LayerFreeze + FrozenPrefixCache`` (rows keyed by hashing the inputs), the same
with every batch carrying its samples' dataset indices (``(x, y, index)``, ``sample_ids=-1``: rows keyed by
index), with ``FreezeOut`` and with ``FreezeOut + FrozenPrefixCache``.

Every contender iterates the workload's loader (:meth:`Workload.loader`): the limits iterate it over the
precomputed prefix outputs instead of the inputs. Two cases, both reported:

- **fixed batches** (cnn, resnet, digits): the batches are fixed and only their order is shuffled, as the
  limit's precomputed feature batches are, so a warm cache asks for each batch's rows in the order it stored
  them and serves them without a copy;
- **shuffled samples** (cnn_shuffled): the cache gathers each batch's rows with one indexed copy, and the limit
  gathers its precomputed rows the same way (the loader stacks them), so the comparison stays fair.

The figures of the latest full run are in benchmarks/results/README.md and docs/cache.md (*Numbers*).

A round is one fit of a few epochs; its samples are the median step time of the *last* epoch (the
cache is warm there), the median step time of the first epoch (the cache is filling), and the time
of the whole fit (for the limits: the precomputation plus the training), each as wall time and as this
process's CPU time. Steps are timed start to start on the device-synchronised clock (:mod:`benchmarks.harness`).
"""

from __future__ import annotations

import copy
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from benchmarks.harness import (
    BenchContext,
    Contender,
    Measurement,
    Result,
    StepClock,
    Table,
    fmt_num,
    now,
    pairwise_ratios,
)
from benchmarks.lit import BatchList, BenchModule, make_trainer, quiet
from benchmarks.models import Head, SplitNet

LIMIT = "PyTorch, prefix precomputed (the limit)"
LIMIT_LIT = "Lightning, prefix precomputed"
FULL = "PyTorch, nothing frozen"
LF, LF_CACHE = "Lightning + LayerFreeze", "Lightning + LayerFreeze + FrozenPrefixCache"
LF_CACHE_IDS = "Lightning + LayerFreeze + FrozenPrefixCache, keyed by sample id"
FO, FO_CACHE = "Lightning + FreezeOut", "Lightning + FreezeOut + FrozenPrefixCache"
GOALS = {"cnn": 0.9, "cnn_shuffled": 0.9, "resnet": 0.8}
LABELS = {
    "step_cpu_s": "CPU time per step",
    "step_s": "wall time per step",
    "first_epoch_step_cpu_s": "CPU time per step",
    "first_epoch_step_s": "wall time per step",
    "fit_cpu_s": "fit CPU time",
    "fit_s": "fit wall time",
}
UNCACHED = {LF_CACHE: LF, LF_CACHE_IDS: LF, FO_CACHE: FO}
DESCRIPTION = (
    "Time per step once the cache is warm (median step of the last epoch of each fit), per step while it fills "
    "(first epoch), and for the whole fit. Each is measured as CPU time of the process (time.process_time: robust "
    "on a machine shared with other jobs; with several intra-op threads it sums their time) and as wall time. "
    "Data: in-memory batches of fixed composition shuffled in their order per epoch, or (cnn_shuffled) a per-sample "
    "data set in DataLoader(batch_size=32, shuffle=True), seeded; the limits iterate the same loader over the "
    "precomputed prefix outputs. SGD with momentum 0.9, no validation, no logger. "
    "Every ratio is contender ÷ reference (lower is better)."
)


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A model with a frozen prefix, its batches, and how to train the rest on precomputed prefix outputs."""

    name: str
    make_module: Callable[[], L.LightningModule]  # the user's LightningModule, nothing frozen yet
    batches: list
    epochs: int
    description: str
    prefix_share: float  # the frozen prefix's share of the forward FLOPs
    frozen: str | list[str]  # what LayerFreeze freezes
    freezeout: str | list[str] | None  # what FreezeOut manages (None: no FreezeOut contenders)
    # (model, batches) -> (features per batch, a function training the rest on them for one step)
    limit: Callable[[], tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], Callable[[], list]]]
    full_step: Callable[[nn.Module, object], torch.Tensor] | None = None  # the loss, nothing frozen
    lr: float = 0.05
    extra: dict = field(default_factory=dict)
    shuffle_samples: bool = False  # per-sample data shuffled every epoch, instead of fixed batches

    def loader(self, batches: list, with_index: bool = False) -> DataLoader:
        """What every contender iterates, over the inputs or over the precomputed prefix outputs (``batches``,
        ``(x, y)`` pairs): the fixed batches in a shuffled order, or their samples shuffled and batched again.
        ``with_index`` adds each sample's index in the data set, ``(x, y, index)``. Seeded: every round and every
        contender gets the same order."""
        order = torch.Generator().manual_seed(0)
        if self.shuffle_samples:
            x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))
            samples = Samples(x, y, with_index)
            return DataLoader(samples, batch_size=len(batches[0][0]), shuffle=True, generator=order)
        return DataLoader(
            BatchList(with_ids(batches) if with_index else batches),
            batch_size=None,
            shuffle=True,
            generator=order,
        )


class Samples(Dataset):
    """One sample per item, ``(x[i], y[i])`` or ``(x[i], y[i], i)``: what ``DataLoader(batch_size=...)`` collates."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, with_index: bool) -> None:
        self.x, self.y, self.with_index = x, y, with_index

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return (self.x[i], self.y[i], i) if self.with_index else (self.x[i], self.y[i])


class CacheBenchModule(BenchModule):
    """:class:`~benchmarks.lit.BenchModule` on ``(x, y)`` or ``(x, y, index)`` batches."""

    @override
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


def with_ids(batches: list) -> list:
    """``(x, y)`` batches as ``(x, y, index)``: each sample's index in the (fixed) data set."""
    start, out = 0, []
    for x, y in batches:
        out.append((x, y, torch.arange(start, start + len(x), device=x.device)))
        start += len(x)
    return out


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


def flops_share(prefix: Callable[[], object], whole: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        with FlopCounterMode(display=False) as c1:
            prefix()
        with FlopCounterMode(display=False) as c2:
            whole()
    return c1.get_total_flops() / c2.get_total_flops()


def _split_net_workload(
    name: str,
    template: SplitNet,
    batches: list,
    description: str,
    epochs: int = 3,
    shuffle_samples: bool = False,
) -> Workload:
    net = copy.deepcopy(template).eval()
    x0 = batches[0][0].cpu()
    share = flops_share(lambda: net.backbone(x0), lambda: net(x0))

    def limit():
        net = copy.deepcopy(template)
        net.backbone.eval().requires_grad_(False)
        return (
            net.train(),
            lambda f: net.head(net.trunk(f)),
            lambda: [(net.backbone(x), y) for x, y in batches],
        )

    return Workload(
        name,
        lambda: CacheBenchModule(copy.deepcopy(template)),
        batches,
        epochs,
        description,
        share,
        frozen="backbone",
        freezeout=None if shuffle_samples else "backbone.*",  # FreezeOut + cache: the fixed-batch case only
        limit=limit,
        full_step=lambda net, batch: F.cross_entropy(net(batch[0]), batch[1]),
        shuffle_samples=shuffle_samples,
    )


def _image_batches(n: int, batch: int, image: int, device, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, image, image, generator=g).to(device),
            torch.randint(0, 10, (batch,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def cnn_workload(
    ctx: BenchContext, device, n_batches: int | None = None, shuffle_samples: bool = False
) -> Workload:
    """The CNN on fixed batches (``cnn``), or on the same samples shuffled every epoch (``cnn_shuffled``)."""
    width, batch, default_n, image = ctx.pick((16, 16, 6, 32), (32, 32, 6, 32))
    n = n_batches or default_n
    data = (
        f"{n * batch} synthetic samples of 3×{image}×{image}, DataLoader(batch_size={batch}, shuffle=True)"
        if shuffle_samples
        else f"{n} synthetic batches of {batch}×3×{image}×{image} per epoch"
    )
    return _split_net_workload(
        "cnn_shuffled" if shuffle_samples else "cnn",
        cnn_net(width),
        _image_batches(n, batch, image, device),
        f"7-layer CNN (width {width}), {data}",
        shuffle_samples=shuffle_samples,
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
    return _split_net_workload(
        "digits",
        SplitNet(clf.backbone, nn.Identity(), clf.head),
        batches,
        f"digits task (DigitsClassifier: 3 conv blocks + linear head; random init, the speed does not depend on "
        f"the weights), {len(batches)} batches of {batch}×1×8×8 per epoch",
    )


class ResNetModule(L.LightningModule):
    """A user's LightningModule around a transformers image classifier (``self.model = ...``)."""

    def __init__(self, model: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])  # (x, y) or (x, y, index)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def resnet_workload(ctx: BenchContext, device) -> Workload:
    from benchmarks.hf import HFSpec, build_model, make_batches

    spec = HFSpec.quick("resnet") if ctx.quick else HFSpec.full("resnet")
    template = build_model(spec)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(spec, ctx.pick(4, 8))]
    net = copy.deepcopy(template).eval()
    x0 = batches[0][0].cpu()

    def prefix_of(model: nn.Module, x: torch.Tensor, n_stages: int) -> torch.Tensor:
        h = model.resnet.embedder(x)
        for stage in model.resnet.encoder.stages[:n_stages]:
            h = stage(h)
        return h

    # the embedder and as many stages as make the prefix's share of the forward FLOPs closest to 70%
    shares = [
        flops_share(lambda k=k: prefix_of(net, x0, k), lambda: net(pixel_values=x0))
        for k in range(len(net.resnet.encoder.stages))
    ]
    n_frozen_stages = min(range(len(shares)), key=lambda k: abs(shares[k] - 0.7))
    share = shares[n_frozen_stages]
    blocks = ["resnet.embedder"] + [f"resnet.encoder.stages.{k}" for k in range(n_frozen_stages)]

    def suffix_of(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        for stage in model.resnet.encoder.stages[n_frozen_stages:]:
            h = stage(h)
        return model.classifier(model.resnet.pooler(h))

    with torch.no_grad():  # the hand-written suffix is the model's own computation
        assert torch.equal(suffix_of(net, prefix_of(net, x0, n_frozen_stages)), net(pixel_values=x0).logits)

    def limit():
        model = copy.deepcopy(template).to(device).train()
        for name in blocks:
            model.get_submodule(name).eval().requires_grad_(False)
        features = lambda: [(prefix_of(model, x, n_frozen_stages), y) for x, y in batches]  # noqa: E731
        return model, lambda h: suffix_of(model, h), features

    return Workload(
        "resnet",
        lambda: ResNetModule(copy.deepcopy(template)),
        batches,
        3,
        f"transformers ResNet (basic blocks, widths {[spec.width * 2**i for i in range(4)]}, depth {spec.depth}), "
        f"{len(batches)} batches of {spec.batch}×3×{spec.size}×{spec.size}; frozen: {blocks}",
        share,
        frozen=[f"model.{b}" for b in blocks],
        freezeout=None,
        limit=limit,
        full_step=lambda model, batch: F.cross_entropy(model(pixel_values=batch[0]).logits, batch[1]),
        lr=0.01,
        extra={"frozen_blocks": blocks, "spec": spec.to_json()},
    )


# ---------------------------------------------------------------------------------------------- rounds
def clocks(device) -> tuple[float, float]:
    """(wall seconds after the device is idle, this process's CPU seconds)."""
    return now(device), time.process_time()


class EpochTimer(L.Callback):
    """The harness's step clock, one per epoch: wall and CPU time of every step, start to start, the last step of
    an epoch ending at the epoch's end.

    CPU time (``time.process_time``) counts only this process's work, so it stays meaningful on a machine
    shared with other jobs, where wall time mostly measures the other jobs.
    """

    def __init__(self, device) -> None:
        self.device = device
        self.epochs: dict[int, StepClock] = {}

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs[trainer.current_epoch] = StepClock(self.device)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs[trainer.current_epoch].step()

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs[trainer.current_epoch].close()

    def step_times(self, epoch: int, which: int = 0) -> list[float]:
        clock = self.epochs[epoch]
        return clock.step_times() if which == 0 else clock.cpu_step_times()


class ColdPages(L.Callback):
    """Drops the disk tier's pages from the page cache before every epoch, so its reads come from the disk."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module):
        from lightning_freeze.cache.disk import drop_from_page_cache

        drop_from_page_cache(self.folder)


def _samples(per_epoch_wall, per_epoch_cpu, fit: tuple[float, float]) -> dict[str, float]:
    return {
        "step_s": statistics.median(per_epoch_wall[-1]),
        "step_cpu_s": statistics.median(per_epoch_cpu[-1]),
        "first_epoch_step_s": statistics.median(per_epoch_wall[0]),
        "first_epoch_step_cpu_s": statistics.median(per_epoch_cpu[0]),
        "fit_s": fit[0],
        "fit_cpu_s": fit[1],
    }


def _lightning_round(
    module_factory, loader: DataLoader, callbacks, epochs: int, device, info: dict
) -> dict[str, float]:
    module = module_factory()
    timer = EpochTimer(torch.device(device))
    with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-cache-") as tmp:
        trainer = make_trainer(
            len(loader) * epochs, [timer, *callbacks], device=device, root_dir=tmp, max_epochs=epochs
        )
        torch.manual_seed(0)
        w0, c0 = clocks(device)
        trainer.fit(module, train_dataloaders=loader)
        w1, c1 = clocks(device)
    info["weights"] = _digest(module)
    for cb in callbacks:
        if type(cb).__name__ == "FrozenPrefixCache" and cb.history:
            last = cb.history[-1]
            steps = max(1, last["steps"])
            # the cache's own work in the last epoch's steps (its hooks, keys, lookups, serving), wall time, per round
            info.setdefault("overhead_ms_rounds", []).append(1e3 * last["overhead_s"] / steps)
            info.update(
                hit_rate=last["hit_rate"],
                cache_mb=max(h["bytes"] for h in cb.history) / 1e6,
                disk_mb=max(h["disk_bytes"] for h in cb.history) / 1e6,
                cached=last["cached"],
                off=last["off"],
                overhead_ms=statistics.median(info["overhead_ms_rounds"]),
                hashed_per_step=last["hashed"] / steps,
                uncopied_share=last["uncopied"] / max(1, last["hits"]),
            )
    return _samples(
        [timer.step_times(e, 0) for e in range(epochs)],
        [timer.step_times(e, 1) for e in range(epochs)],
        (w1 - w0, c1 - c0),
    )


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _plain_round(w: Workload, device, precompute: bool) -> dict[str, float]:
    """Hand-written PyTorch: nothing frozen, or the prefix computed once before training (the limit)."""
    w0, c0 = clocks(device)
    if precompute:
        model, rest, features = w.limit()
        with torch.no_grad():
            data = w.loader(features())
        step = lambda batch: F.cross_entropy(rest(batch[0]), batch[1])  # noqa: E731
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model = w.make_module().to(device).train()
        data = w.loader(w.batches)
        step = lambda batch: w.full_step(model.model if hasattr(model, "model") else model, batch)  # noqa: E731
        params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=w.lr, momentum=0.9)
    per_epoch: list[StepClock] = []
    for _ in range(w.epochs):
        clock = StepClock(device)
        for batch in data:
            clock.step()
            loss = step(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        clock.close()
        per_epoch.append(clock)
    w1, c1 = clocks(device)

    return _samples(
        [c.step_times() for c in per_epoch], [c.cpu_step_times() for c in per_epoch], (w1 - w0, c1 - c0)
    )


class FeatureModule(L.LightningModule):
    """The limit inside Lightning: the rest of the network trained on precomputed prefix outputs."""

    def __init__(self, model: nn.Module, rest: Callable[[torch.Tensor], torch.Tensor], lr: float):
        super().__init__()
        self.model, self.rest, self.lr = model, rest, lr

    def training_step(self, batch, batch_idx):
        f, y = batch
        return F.cross_entropy(self.rest(f), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def _lightning_limit_round(w: Workload, device, info: dict) -> dict[str, float]:
    w0, c0 = clocks(device)
    model, rest, features = w.limit()
    with torch.no_grad():
        feats = features()
    w1, c1 = clocks(device)
    out = _lightning_round(
        lambda: FeatureModule(model, rest, w.lr), w.loader(feats), [], w.epochs, device, info
    )
    out["fit_s"] += w1 - w0
    out["fit_cpu_s"] += c1 - c0
    return out


def contenders(w: Workload, device) -> tuple[list[Contender], dict[str, dict]]:
    from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze

    infos: dict[str, dict] = {}

    def lit(name: str, make_callbacks: Callable[[], list], note: str, with_index: bool = False) -> Contender:
        info = infos.setdefault(name, {})
        return Contender(
            name,
            lambda: _lightning_round(
                w.make_module, w.loader(w.batches, with_index), make_callbacks(), w.epochs, device, info
            ),
            note=note,
        )

    out = [
        Contender(FULL, lambda: _plain_round(w, device, False), note="all parameters trained"),
        Contender(
            LIMIT,
            lambda: _plain_round(w, device, True),
            note="prefix outputs computed once before training (their time is in the fit time)"
            + (
                "; the loader stacks each batch's precomputed rows (one gather copy)"
                if w.shuffle_samples
                else ""
            ),
        ),
        Contender(
            LIMIT_LIT,
            lambda: _lightning_limit_round(w, device, infos.setdefault(LIMIT_LIT, {})),
            note="a LightningModule trained on the precomputed prefix outputs",
        ),
        lit(LF, lambda: [LayerFreeze(w.frozen, plot=False)], note=f"LayerFreeze({w.frozen!r})"),
        lit(
            LF_CACHE,
            lambda: [LayerFreeze(w.frozen, plot=False), FrozenPrefixCache(max_disk_bytes=0, sample_ids=None)],
            note="the cache fills in epoch 0 and serves from epoch 1 on; rows keyed by hashing the inputs",
        ),
        lit(
            LF_CACHE_IDS,
            lambda: [LayerFreeze(w.frozen, plot=False), FrozenPrefixCache(max_disk_bytes=0, sample_ids=-1)],
            note="batches (x, y, index): inputs hashed in epochs 0-1, then one row per step",
            with_index=True,
        ),
    ]
    if w.freezeout is not None:
        freezeout = lambda: FreezeOut(layers=w.freezeout, t0=0.5, plot=False)  # noqa: E731
        out += [
            lit(
                FO,
                lambda: [freezeout()],
                note=f"FreezeOut(layers={w.freezeout!r}, t0=0.5): blocks freeze one by one",
            ),
            lit(
                FO_CACHE,
                lambda: [freezeout(), FrozenPrefixCache(max_disk_bytes=0)],
                note="the cache follows the frozen boundary and carries its rows through each newly frozen block",
            ),
        ]
    return out, infos


def disk_contenders(w: Workload, device, ram_bytes: int) -> tuple[list[Contender], dict[str, dict]]:
    from lightning_freeze import FrozenPrefixCache, LayerFreeze

    infos: dict[str, dict] = {}

    def lit(name: str, cache_kw: dict | None, note: str, cold: bool = False) -> Contender:
        info = infos.setdefault(name, {})

        def callbacks():
            cbs: list = [LayerFreeze(w.frozen, plot=False)]
            if cache_kw is not None:
                cache = FrozenPrefixCache(max_bytes=ram_bytes, **cache_kw)
                cbs += [cache] + ([ColdPages(cache_kw["disk_dir"])] if cold else [])
            return cbs

        return Contender(
            name,
            lambda: _lightning_round(w.make_module, w.loader(w.batches), callbacks(), w.epochs, device, info),
            note=note,
        )

    disk = dict(max_disk_bytes="4GB", disk_dir=tempfile.mkdtemp(prefix="lf-bench-disk-"))
    return [
        lit(LF, None, "the prefix is computed every step"),
        lit(
            "+ cache, RAM only",
            {"max_disk_bytes": 0},
            "max_bytes holds a quarter of the rows; the rest is computed",
        ),
        lit("+ cache, RAM + disk", disk, "rows past max_bytes on disk; the page cache holds them (warm)"),
        lit(
            "+ cache, RAM + disk, cold",
            disk,
            "the disk tier's pages dropped before every epoch (posix_fadvise DONTNEED): reads from the disk, at the step",
            cold=True,
        ),
    ], infos


def compile_contenders(w: Workload, device) -> tuple[list[Contender], dict[str, dict]]:
    from lightning_freeze import FrozenPrefixCache, LayerFreeze

    infos: dict[str, dict] = {}

    def compiled_module():
        module = w.make_module()
        module.model = torch.compile(module.model)
        return module

    def lit(name: str, cache: bool) -> Contender:
        info = infos.setdefault(name, {})

        def run():
            torch._dynamo.reset()  # every round compiles (inductor's on-disk cache may make later ones quicker)
            cbs = [LayerFreeze(w.frozen, plot=False)] + (
                [FrozenPrefixCache(max_disk_bytes=0)] if cache else []
            )
            out = _lightning_round(compiled_module, w.loader(w.batches), cbs, w.epochs, device, info)
            from torch._dynamo.utils import counters

            info["graphs"] = counters["stats"].get("unique_graphs", 0)
            return out

        return Contender(name, run, note="model.model = torch.compile(model.model) (inductor)")

    return [lit(f"{LF}, compiled", False), lit(f"{LF_CACHE}, compiled", True)], infos


# ---------------------------------------------------------------------------------------------- tables
def _ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """Contender ÷ baseline, paired by round, median (lower is better, as in every benchmark table)."""
    return statistics.median(pairwise_ratios(values, base))


def _cache_cell(infos: dict[str, dict]) -> Callable[[Measurement], str]:
    def cell(m: Measurement) -> str:
        info = infos.get(m.name, {})
        if "hit_rate" not in info:
            return "—"
        rate = "no lookups" if info["hit_rate"] is None else f"hit rate {info['hit_rate']:.0%} (last epoch)"
        disk = f" ({fmt_num(info['disk_mb'])} MB on disk)" if info.get("disk_mb") else ""
        off = f"; switched off: {info['off']}" if info.get("off") else ""
        work = f"; our work {info['overhead_ms']:.2f} ms/step" if info.get("overhead_ms") is not None else ""
        return f"{rate}, {fmt_num(info['cache_mb'])} MB{disk}{work}{off}"

    return cell


def _exact_cell(infos: dict[str, dict], uncached: dict[str, str]) -> Callable[[Measurement], str]:
    def cell(m: Measurement) -> str:
        other = uncached.get(m.name)
        if other is None or "weights" not in infos.get(m.name, {}) or "weights" not in infos.get(other, {}):
            return "—"
        return "yes" if infos[m.name]["weights"] == infos[other]["weights"] else "NO"

    return cell


def table(w: Workload, ms: list[Measurement], infos: dict[str, dict], metric: str, title: str) -> Table:
    by = {m.name: m for m in ms}
    full = by[FULL].values(metric) if by[FULL].error is None else None
    limit_lit = by[LIMIT_LIT].values(metric) if by[LIMIT_LIT].error is None else None

    def of(ref):
        def cell(m: Measurement) -> str:
            if ref is None or m.error or not m.values(metric):
                return "—"
            return f"{_ratio(m.values(metric), ref):.2f}×"

        return cell

    goal = GOALS.get(w.name)
    return simple_table(
        title,
        ms,
        infos,
        LIMIT,
        metric,
        UNCACHED,
        columns={
            "÷ PyTorch, nothing frozen": of(full),
            "÷ the Lightning limit": of(limit_lit),
        },
        notes=[
            "Every ratio is contender ÷ reference, per round, median: lower is better, 1.00× = as fast as the "
            "reference. The ratio to the limit (the baseline column) is the inverse of the share of the limit's speedup quoted in docs/cache.md"
            + (
                f"; the goal for the warm cache here is ≤ {1 / goal:.2f}× (a share ≥ {goal})."
                if goal
                else "."
            )
        ],
    )


def work_table(title: str, infos: dict[str, dict]) -> Table:
    """Our work per warm step, on its own: the cache's step hooks, keys, lookups, the rows, building the served
    values (its ``overhead_s`` over the last epoch's steps; median and best over the rounds)."""
    rows, data = [], []
    for name, info in infos.items():
        if info.get("overhead_ms") is None:
            continue
        best = min(info["overhead_ms_rounds"])
        rows.append([
            name, f"{info['overhead_ms']:.2f} ms (best {best:.2f})", f"{info['hashed_per_step']:.0f}",
            f"{info['uncopied_share']:.0%}",
        ])  # fmt: skip
        data.append({"name": name, "overhead_ms": info["overhead_ms"], "best_ms": best,
                     "rounds_ms": info["overhead_ms_rounds"], "hashed_per_step": info["hashed_per_step"],
                     "uncopied_share": info["uncopied_share"]})  # fmt: skip
    return Table(
        title,
        [
            "contender",
            "our work per warm step (median over rounds)",
            "rows hashed per step",
            "rows served without a copy",
        ],
        rows,
        notes=[
            "Wall time of the cache's own code inside the last epoch's steps (its step hooks, keys, lookups, the "
            "rows, building the served values), so it includes waits for the CPU on a shared machine; best = the "
            "least disturbed round. Goal: at most 0.5 ms for a batch of 32 CNN images on CPU."
        ],
        data=data,
    )


def simple_table(
    title: str,
    ms: list[Measurement],
    infos: dict[str, dict],
    baseline: str,
    metric: str,
    uncached: dict[str, str],
    columns: dict[str, Callable[[Measurement], str]] | None = None,
    notes: list[str] | None = None,
) -> Table:
    """A table of ``metric`` against ``baseline`` with ``columns``, then the cache's state and the exactness check."""
    for m in ms:
        m.extra.update({k: v for k, v in infos.get(m.name, {}).items() if k != "weights"})
    return Table.build(
        title,
        ms,
        baseline=baseline,
        metric=metric,
        unit="s" if metric.startswith("fit") else "ms",
        scale=1.0 if metric.startswith("fit") else 1e3,
        label=LABELS[metric],
        extra_columns={
            **(columns or {}),
            "cache": _cache_cell(infos),
            "weights = uncached run": _exact_cell(infos, uncached),
        },
        notes=notes or (),
    )


def prefix_row_bytes(w: Workload) -> int:
    model, _, _ = w.limit()
    x = w.batches[0][0][:1]
    with torch.no_grad():
        f = model.backbone(x)
    return f.numel() * f.element_size()


def cache_result(device: torch.device, rounds: int, workload: dict | None = None) -> Result:
    """The Result every cache comparison starts from: its description and the run's settings."""
    config = {
        "rounds": rounds,
        "warmup_rounds": 1,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if workload is not None:
        config["workload"] = workload
    return Result(description=DESCRIPTION, config=config)
