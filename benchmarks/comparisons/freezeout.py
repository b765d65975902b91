"""FreezeOut against its baseline: whole-fit wall-clock, time per step over training, final accuracy.

Two tasks, each run with the same optimizer for every contender:

- ``digits``: the built-in transfer task (:mod:`lightning_freeze.tasks.digits`: 3 conv blocks pretrained on
  digits 0-4, fine-tuned on 80% of digits 5-9, validated on the other 20%), AdamW;
- ``cnn``: a deeper ResNet-style CNN (stem + 9 residual blocks, :mod:`benchmarks.models`) trained from
  scratch on a synthetic 10-class image task (smooth class templates + noise), SGD with Nesterov momentum,
  sized so that a step takes on the order of 100 ms on 2 CPU cores.

Contenders: the baseline (same optimizer, per-step cosine LR to zero at the end via ``LambdaLR``, nothing
frozen) and ``FreezeOut(t0, schedule="cubic", scale_lr=True)`` for t0 = 0.5, 0.8, 0.9. One round = one
seed (init, data order); contenders alternate within a round. Validation runs once, after the fit, outside
the timed part. The paper's headline (Brock et al. 2017): "up to 20% less wall-clock time within a 3%
relative error envelope" (DenseNets / WRNs on CIFAR, GPU).

Run alone: ``python -m benchmarks --only freezeout [--quick]``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.harness import BenchContext, Contender, Result, Table, alternate, comparison, fmt_num, now
from benchmarks.lit import StepTimer, make_trainer, quiet
from lightning_freeze.rules.freezeout import cosine_factor, freezeout_schedule

T0S = (0.5, 0.8, 0.9)
BASELINE = "baseline: cosine LR, nothing frozen"
PAPER = (
    "Brock et al. 2017: 'up to 20% less wall-clock time within a 3% relative error envelope' "
    "(t0 = 0.8 cubic, scaled LR, DenseNet/WRN on CIFAR on a GPU)"
)


class CosineFactor:
    """``LambdaLR`` factor: the per-step cosine to zero at ``total`` steps (picklable, for checkpoints)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int) -> float:
        return cosine_factor(step / self.total, 1.0)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _quarters(times: list[float]) -> list[float]:
    """Median step time (s) in each quarter of training."""
    n = len(times)
    return [statistics.median(times[n * q // 4 : max(n * (q + 1) // 4, n * q // 4 + 1)]) for q in range(4)]


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    description: str
    make_model: Callable[[int, bool], object]  # (total_steps, with_cosine_scheduler) -> LightningModule
    train: object
    val: tuple[torch.Tensor, torch.Tensor]
    epochs: int
    steps_per_epoch: int
    layers: str
    config: dict

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).float().mean())


def digits_task(ctx: BenchContext) -> Task:
    from torch.utils.data import DataLoader, Subset

    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset, pretrained_backbone_state

    pretrained_backbone_state()  # pretrain once (or load the cache) outside the timed fits
    ds = DigitsDataset(classes=[5, 6, 7, 8, 9])
    rng = np.random.default_rng(0)
    train_idx, val_idx = [], []
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        cut = int(round(0.8 * len(idx)))
        train_idx += idx[:cut].tolist()
        val_idx += idx[cut:].tolist()
    batch = 32
    epochs = ctx.pick(2, 15)
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    lr = 3e-3
    val_x = torch.stack([ds[i][0] for i in val_idx])
    val_y = torch.stack([ds[i][1] for i in val_idx])

    def make_model(total: int, cosine: bool):
        sched = None
        if cosine:
            sched = {
                "scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, CosineFactor(total)),
                "interval": "step",
            }
        return DigitsClassifier(
            optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4), scheduler=sched
        )

    def train(seed: int):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(Subset(ds, train_idx), batch_size=batch, shuffle=True, generator=g)

    return Task(
        "digits",
        f"Digits 5-9 transfer (backbone pretrained on 0-4), {len(train_idx)} train / {len(val_idx)} val images, "
        f"batch {batch}, {epochs} epochs = {epochs * steps_per_epoch} steps, AdamW(lr={lr}, wd=1e-4).",
        make_model,
        train,
        (val_x, val_y),
        epochs,
        steps_per_epoch,
        "backbone.*",
        {
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "batch_size": batch,
            "epochs": epochs,
            "optimizer": f"AdamW(lr={lr}, weight_decay=1e-4)",
            "layers": "backbone.* (3 conv blocks); head = rest",
        },
    )


