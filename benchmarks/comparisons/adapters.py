"""Adapters and layer sampling: full fine-tuning, peft LoRA, LoRA + FrozenPrefixCache, LayerSampling (LISA) on
full weights and on LoRA adapters; peak training-state memory, step time and time to a target accuracy.

Models: a BERT-style encoder (``BertForSequenceClassification``) and a GPT-2-style decoder
(``GPT2ForSequenceClassification``), randomly initialised from transformers configs (no download), on a generated
task: random token sequences whose label is the third of the vocabulary that most real tokens fall in (the
model has to look at the whole sequence through the padding mask, so attention must learn). Every contender uses AdamW with the
same LR; the task head trains in every contender (``modules_to_save`` for the peft ones).

Contenders:

- **full**: every weight trains, no callback;
- **LoRA**: peft LoRA (r=8) on the attention projections of every block;
- **LoRA top half**: LoRA on the top half of the blocks only (``layers_to_transform``);
- **LoRA top half + FrozenPrefixCache**: the same, with ``LayerFreeze`` over the un-adapted bottom (embeddings
  and bottom blocks, which peft froze: the engine keeps them in eval mode) and the cache serving it;
- **LayerSampling**: full weights, ``n_layers=1`` middle block per ``interval`` steps, embeddings and head always;
- **LayerSampling on LoRA**: the same over the LoRA adapters.

Measured per round (one seed): the median step time (the first epoch left out: the cache fills there), the peak
over the steps of the *training state* (gradients + optimizer state, bytes; exact, CPU or GPU), the CUDA peak
allocated memory on a GPU, and the training time until the first epoch end whose validation accuracy reaches
the target. Weights are copied at every epoch end outside the timed part and evaluated after the fit.

Run alone: ``python -m benchmarks --only adapters [--quick]``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.harness import BenchContext, Contender, Result, Table, alternate, comparison, fmt_num
from benchmarks.lit import make_trainer, quiet

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
LISA = "LISA (Pan et al. 2024, arXiv 2403.17919): beats LoRA by 10-35% on MT-Bench at LoRA's memory (7B-70B models, GPU)"
GOALS = (
    "Goals (issue 21): LayerSampling's peak memory <= LoRA's + 10% at equal or better accuracy; LoRA + cache step "
    "time <= 0.7x LoRA alone when half the blocks carry no adapter."
)


@dataclass(frozen=True)
class Setting:
    kind: str  # bert | gpt2
    hidden: int
    blocks: int
    seq: int
    vocab: int
    n_train: int
    n_val: int
    batch: int
    epochs: int
    lr: float
    target: float  # validation accuracy to reach

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch


def _setting(ctx: BenchContext, kind: str) -> Setting:
    return ctx.pick(
        Setting(kind, 64, 4, 24, 96, 384, 128, 32, 2, 2e-3, 0.7),  # a smoke run: 2 epochs of 12 steps
        Setting(kind, 128, 6, 48, 192, 4096, 1024, 32, 8, 2e-3, 0.9),
    )


def _data(s: Setting, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, s.vocab, (n, s.seq), generator=g)
    lengths = torch.randint(s.seq // 2, s.seq + 1, (n,), generator=g)
    mask = (torch.arange(s.seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    # The label: the third of the vocabulary that most of the real tokens fall in (ties: the lower third), so
    # the model has to look at the whole sequence through the padding mask.
    buckets = torch.nn.functional.one_hot(ids * 3 // s.vocab, 3) * mask[..., None]
    return ids, mask, buckets.sum(dim=1).argmax(dim=1)


def _base_model(s: Setting) -> nn.Module:
    import transformers as tf

    if s.kind == "bert":
        config = tf.BertConfig(
            vocab_size=s.vocab,
            hidden_size=s.hidden,
            num_hidden_layers=s.blocks,
            num_attention_heads=4,
            intermediate_size=4 * s.hidden,
            max_position_embeddings=s.seq,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return tf.BertForSequenceClassification(config)
    config = tf.GPT2Config(
        vocab_size=s.vocab,
        n_embd=s.hidden,
        n_layer=s.blocks,
        n_head=4,
        n_positions=s.seq,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return tf.GPT2ForSequenceClassification(config)


def _lora(s: Setting, model: nn.Module, top_half: bool) -> nn.Module:
    import peft

    targets = ["query", "value"] if s.kind == "bert" else ["c_attn"]
    head = "classifier" if s.kind == "bert" else "score"
    extra = {"layers_to_transform": list(range(s.blocks // 2, s.blocks))} if top_half else {}
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=targets,
        modules_to_save=[head],
        fan_in_fan_out=s.kind == "gpt2",
        **extra,
    )
    return peft.get_peft_model(model, config)


def _module(s: Setting, adapter: str | None):
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            model = _base_model(s)
            self.model = _lora(s, model, adapter == "top") if adapter else model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask).logits

        def training_step(self, batch, batch_idx):
            ids, mask, y = batch
            return nn.functional.cross_entropy(self(ids, mask), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=s.lr, weight_decay=1e-2)

    return Classifier()


class _Probe:
    """The harness's step timer with weight snapshots at epoch ends, plus the epoch of each step and the peak
    training-state bytes (counted outside the timed part)."""

    def __new__(cls, device):
        from typing_extensions import override

        from benchmarks.lit import StepTimer

        class Probe(StepTimer):
            def __init__(self) -> None:
                super().__init__(device, snapshots=True)
                self.epoch_step: list[int] = []
                self.state_bytes = 0

            @property
            def step_s(self) -> list[float]:
                return self.step_times()

            @override
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
                self.epoch_step.append(trainer.current_epoch)

            @override
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                with self.clock.excluded():
                    grads = sum(
                        p.grad.numel() * p.grad.element_size()
                        for p in pl_module.parameters()
                        if p.grad is not None
                    )
                    state = sum(
                        v.numel() * v.element_size()
                        for per_param in trainer.optimizers[0].state.values()
                        for v in per_param.values()
                        if isinstance(v, torch.Tensor)
                    )
                    self.state_bytes = max(self.state_bytes, grads + state)
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

        return Probe()


def _contenders(ctx: BenchContext, s: Setting, curves: dict) -> list[Contender]:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_freeze import FrozenPrefixCache, LayerFreeze, LayerSampling

    train = _data(s, s.n_train, 0)
    val = tuple(t.to(ctx.device) for t in _data(s, s.n_val, 1))
    interval = max(1, s.steps_per_epoch // 2)
    # The embeddings and the blocks below the first adapter (peft left nothing trainable in them).
    below = rf"[0-{s.blocks // 2 - 1}]"
    bottom = (
        rf"re:.*bert\.(embeddings|encoder\.layer\.{below})"
        if s.kind == "bert"
        else rf"re:.*transformer\.(wte|wpe|h\.{below})"
    )

    specs: list[tuple[str, str | None, Callable[[], list], str]] = [
        ("full", None, lambda: [], "every weight trains"),
        (
            "LoRA",
            "all",
            lambda: [],
            "peft LoRA r=8 on the attention projections of every block, head in modules_to_save",
        ),
        ("LoRA top half", "top", lambda: [], f"LoRA on blocks {s.blocks // 2}..{s.blocks - 1} only"),
        (
            "LoRA top half + FrozenPrefixCache",
            "top",
            lambda: [LayerFreeze(bottom, plot=False), FrozenPrefixCache()],
            f"LayerFreeze({bottom!r}) names the un-adapted bottom; the cache serves it",
        ),
        (
            "LayerSampling",
            None,
            lambda: [LayerSampling(n_layers=1, interval=interval, seed=0, plot=False)],
            f"full weights; n_layers=1, interval={interval}, embeddings and head always",
        ),
        (
            "LayerSampling on LoRA",
            "all",
            lambda: [LayerSampling(n_layers=1, interval=interval, seed=0, plot=False)],
            f"LoRA adapters of one block per {interval} steps; head always",
        ),
    ]

    def fit_once(
        name: str, adapter: str | None, make_callbacks: Callable[[], list], seed: int
    ) -> dict[str, float]:
        import lightning.pytorch as pl

        pl.seed_everything(seed, verbose=False)
        model = _module(s, adapter)
        probe = _Probe(ctx.device)
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            TensorDataset(*train), batch_size=s.batch, shuffle=True, generator=g, drop_last=True
        )
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        callbacks = make_callbacks()
        with quiet(), tempfile.TemporaryDirectory(prefix="lf-bench-adapters-") as tmp:
            trainer = make_trainer(-1, [*callbacks, probe], ctx.device, root_dir=tmp, max_epochs=s.epochs)
            trainer.fit(model, loader)
        cache = next((cb for cb in callbacks if isinstance(cb, FrozenPrefixCache)), None)
        served = [e for e in (cache.history[1:] if cache is not None else []) if e.get("lookups")]
        hit_rate = (
            sum(e["hits"] for e in served) / max(1, sum(e["lookups"] for e in served)) if served else math.nan
        )
        cuda_peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else math.nan
        model.to(ctx.device).eval()
        curve = []
        for train_s, state in probe.points:
            model.load_state_dict(state)
            with torch.no_grad():
                acc = (model(val[0], val[1]).argmax(dim=1) == val[2]).float().mean().item()
            curve.append((train_s, acc))
        curves.setdefault(name, []).append(curve)
        steady = [t for t, e in zip(probe.step_s, probe.epoch_step, strict=True) if e > 0]
        reach = next((t for t, acc in curve if acc >= s.target), math.nan)
        return {
            "step_s": statistics.median(steady),
            "state_bytes": float(probe.state_bytes),
            "cuda_peak_bytes": float(cuda_peak),
            "val_acc": curve[-1][1],
            "time_to_target_s": reach,
            "cache_hit_rate": hit_rate,
        }

    def make(name, adapter, make_callbacks):
        rounds = {"n": 0}

        def run_round():
            rounds["n"] += 1
            return fit_once(name, adapter, make_callbacks, rounds["n"] - 1)

        return run_round

    return [Contender(name, make(name, a, cbs), note=note) for name, a, cbs, note in specs]


def _median(values: list[float], scale: float = 1.0, digits: int = 3, missing: str = "—") -> str:
    finite = [v * scale for v in values if math.isfinite(v)]
    if not finite:
        return missing if values else "—"
    text = fmt_num(statistics.median(finite), digits)
    return text + (f" ({len(values) - len(finite)} never)" if len(finite) < len(values) else "")


def _table(s: Setting, ms) -> Table:
    by_name = {m.name: m for m in ms}
    lora = by_name.get("LoRA")
    rows, data = [], []
    for m in ms:
        if m.error:
            rows.append([m.name, "—", "—", "—", "—", "—", "—", f"could not run: {m.error}"])
            continue
        ratio = "—"
        base = by_name["LoRA top half"] if m.name.endswith("FrozenPrefixCache") else lora
        if base is not None and not base.error and base is not m:
            ratio = (
                fmt_num(statistics.median(m.values("step_s")) / statistics.median(base.values("step_s")), 3)
                + "×"
            )
        mem_vs_lora = "—"
        if lora is not None and not lora.error:
            mem_vs_lora = (
                fmt_num(
                    statistics.median(m.values("state_bytes"))
                    / statistics.median(lora.values("state_bytes")),
                    3,
                )
                + "×"
            )
        rows.append(
            [
                m.name,
                _median(m.values("state_bytes"), 1 / 2**20) + f" ({mem_vs_lora} LoRA)",
                _median(m.values("cuda_peak_bytes"), 1 / 2**20),
                _median(m.values("step_s"), 1000) + f" ({ratio})",
                _median(m.values("time_to_target_s"), missing="never"),
                _median(m.values("val_acc"), 100),
                str(len(m.values("step_s"))),
                m.note
                + (
                    f" (cache hit rate after the first epoch: {_median(m.values('cache_hit_rate'), 100)} %)"
                    if any(math.isfinite(v) for v in m.values("cache_hit_rate"))
                    else ""
                ),
            ]
        )
        data.append({"contender": m.name, **{k: m.values(k) for k in m.samples}})
    return Table(
        f"{s.kind}: training-state memory, step time, time to {s.target * 100:g}% validation accuracy",
        [
            "contender",
            "peak grads + optimizer state (MiB)",
            "CUDA peak allocated (MiB)",
            "median step (ms) (÷ LoRA; the cache ÷ LoRA top half)",
            f"training time to {s.target * 100:g}% (s)",
            "final val acc (%)",
            "rounds",
            "how",
        ],
        rows,
        [
            f"{s.kind}: hidden {s.hidden}, {s.blocks} blocks, random init; {s.n_train} train / {s.n_val} val sequences of "
            f"{s.seq} tokens, batch {s.batch}, {s.epochs} epochs ({s.epochs * s.steps_per_epoch} steps), AdamW lr={s.lr}.",
            "Step times leave the first epoch out (the cache fills there). Memory is exact bytes of gradients and "
            "optimizer state, not activations; the CUDA column (GPU runs only) includes everything.",
            GOALS,
            LISA + ".",
        ],
        data,
    )


@comparison("adapters", "Adapters and LayerSampling: memory, step time and time to accuracy", order=60)
def run(ctx: BenchContext) -> Result:
    # One seed in full mode: a round at full size takes ~36 min on 2 CPU cores, and three would push the full
    # suite past two hours; `--rounds 3` asks for more where there is time (a GPU).
    n_rounds = ctx.n_rounds(1, 1)
    result = Result(
        description=(
            "Full fine-tuning, peft LoRA, LoRA on the top half with and without FrozenPrefixCache, LayerSampling on "
            "full weights and on LoRA adapters, on BERT- and GPT-2-style models trained on a generated task. One round "
            "= one seed; contenders alternate. " + LISA + "."
        ),
        config={
            "rounds": n_rounds,
            "device": str(ctx.device),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
    )
    for kind in ("bert", "gpt2"):
        setting = _setting(ctx, kind)
        ctx.log(f"  {kind}: {setting}")
        curves: dict = {}
        ms = alternate(_contenders(ctx, setting, curves), rounds=n_rounds, warmup_rounds=0, log=ctx.log)
        result.config[kind] = setting.__dict__
        result.tables.append(_table(setting, ms))
        result.extra.setdefault("curves", {})[kind] = curves
        result.extra.setdefault("errors", {})[kind] = {m.name: m.error for m in ms if m.error}
    result.config["load_avg_1min_at_end"] = (
        round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    )
    return result
