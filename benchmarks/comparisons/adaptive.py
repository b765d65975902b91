"""AdaptiveFreeze against full training and FreezeOut: wall-clock, time to the baseline's accuracy, final accuracy,
and where each layer froze.

Tasks (the first two are the FreezeOut benchmark's, :mod:`benchmarks.comparisons.freezeout`):

- ``cnn``: the ResNet-style CNN (stem + 9 residual blocks) from scratch on the synthetic 10-class images;
- ``digits``: the built-in transfer task (backbone pretrained on digits 0-4, fine-tuned on 5-9);
- ``bert``: a small randomly initialised transformers BERT on MNIST-1D (Greydanus 2020, generated locally by the
  ``mnist1d`` package: 40-sample 1-D signals of the ten digits), each signal quantised into 40 tokens.

Contenders, each with the same optimizer and the same per-step cosine LR: full training; FreezeOut at
``t0=0.8``; ``AdaptiveFreeze``; ``AdaptiveFreeze`` with ``FrozenPrefixCache``. One round = one seed; contenders
alternate within a round. After every epoch the weights are copied (outside the timed part) and evaluated after
the fit, so evaluation never touches the timed run. Time to target = training wall-clock until the first epoch
whose validation accuracy is at least the baseline's final accuracy (same seed) minus 0.5 points.

Run alone: ``python -m benchmarks --only adaptive [--quick]``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.comparisons.freezeout import BASELINE, CosineFactor, Task, _accuracy, cnn_task, digits_task
from benchmarks.harness import BenchContext, Contender, Result, Table, alternate, comparison, fmt_num, now
from benchmarks.lit import StepTimer, make_trainer, quiet

TARGET_GAP = 0.005  # the target: the baseline's final accuracy minus 0.5 points
AUTOFREEZE = "AutoFreeze (Liu et al. 2021): 2.16x from freezing, up to 2.55x with cached activations (BERT, AG News, GPU)"


def bert_mnist1d_task(ctx: BenchContext) -> Task:
    """A 4-layer BERT (hidden 64) on MNIST-1D tokens; ``layers="auto"`` (embeddings, 4 layers, pooler, head)."""
    import transformers as tf
    from mnist1d.data import get_dataset_args, make_dataset
    from torch.utils.data import DataLoader, TensorDataset

    args = get_dataset_args()
    args.num_samples = ctx.pick(1000, args.num_samples)  # quick: a smoke run on 800 train / 200 val signals
    data = make_dataset(args)
    bins = 32

    def tokens(x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        lo, hi = -4.0, 4.0  # MNIST-1D signals lie in about [-3, 3]
        return ((x.clamp(lo, hi - 1e-6) - lo) / (hi - lo) * bins).long() + 1  # 0 stays free (padding)

    train_x, train_y = tokens(data["x"]), torch.as_tensor(data["y"])
    val_x, val_y = tokens(data["x_test"]), torch.as_tensor(data["y_test"])
    batch, epochs = 64, ctx.pick(2, 12)
    steps_per_epoch = len(train_y) // batch
    lr = 2e-3
    config = tf.BertConfig(
        vocab_size=bins + 1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=train_x.shape[1],
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )

    def make_model(total: int, cosine: bool):
        import lightning.pytorch as pl

        class BertMnist1d(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = tf.BertForSequenceClassification(config)

            def forward(self, ids):
                return self.model(input_ids=ids).logits

            def training_step(self, b, i):
                return nn.functional.cross_entropy(self(b[0]), b[1])

            def configure_optimizers(self):
                opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=1e-2)
                if not cosine:
                    return opt
                sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineFactor(total))
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        return BertMnist1d()

    def train(seed: int):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(train_x, train_y), batch_size=batch, shuffle=True, generator=g, drop_last=True
        )

    return Task(
        "bert",
        f"transformers BERT (4 layers, hidden 64, random init) on MNIST-1D ({len(train_y)} train / {len(val_y)} val "
        f"signals as 40 tokens of {bins} levels), batch {batch}, {epochs} epochs = {epochs * steps_per_epoch} steps, "
        f"AdamW(lr={lr}, wd=1e-2), cosine LR.",
        make_model,
        train,
        (val_x, val_y),
        epochs,
        steps_per_epoch,
        "auto",
        {"n_train": len(train_y), "n_val": len(val_y), "batch_size": batch, "epochs": epochs, "bins": bins},
    )


def _contenders(
    ctx: BenchContext, task: Task, seeds: list[int], curves: dict, froze: dict
) -> list[Contender]:
    from lightning_freeze import AdaptiveFreeze, FreezeOut, FrozenPrefixCache

    check = max(1, task.steps_per_epoch // 2)

    def adaptive():
        return AdaptiveFreeze(
            task.layers, check_every_n_steps=check, percentile=30, min_steps=0.2, plot=False
        )

    specs: list[tuple[str, Callable[[], list], str]] = [
        (BASELINE, lambda: [], "same optimizer; LambdaLR per-step cosine to 0 at the end; nothing frozen"),
        (
            "FreezeOut t0=0.8",
            lambda: [FreezeOut(task.layers, t0=0.8, schedule="cubic", scale_lr=True, plot=False)],
            f"FreezeOut(layers={task.layers!r}, t0=0.8, cubic, scale_lr); it is the LR schedule (no cosine)",
        ),
        (
            "AdaptiveFreeze",
            lambda: [adaptive()],
            f"AdaptiveFreeze(check_every_n_steps={check}, percentile=30, min_steps=0.2)",
        ),
        (
            "AdaptiveFreeze + FrozenPrefixCache",
            lambda: [adaptive(), FrozenPrefixCache()],
            "the same, the frozen prefix served from the cache",
        ),
    ]

    def fit_once(name: str, make_callbacks: Callable[[], list], seed: int) -> dict[str, float]:
        import lightning.pytorch as pl

        pl.seed_everything(seed, verbose=False)
        callbacks = make_callbacks()
        cosine = not any(isinstance(cb, FreezeOut) for cb in callbacks)
        model = task.make_model(task.total_steps, cosine)
        snapshots = StepTimer(ctx.device, snapshots=True)
        with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-adaptive-") as tmp:
            trainer = make_trainer(
                -1, [*callbacks, snapshots], ctx.device, root_dir=tmp, max_epochs=task.epochs
            )
            start = now(ctx.device)
            trainer.fit(model, task.train(seed))
            fit_s = now(ctx.device) - start
        curve = []
        for train_s, state in snapshots.points:
            model.load_state_dict(state)
            curve.append((train_s, _accuracy(model, *task.val)))
        curves.setdefault(name, []).append(curve)
        events = next((cb.events for cb in callbacks if hasattr(cb, "events") and hasattr(cb, "layers")), [])
        froze.setdefault(name, []).append({e["layer"]: e["step"] for e in events if e["action"] == "freeze"})
        return {"fit_s": fit_s, "val_acc": curve[-1][1], "frozen_layers": float(len(froze[name][-1]))}

    def make(name, make_callbacks):
        state = {"round": 0}

        def run_round():
            seed = seeds[state["round"] % len(seeds)]
            state["round"] += 1
            return fit_once(name, make_callbacks, seed)

        return run_round

    return [Contender(name, make(name, cbs), note=note) for name, cbs, note in specs]


def _time_to_target(curves: dict, name: str) -> list[float]:
    """Per seed: training seconds until accuracy >= the baseline's final accuracy (same seed) - 0.5 points."""
    out = []
    for curve, base in zip(curves.get(name, []), curves.get(BASELINE, []), strict=False):
        target = base[-1][1] - TARGET_GAP
        out.append(next((t for t, acc in curve if acc >= target), math.nan))
    return out