class CNN:
    """Lazily defined LightningModule (keeps Lightning out of module import)."""

    def __new__(cls, blocks, head, lr, total, cosine):
        import lightning.pytorch as pl

        class BenchCNN(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.blocks = nn.Sequential(*blocks)
                self.head = head

            def forward(self, x):
                return self.head(self.blocks(x))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)

            def configure_optimizers(self):
                opt = torch.optim.SGD(
                    self.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
                )
                if not cosine:
                    return opt
                sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineFactor(total))
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        return BenchCNN()


def synthetic_images(n: int, templates: torch.Tensor, noise: float, seed: int):
    """Images of class ``y``: a smooth random template, randomly shifted by up to 2 pixels, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(templates), (n,), generator=g)
    x = templates[y].clone()
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    for i in range(n):
        x[i] = torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    return x + noise * torch.randn(x.shape, generator=g), y


def cnn_task(ctx: BenchContext) -> Task:
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.models import Head, NetSpec, make_blocks

    # full mode: about 100 ms a step on 2 cores; quick mode: a smaller net for a smoke run
    spec = NetSpec(
        width=ctx.pick(12, 20), blocks_per_stage=3, image=ctx.pick(16, 24), batch=32, num_classes=10
    )
    g = torch.Generator().manual_seed(1234)
    coarse = torch.randn(spec.num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(spec.image, spec.image), mode="bilinear", align_corners=False)
    noise = 3.0
    n_train = ctx.pick(320, 640)
    train_x, train_y = synthetic_images(n_train, templates, noise, seed=1)
    val_x, val_y = synthetic_images(ctx.pick(500, 2000), templates, noise, seed=2)
    epochs = ctx.pick(2, 15)
    steps_per_epoch = n_train // spec.batch
    lr = 0.05

    def make_model(total: int, cosine: bool):
        blocks = make_blocks(spec, seed=int(torch.initial_seed()) % 2**31)
        return CNN(blocks, Head(spec.width * 4, spec.num_classes), lr, total, cosine)

    def train(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(train_x, train_y),
            batch_size=spec.batch,
            shuffle=True,
            generator=gen,
            drop_last=True,
        )

    return Task(
        "cnn",
        f"ResNet-style CNN (stem + 9 basic residual blocks, width {spec.width}-{spec.width * 4}, BatchNorm) from "
        f"scratch on synthetic {spec.image}x{spec.image} images (10 classes: smooth templates, random shifts, "
        f"noise {noise}), {n_train} train / {len(val_y)} val, batch {spec.batch}, {epochs} epochs = "
        f"{epochs * steps_per_epoch} steps, SGD(lr={lr}, Nesterov momentum 0.9, wd 5e-4).",
        make_model,
        train,
        (val_x, val_y),
        epochs,
        steps_per_epoch,
        "blocks.*",
        {
            "net": spec.to_json(),
            "n_train": n_train,
            "n_val": len(val_y),
            "noise": noise,
            "epochs": epochs,
            "optimizer": f"SGD(lr={lr}, momentum=0.9, nesterov=True, weight_decay=5e-4)",
            "layers": "blocks.* (stem + 9 residual blocks); head = rest",
        },
    )


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------


def _contenders(ctx: BenchContext, task: Task, seeds: list[int]) -> list[Contender]:
    from lightning_freeze import FreezeOut

    def fit_once(t0: float | None, seed: int, epochs: int | None = None) -> dict[str, float]:
        import lightning.pytorch as pl

        epochs = epochs or task.epochs
        total = epochs * task.steps_per_epoch
        pl.seed_everything(seed, verbose=False)
        model = task.make_model(total, t0 is None)
        clock = StepTimer(ctx.device)
        callbacks = (
            [clock]
            if t0 is None
            else [FreezeOut(task.layers, t0=t0, schedule="cubic", scale_lr=True, plot=False), clock]
        )
        with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-freezeout-") as tmp:
            trainer = make_trainer(-1, callbacks, ctx.device, root_dir=tmp, max_epochs=epochs)
            loader = task.train(seed)
            start = now(ctx.device)
            trainer.fit(model, loader)
            fit_s = now(ctx.device) - start
        times = clock.step_times()
        if len(times) != total:
            raise RuntimeError(f"expected {total} timed steps, got {len(times)}")
        acc = _accuracy(model, *task.val)
        q = _quarters(times)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "fit_s": fit_s,
            "step_mean_s": statistics.fmean(times),
            "q1_s": q[0],
            "q2_s": q[1],
            "q3_s": q[2],
            "q4_s": q[3],
            "val_acc": acc,
            "val_err": 1 - acc,
            "trainable_end": trainable / sum(p.numel() for p in model.parameters()),
        }

    def make(t0: float | None):
        state = {"round": 0}

        def run_round():
            seed = seeds[state["round"] % len(seeds)]
            state["round"] += 1
            return fit_once(t0, seed)

        return run_round

    def warm_up():  # one short unrecorded fit: imports, allocator and thread pools warm for everyone
        fit_once(0.5, 10_000, epochs=1)

    out = [
        Contender(
            BASELINE,
            make(None),
            note="same optimizer; LambdaLR per-step cosine to 0 at the end",
            setup=warm_up,
        )
    ]
    for t0 in T0S:
        out.append(
            Contender(
                f"FreezeOut t0={t0} cubic, scaled",
                make(t0),
                note=f"FreezeOut(layers={task.layers!r}, t0={t0}, schedule='cubic', scale_lr=True)",
            )
        )
    return out


def _frozen_share(n_groups: int, t0: float) -> float:
    """Mean over the managed layers and the head of (1 - t_i): the share of layer-steps spent frozen."""
    return statistics.fmean(1 - s.t for s in freezeout_schedule(n_groups, t0, "cubic", True))


def _paired(m, base, metric: str) -> list[float]:
    """Per-seed ratio to the baseline; a baseline of 0 (no validation error) gives 1 for a tie, else inf."""
    return [
        a / b if b else (1.0 if a == b else math.inf)
        for a, b in zip(m.values(metric), base.values(metric), strict=True)
    ]


def _headline(task: Task, ms, n_groups: int) -> Table:
    base = next(m for m in ms if m.name == BASELINE)
    rows, data = [], []
    for m in ms:
        if m.name == BASELINE or m.error or base.error:
            continue
        t0 = float(m.name.split("t0=")[1].split()[0])
        saving = [1 - r for r in _paired(m, base, "fit_s")]
        step_saving = [1 - r for r in _paired(m, base, "step_mean_s")]
        rel_err = [r - 1 for r in _paired(m, base, "val_err")]
        acc_drop = [b - a for a, b in zip(m.values("val_acc"), base.values("val_acc"), strict=True)]
        s_med, e_med = statistics.median(saving), statistics.median(rel_err)
        within = "yes" if e_med <= 0.03 else "no"
        rows.append(
            [
                m.name,
                f"{fmt_num(s_med * 100, 2)}% [{fmt_num(min(saving) * 100, 2)} … {fmt_num(max(saving) * 100, 2)}]",
                f"{fmt_num(statistics.median(step_saving) * 100, 2)}%",
                f"{fmt_num(_frozen_share(n_groups, t0) * 100, 2)}%",
                f"{e_med * 100:+.1f}% [{min(rel_err) * 100:+.1f} … {max(rel_err) * 100:+.1f}]",
                f"{statistics.median(acc_drop) * 100:+.2f} pt",
                within,
            ]
        )
        data.append(
            {
                "contender": m.name,
                "t0": t0,
                "wall_saving": saving,
                "step_saving": step_saving,
                "relative_error_change": rel_err,
                "accuracy_drop": acc_drop,
                "frozen_layer_time_share": _frozen_share(n_groups, t0),
            }
        )
    return Table(
        f"{task.name}: where we stand against the paper's headline",
        [
            "contender",
            "wall-clock saved, median [min … max]",
            "mean step time saved",
            "layer-time frozen (schedule)",
            "relative error change vs baseline, median [min … max]",
            "accuracy drop (median)",
            "within the 3% relative-error envelope?",
        ],
        rows,
        [
            PAPER,
            "Per seed: saving = 1 - fit time / baseline fit time; relative error change = error / baseline "
            "error - 1 (error = 1 - accuracy). Medians over seeds, [min … max] across seeds.",
            "'layer-time frozen' is the schedule's mean of (1 - t_i) over the managed layers and the head: an upper "
            "bound on the share of *backward* work skipped if every layer cost the same.",
        ],
        data,
    )


def _quarter_table(task: Task, ms) -> Table:
    rows, data = [], []
    for m in ms:
        if m.error:
            rows.append([m.name, "—", "—", "—", "—", f"could not run: {m.error}"])
            continue
        q = [statistics.median(m.values(f"q{i}_s")) * 1e3 for i in range(1, 5)]
        rows.append(
            [m.name, *[fmt_num(v) for v in q], fmt_num(statistics.median(m.values("step_mean_s")) * 1e3)]
        )
        data.append({"contender": m.name, "quarters_ms": q})
    return Table(
        f"{task.name}: time per step over training (ms, median of the per-seed medians per quarter)",
        ["contender", "1st quarter", "2nd quarter", "3rd quarter", "4th quarter", "mean step (ms)"],
        rows,
        [
            "A step: one on_train_batch_start to the next (the harness StepClock: forward, backward, optimizer, every hook)."
        ],
        data,
    )


@comparison("freezeout", "FreezeOut: wall-clock and accuracy against a cosine-LR baseline", order=30)
def run(ctx: BenchContext) -> Result:
    n_rounds = ctx.n_rounds(1, 5)
    seeds = list(range(n_rounds))
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = torch.get_num_threads()  # chosen by `python -m benchmarks --threads` (auto: 1 when loaded)
    result = Result(
        description=(
            "FreezeOut (cubic schedule, scaled LR) at t0 = 0.5, 0.8, 0.9 against the same optimizer with a plain "
            "per-step cosine LR. Wall-clock of the whole `Trainer.fit` (no validation inside it), time per step "
            "over training, final validation accuracy (after the fit). One round = one seed; contenders alternate "
            "within a round. " + PAPER + "."
        ),
        config={
            "t0s": list(T0S),
            "schedule": "cubic",
            "scale_lr": True,
            "seeds": seeds,
            "device": str(ctx.device),
            "torch_threads": threads,
            "load_avg_1min_at_start": round(load, 2),
            "cores": cores,
        },
    )
    for make_task in (digits_task, cnn_task):
        task = make_task(ctx)
        ctx.log(f"  {task.name}: {task.description}")
        contenders = _contenders(ctx, task, seeds)
        ms = alternate(contenders, rounds=n_rounds, warmup_rounds=0, log=ctx.log)
        n_groups = 4 if task.name == "digits" else 11
        result.config[task.name] = {
            **task.config,
            "total_steps": task.total_steps,
            "description": task.description,
            "n_groups": n_groups,
        }
        result.tables.append(_headline(task, ms, n_groups))
        result.tables.append(
            Table.build(
                f"{task.name}: wall-clock of the whole fit",
                ms,
                baseline=BASELINE,
                metric="fit_s",
                unit="s",
                label="fit time",
                extra_columns={"how": lambda m: m.note},
                notes=[task.description, "Includes Lightning's per-fit setup (a few hundred ms)."],
            )
        )
        result.tables.append(_quarter_table(task, ms))
        result.tables.append(
            Table.build(
                f"{task.name}: final validation accuracy",
                ms,
                baseline=BASELINE,
                metric="val_acc",
                label="val acc",
                lower_is_better=False,
                extra_columns={
                    "trainable at end": lambda m: (
                        fmt_num(statistics.median(m.values("trainable_end")))
                        if m.values("trainable_end")
                        else "—"
                    )
                },
            )
        )
        result.extra.setdefault("per_seed", {})[task.name] = {m.name: m.samples for m in ms}
        result.extra.setdefault("errors", {})[task.name] = {m.name: m.error for m in ms if m.error}
    result.config["load_avg_1min_at_end"] = (
        round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    )
    return result
