"""Unfreezing strategies side by side on the digits transfer task: accuracy, wall time, time to a target.

The backbone of :class:`~lightning_freeze.tasks.digits.DigitsClassifier` is pretrained on digits 0-4 (cached),
then fine-tuned on a small labelled set of digits 5-9 and validated on the rest, once per seed, with every
contender in the same process and the seeds alternated across contenders (the harness's rounds):

- full fine-tuning (no callback);
- frozen backbone (``LayerFreeze("backbone.*")``), head only;
- ``ProgressiveUnfreezing`` (ours, set to ULMFiT's ``lr_decay=2.6``: one block per epoch from the top, LR / 2.6
  per level), with and without its end-of-fit timeline plot;
- ours with the ``backbone`` preset's settings (BackboneFinetuning reproduced) thawing at the same epoch;
- Lightning's ``BackboneFinetuning`` (its defaults, backbone thawed at epoch 1);
- ``finetuning-scheduler`` with a schedule equivalent to ours (same phases, same per-phase LRs).

Run alone: ``python -m benchmarks --only unfreezing [--quick]``.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from benchmarks.harness import BenchContext, Contender, Result, Table, alternate, comparison, fmt_num, now
from benchmarks.lit import accelerator_for, quiet

LR = 3e-3
LR_DECAY = 2.6
BASELINE = "full fine-tuning"


def _split(n_train_per_class: int, seed: int = 0):
    """A fixed stratified split of digits 5-9: ``n_train_per_class`` per class to train on, the rest to validate."""
    from lightning_freeze.tasks.digits import DigitsDataset

    ds = DigitsDataset(classes=[5, 6, 7, 8, 9])
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        train += idx[:n_train_per_class].tolist()
        val += idx[n_train_per_class:].tolist()
    return ds, sorted(train), sorted(val)


def _model(filter_trainable: bool):
    """The digits classifier with AdamW; ``filter_trainable``: the optimizer gets only requires_grad params
    (what BackboneFinetuning needs)."""
    from lightning_freeze.tasks.digits import DigitsClassifier

    class Model(DigitsClassifier):
        def configure_optimizers(self):
            params = (
                [p for p in self.parameters() if p.requires_grad] if filter_trainable else self.parameters()
            )
            return torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)

    return Model(optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=1e-4))


def fts_schedule(blocks: list[str], head: str = "head") -> dict:
    """finetuning-scheduler's form of our ULMFiT plan: phase 0 = head, then one block per epoch from the top,
    each at LR / 2.6**k (k = levels below the head)."""
    schedule = {0: {"params": [f"{head}.*"], "max_transition_epoch": 1}}
    for k, block in enumerate(reversed(blocks), start=1):
        schedule[k] = {"params": [f"{block}.*"], "max_transition_epoch": k + 1, "lr": LR / LR_DECAY**k}
    return schedule


class _AccuracyClock:
    """A callback that notes (wall s since fit start, epoch, val/acc, CPU s since fit start) at each validation."""

    def __new__(cls, device):
        from lightning.pytorch.callbacks import Callback

        class Clock(Callback):
            def __init__(self):
                self.t0 = self.c0 = 0.0
                self.points: list[tuple[float, int, float, float]] = []

            def on_fit_start(self, trainer, pl_module):
                self.t0, self.c0 = now(device), time.process_time()

            def on_validation_end(self, trainer, pl_module):
                if not trainer.sanity_checking:
                    acc = float(trainer.callback_metrics["val/acc"])
                    wall, cpu = now(device) - self.t0, time.process_time() - self.c0
                    self.points.append((wall, trainer.current_epoch, acc, cpu))

        return Clock()


def _contenders(ctx: BenchContext, data, epochs: int, target: float, seeds: list[int]) -> list[Contender]:
    from lightning.pytorch.callbacks import BackboneFinetuning
    from torch.utils.data import DataLoader, Subset

    from lightning_freeze import LayerFreeze, ProgressiveUnfreezing

    ds, train_idx, val_idx = data
    blocks = ["backbone.0", "backbone.1", "backbone.2"]

    def fts():
        from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint

        # FTS insists on its checkpoint callback; save_top_k=0 keeps it from writing files.
        return [
            FinetuningScheduler(
                ft_schedule=fts_schedule(blocks),
                epoch_transitions_only=True,
                restore_best=False,
                logging_level=40,
            ),
            FTSCheckpoint(monitor="val/loss", save_top_k=0),
        ]

    specs: list[tuple[str, Callable[[], list], bool, str]] = [
        (BASELINE, lambda: [], False, "no callback: every parameter trains from the start at the same LR"),
        (
            "frozen backbone (LayerFreeze)",
            lambda: [LayerFreeze("backbone.*")],
            False,
            "backbone frozen for the whole fit; only the head trains",
        ),
        (
            "ProgressiveUnfreezing (ours)",
            lambda: [ProgressiveUnfreezing(["backbone.*", "head"], every_n_epochs=1, lr_decay=LR_DECAY)],
            False,
            "head first, then backbone.2, .1, .0 at epochs 1, 2, 3; LR / 2.6 per level below the head",
        ),
        (
            "ProgressiveUnfreezing (ours), plot=False",
            lambda: [
                ProgressiveUnfreezing(["backbone.*", "head"], every_n_epochs=1, lr_decay=LR_DECAY, plot=False)
            ],
            False,
            "the same without the end-of-fit timeline plot (a fixed ~0.1 s per fit), like the peers, which plot nothing",
        ),
        (
            "ours, backbone preset at epoch 1",
            lambda: [
                ProgressiveUnfreezing(
                    ["backbone", "head"],
                    lr_decay=1.0,
                    lr_growth=2.0,
                    norm="train",
                    phases=[{"layers": "backbone", "at_epoch": 1, "lr_ratio": 0.1}],
                )
            ],
            False,
            "conf/freeze/backbone.yaml with at_epoch=1: whole backbone at 0.1x LR, x2 per epoch up to the head's LR",
        ),
        (
            "Lightning BackboneFinetuning",
            lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
            True,
            "its defaults (ratio 0.1, x2 per epoch, train_bn) with the backbone thawed at epoch 1; optimizer "
            "filtered on requires_grad as it requires",
        ),
        (
            "finetuning-scheduler (same schedule)",
            fts,
            False,
            "explicit FTS schedule equal to ours (head; then backbone.2/.1/.0 at epochs 1/2/3 with LR/2.6^k); "
            "epoch_transitions_only, restore_best=False",
        ),
    ]
    accelerator, devices = accelerator_for(ctx.device)

    def make(name, callbacks, filter_trainable):
        state = {"round": 0}

        def run_round():
            import lightning.pytorch as pl

            seed = seeds[state["round"] % len(seeds)]
            state["round"] += 1
            pl.seed_everything(seed, verbose=False)
            model = _model(filter_trainable)
            clock = _AccuracyClock(ctx.device)
            g = torch.Generator().manual_seed(seed)
            train = DataLoader(Subset(ds, train_idx), batch_size=32, shuffle=True, generator=g)
            val = DataLoader(Subset(ds, val_idx), batch_size=256)
            from lightning.pytorch.callbacks import ModelCheckpoint

            cbs = callbacks()
            with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-unfreeze-") as tmp:
                trainer = pl.Trainer(
                    max_epochs=epochs,
                    accelerator=accelerator,
                    devices=devices,
                    logger=False,
                    enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in cbs),
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    default_root_dir=tmp,
                    callbacks=[*cbs, clock],
                )
                t0, c0 = now(ctx.device), time.process_time()
                trainer.fit(model, train, val)
                wall, cpu = now(ctx.device) - t0, time.process_time() - c0
            points = clock.points
            if len(points) != epochs:
                raise RuntimeError(f"expected {epochs} validations, got {len(points)}")
            hit = next((p for p in points if p[2] >= target), None)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return {
                "final_acc": points[-1][2],
                "best_acc": max(p[2] for p in points),
                "wall_s": wall,
                "cpu_s": cpu,
                "time_to_target_s": hit[0] if hit else math.nan,
                "cpu_to_target_s": hit[3] if hit else math.nan,
                "epochs_to_target": hit[1] + 1 if hit else math.nan,
                "trainable_at_end": float(trainable),
            }

        return run_round

    return [Contender(name, make(name, cbs, filt), note=note) for name, cbs, filt, note in specs]


def _reached(m) -> str:
    vals = m.values("time_to_target_s")
    return f"{sum(not math.isnan(v) for v in vals)}/{len(vals)}" if vals else "—"


def _median_finite(m, metric: str, scale: float = 1.0) -> str:
    vals = [v * scale for v in m.values(metric) if not math.isnan(v)]
    return fmt_num(statistics.median(vals)) if vals else "never"


@comparison("unfreezing", "Unfreezing strategies on the digits transfer task", order=40)
def run(ctx: BenchContext) -> Result:
    epochs = ctx.pick(5, 12)  # quick: every thaw (epochs 1-3) and one epoch after
    n_rounds = ctx.n_rounds(1, 7)
    seeds = list(range(n_rounds))
    per_class = 20
    target = 0.95
    # pretrain (or load from the cache) once, outside the timed rounds
    from lightning_freeze.tasks.digits import pretrained_backbone_state

    _, cache_file, was_cached = pretrained_backbone_state()
    data = _split(per_class)
    ctx.log(
        f"  digits 5-9: {len(data[1])} train / {len(data[2])} val; backbone pretrained on 0-4 "
        f"({'cached' if was_cached else 'pretrained now'}: {cache_file.name})"
    )
    contenders = _contenders(ctx, data, epochs, target, seeds)
    # One torch thread: on a shared machine, idle OpenMP threads spinning would inflate the CPU times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = alternate(contenders, rounds=n_rounds, warmup_rounds=0, log=ctx.log)
    finally:
        torch.set_num_threads(threads)
    extra = {
        "reached target (seeds)": _reached,
        "median epochs to target": lambda m: _median_finite(m, "epochs_to_target"),
        "median CPU time to target (s)": lambda m: _median_finite(m, "cpu_to_target_s"),
        "median wall time to target (s)": lambda m: _median_finite(m, "time_to_target_s"),
    }
    result = Result(
        description=(
            f"DigitsClassifier (3 conv blocks + linear head), backbone pretrained on digits 0-4, fine-tuned on "
            f"{per_class} labelled images per class of digits 5-9 ({len(data[1])} in all) for {epochs} epochs "
            f"with AdamW (lr {LR}), validated on the other {len(data[2])} images after every epoch. One round = one "
            f"seed (model head init, data order, dropout); all contenders run every seed, alternated. "
            f"Target accuracy: {target:.0%} (macro-averaged val accuracy)."
        ),
        config={
            "epochs": epochs,
            "seeds": seeds,
            "train_per_class": per_class,
            "n_train": len(data[1]),
            "n_val": len(data[2]),
            "optimizer": f"AdamW(lr={LR}, weight_decay=1e-4)",
            "batch_size": 32,
            "target_acc": target,
            "lr_decay": LR_DECAY,
            "device": str(ctx.device),
            "torch_threads": 1,
            "fts_schedule": {
                str(k): v for k, v in fts_schedule(["backbone.0", "backbone.1", "backbone.2"]).items()
            },
        },
    )
    notes_common = ["Each cell summarises the per-seed values; ratios pair contender and baseline by seed."]
    result.tables.append(
        Table.build(
            "Final validation accuracy (after the last epoch)",
            ms,
            baseline=BASELINE,
            metric="final_acc",
            label="final val acc",
            lower_is_better=False,
            extra_columns={**extra, "how": lambda m: m.note},
            notes=notes_common,
        )
    )
    result.tables.append(
        Table.build(
            "Best validation accuracy over the epochs",
            ms,
            baseline=BASELINE,
            metric="best_acc",
            label="best val acc",
            lower_is_better=False,
            notes=notes_common,
        )
    )
    result.tables.append(
        Table.build(
            "CPU time of the whole fit (process time: robust to other jobs on the machine)",
            ms,
            baseline=BASELINE,
            metric="cpu_s",
            unit="s",
            label="fit CPU time",
            notes=notes_common
            + [
                "Includes Lightning's per-fit setup and the per-epoch validations, a large share on a model this small."
            ],
        )
    )
    result.tables.append(
        Table.build(
            "Wall time of the whole fit",
            ms,
            baseline=BASELINE,
            metric="wall_s",
            unit="s",
            label="fit time",
            notes=notes_common
            + [
                "Wall time includes waiting for the CPU: when other jobs share the machine (see the load "
                "average), compare CPU times instead."
            ],
        )
    )
    result.extra["per_seed"] = {m.name: m.samples for m in ms}
    result.extra["errors"] = {m.name: m.error for m in ms if m.error}
    return result