def _spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    finite = [v * scale for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    return (
        f"{fmt_num(statistics.median(finite), digits)} [{fmt_num(min(finite), digits)} … {fmt_num(max(finite), digits)}]"
        + (f" ({len(values) - len(finite)} never)" if len(finite) < len(values) else "")
    )


def _summary(task: Task, ms, curves: dict) -> Table:
    base = next(m for m in ms if m.name == BASELINE)
    base_fit = base.values("fit_s")
    rows, data = [], []
    for m in ms:
        if m.error:
            rows.append([m.name, "—", "—", "—", "—", f"could not run: {m.error}"])
            continue
        reach = _time_to_target(curves, m.name)
        speedup = [
            b / r if math.isfinite(r) and r > 0 else math.nan for b, r in zip(base_fit, reach, strict=False)
        ]
        rows.append(
            [
                m.name,
                _spread(m.values("fit_s")),
                _spread(reach),
                _spread(speedup) + "×",
                _spread(m.values("val_acc"), 100, 3),
                m.note,
            ]
        )
        data.append({"contender": m.name, "time_to_target_s": reach, "speedup_to_target": speedup})
    return Table(
        f"{task.name}: wall-clock, time to the baseline's accuracy, final accuracy (median [min … max] over seeds)",
        [
            "contender",
            "fit wall-clock (s)",
            "training time to target (s)",
            "baseline fit time ÷ time to target",
            "final val acc (%)",
            "how",
        ],
        rows,
        [
            task.description,
            f"Target: the baseline's final validation accuracy (same seed) minus {TARGET_GAP * 100:g} points; "
            "'never' when an epoch end never reached it.",
            "The speedup column is the baseline's whole fit over the contender's time to reach its accuracy: the "
            "goal for AdaptiveFreeze with the cache on the CNN is at least 1.5x. " + AUTOFREEZE + ".",
        ],
        data,
    )


def _freeze_steps(task: Task, froze: dict) -> Table:
    names = [n for n in froze if any(froze[n])]
    layers = sorted({layer for n in names for run in froze[n] for layer in run}, key=lambda s: (len(s), s))
    rows = []
    for layer in layers:
        row = [layer]
        for n in names:
            steps = [run[layer] for run in froze[n] if layer in run]
            row.append(
                f"{fmt_num(statistics.median(steps), 3)} ({len(steps)}/{len(froze[n])} seeds)"
                if steps
                else "never"
            )
        rows.append(row)
    return Table(
        f"{task.name}: where each layer froze (optimizer step, median over the seeds that froze it; "
        f"{task.total_steps} steps in all)",
        ["layer", *names],
        rows,
        [],
        {n: froze[n] for n in names},
    )


@comparison("adaptive", "AdaptiveFreeze: time to accuracy against full training and FreezeOut", order=35)
def run(ctx: BenchContext) -> Result:
    n_rounds = ctx.n_rounds(1, 3)
    seeds = list(range(n_rounds))
    result = Result(
        description=(
            "Full training with a per-step cosine LR, FreezeOut (t0 = 0.8), AdaptiveFreeze and AdaptiveFreeze with "
            "FrozenPrefixCache, side by side (one round = one seed, contenders alternate). Weights are copied at "
            "every epoch end outside the timed part and evaluated after the fit. " + AUTOFREEZE + "."
        ),
        config={
            "seeds": seeds,
            "device": str(ctx.device),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "target_gap_points": TARGET_GAP * 100,
        },
    )
    for make_task in (cnn_task, digits_task, bert_mnist1d_task):
        task = make_task(ctx)
        ctx.log(f"  {task.name}: {task.description}")
        curves: dict = {}
        froze: dict = {}
        ms = alternate(
            _contenders(ctx, task, seeds, curves, froze), rounds=n_rounds, warmup_rounds=0, log=ctx.log
        )
        result.config[task.name] = {
            **task.config,
            "total_steps": task.total_steps,
            "description": task.description,
        }
        result.tables.append(_summary(task, ms, curves))
        result.tables.append(_freeze_steps(task, froze))
        result.extra.setdefault("curves", {})[task.name] = curves
        result.extra.setdefault("errors", {})[task.name] = {m.name: m.error for m in ms if m.error}
    result.config["load_avg_1min_at_end"] = (
        round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    )
    return result
