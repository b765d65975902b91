"""Sharded fine-tuning under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` per block and on the
root), 2 CPU processes with gloo: step time, training state and all-gathers of the frozen units per rank.

Model: a BERT-style encoder (``BertForSequenceClassification`` from a transformers config, random init, no
download), generated token sequences; the embeddings and the bottom half of the blocks are frozen for the whole
fit. Contenders (one fit each per round, all in the same two processes, alternated round by round):

- **full fine-tuning** (the baseline): every weight trains; the embeddings and every block are FSDP units;
- **frozen prefix, sharded**: ``LayerFreeze`` over the prefix, the same units: the frozen units are all-gathered in
  every forward (and the last one again by FSDP2's backward prefetch), but get no gradient and no reduce-scatter;
- **frozen prefix, replicated**: the same freeze, but the prefix is not sharded: ``fully_shard`` only on the top
  blocks and on the root with the prefix's parameters as ``ignored_params``; every rank keeps a full copy of the
  prefix and nothing of it is gathered;
- **frozen prefix cached**: ``LayerFreeze`` + ``FrozenPrefixCache`` on the sharded layout: from the second epoch
  the prefix's output comes from the cache, no frozen module runs and no frozen unit is gathered;
- **limit (suffix alone)**: a hand-written module that trains only the top blocks and the head (sharded the same
  way) on the prefix's outputs computed once before the fit: what a perfect cache would cost;
- **finetuning-scheduler**: ``FinetuningScheduler`` with an explicit schedule whose phase 0 trains the same top
  half + head.

Every fit runs ``epochs`` epochs; each rank keeps its samples across epochs (SplitRun's ``TrainShardSampler`` with
``fixed_shards=True``, for every contender). The step times are those of the epochs after the first, so the cache
is warm, and the same steps are timed for everyone.

Run alone: ``python -m benchmarks --only sharded [--quick]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from benchmarks.harness import BenchContext, Measurement, Result, Table, comparison, fmt_ratio

CONTENDERS = {
    "full": "full fine-tuning",
    "sharded": "frozen prefix, sharded",
    "replicated": "frozen prefix, replicated",
    "cached": "frozen prefix cached",
    "limit": "limit (suffix alone)",
    "fts": "finetuning-scheduler",
}
BASELINE = "full"


def _config(quick: bool) -> dict[str, int]:
    return dict(
        hidden=64 if quick else 256,
        blocks=4 if quick else 8,
        seq=32 if quick else 128,
        batch=8,
        steps_per_epoch=4 if quick else 6,
        epochs=3,
        rounds=1 if quick else 3,
        warmup_rounds=0 if quick else 1,
    )


# ---------------------------------------------------------------------------------------------------- worker
def _worker(out_dir: str, quick: bool) -> None:
    """All rounds of all contenders in this process (Lightning's launcher runs it on every rank); writes
    ``rank<r>.json``: per contender, one sample per recorded round."""
    import warnings

    import torch

    from benchmarks.lit import quiet

    warnings.filterwarnings("ignore")
    cfg = _config(quick)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in CONTENDERS}
    errors: dict[str, str] = {}
    rank = 0
    with quiet():
        for r in range(cfg["warmup_rounds"] + cfg["rounds"]):
            for name in CONTENDERS:
                if name in errors:
                    continue
                try:
                    sample = _fit(name, cfg, out_dir)
                except Exception as err:  # noqa: BLE001 - a contender that does not run here is reported
                    errors[name] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    continue
                rank = int(sample.pop("rank"))
                if r >= cfg["warmup_rounds"]:
                    for key, value in sample.items():
                        samples[name].setdefault(key, []).append(value)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "samples": samples, "errors": errors}, fh)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _bert(cfg: dict[str, int]) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=512,
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["blocks"],
        num_attention_heads=4,
        intermediate_size=cfg["hidden"] * 2,
        max_position_embeddings=cfg["seq"],
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.BertForSequenceClassification(config)


def _fit(name: str, cfg: dict[str, int], out_dir: str) -> dict[str, float]:
    """One fit of contender ``name``; returns this rank's sample."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import ConcatDataset, TensorDataset

    from benchmarks.lit import StepTimer
    from lightning_freeze import FrozenPrefixCache, LayerFreeze
    from lightning_freeze.splitrun import ResumableDataLoader, TrainShardSampler

    half = cfg["blocks"] // 2
    prefix_names = ["model.bert.embeddings", *[f"model.bert.encoder.layer.{i}" for i in range(half)]]
    n = cfg["batch"] * 2 * cfg["steps_per_epoch"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 512, (n, cfg["seq"]), generator=g)
    labels = ids[:, 0] * 3 // 512

    class Encoder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _bert(cfg)

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            bert = self.model.bert
            blocks = list(bert.encoder.layer)
            if name == "replicated":
                for block in blocks[half:]:
                    fully_shard(block, mesh=mesh)
                prefix = [bert.embeddings, *blocks[:half]]
                fully_shard(self, mesh=mesh, ignored_params={p for m in prefix for p in m.parameters()})
                return
            for unit in [bert.embeddings, *blocks]:
                fully_shard(unit, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, ids, labels):  # through the root's forward, so FSDP2 gathers the root's parameters
            return self.model(input_ids=ids, labels=labels).loss

        def training_step(self, batch, batch_idx):
            return self(*batch)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    class Suffix(pl.LightningModule):
        """The limit: the top blocks and the head on the prefix's outputs, sharded like the others."""

        def __init__(self) -> None:
            super().__init__()
            model = _bert(cfg)
            self.blocks = torch.nn.ModuleList(list(model.bert.encoder.layer)[half:])
            self.pooler, self.classifier = model.bert.pooler, model.classifier

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for block in self.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, hidden, labels):
            for block in self.blocks:
                hidden = block(hidden)
            logits = self.classifier(self.pooler(hidden))
            return torch.nn.functional.cross_entropy(logits, labels)

        def training_step(self, batch, batch_idx):
            return self(*batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    timer = StepTimer("cpu")
    probe = _Probe(prefix_names, cfg["steps_per_epoch"])
    callbacks: list[Any] = [timer, probe]
    if name == "limit":
        with torch.no_grad():  # the prefix's outputs, once, outside the fit: what a perfect cache serves
            bert = _bert(cfg).bert.eval()
            hidden = bert.embeddings(input_ids=ids)
            for block in list(bert.encoder.layer)[:half]:
                hidden = block(hidden)
        module: pl.LightningModule = Suffix()
        data = TensorDataset(hidden.contiguous(), labels)
        probe.rows_bytes = hidden.numel() * hidden.element_size() / 2  # this rank's half
    else:
        module = Encoder()
        data = TensorDataset(ids, labels)
    if name == "replicated":  # frozen by hand: the prefix is not sharded, so no callback manages it
        for pname, p in module.named_parameters():
            if any(pname.startswith(spec + ".") for spec in prefix_names):
                p.requires_grad_(False)
    elif name in ("sharded", "cached"):
        callbacks.insert(0, LayerFreeze(layers=prefix_names))
        if name == "cached":
            probe.cache = FrozenPrefixCache(max_disk_bytes=0, log_stats=False)
            callbacks.insert(1, probe.cache)
    elif name == "fts":
        from finetuning_scheduler import FinetuningScheduler

        names = [pname for pname, _ in module.named_parameters()]
        top = [x for x in names if not any(x.startswith(spec + ".") for spec in prefix_names)]
        schedule = {
            0: {"params": top, "max_transition_epoch": 1000},
            1: {"params": [x for x in names if x not in top], "max_transition_epoch": 1001},
        }
        callbacks.append(
            FinetuningScheduler(
                ft_schedule=schedule, epoch_transitions_only=True, restore_best=False, logging_level=40
            )
        )
    epochs, steps = cfg["epochs"], -1
    if name == "fts":
        # the same steps inside one longer epoch, ended by max_steps: at an epoch end (or a fit end at an epoch end)
        # under ModelParallelStrategy, finetuning-scheduler's ranks ran different collectives here (a fit took
        # minutes, stuck until gloo paired them up)
        data, epochs, steps = ConcatDataset([data] * (epochs + 1)), 1, epochs * cfg["steps_per_epoch"]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=epochs,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
    # each rank keeps its samples across epochs (a per-rank cache needs that; see docs/cache.md), for everyone
    sampler = TrainShardSampler(len(data), shuffle=True, seed=0, fixed_shards=True)
    trainer.fit(module, ResumableDataLoader(data, batch_size=cfg["batch"], sampler=sampler))
    timed = timer.step_times()[cfg["steps_per_epoch"] :]  # the epochs after the first: the cache is warm
    return {
        "rank": trainer.global_rank,
        "step_s": statistics.median(timed),
        "state_mib": probe.state_bytes / 2**20,
        "rows_mib": probe.rows_bytes / 2**20,
        "frozen_gathers_per_step": probe.frozen_gathers / len(timed),
        "trainable": probe.trainable,
        "hit_rate": probe.hit_rate,
    }


class _Probe(Callback):
    """Counts the all-gathers of the frozen prefix's FSDP units in the timed epochs, and measures at the end of
    training what this rank holds: local parameter shards, gradients and optimizer state (bytes), the cache's rows,
    and the trainable fraction."""

    def __init__(self, prefix_names: list[str], steps_per_epoch: int) -> None:
        self.prefix_names, self.steps_per_epoch = prefix_names, steps_per_epoch
        self.cache: Any = None
        self.frozen_gathers = 0
        self.state_bytes = 0.0
        self.rows_bytes = 0.0
        self.trainable = float("nan")
        self.hit_rate = float("nan")
        self._counting = False

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        from lightning_freeze.engine.sharding import clean_name

        for unit_name, module in pl_module.named_modules():
            get_state = getattr(module, "_get_fsdp_state", None)
            group = getattr(get_state(), "_fsdp_param_group", None) if callable(get_state) else None
            if group is None or clean_name(unit_name) not in self.prefix_names:
                continue
            original = group.unshard

            def unshard(*args, _original=original, _group=group, **kwargs):
                if self._counting and _group._all_gather_result is None and not _group.is_unsharded:
                    self.frozen_gathers += 1
                return _original(*args, **kwargs)

            group.unshard = unshard

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._counting = trainer.global_step >= self.steps_per_epoch  # the timed steps

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        from lightning_freeze.engine.sharding import local_part

        def nbytes(t) -> int:
            t = local_part(t)
            return t.numel() * t.element_size()

        params = list(pl_module.parameters())
        total = sum(p.numel() for p in params)
        self.trainable = sum(p.numel() for p in params if p.requires_grad) / total
        self.state_bytes = sum(nbytes(p) for p in params)
        self.state_bytes += sum(nbytes(p.grad) for p in params if p.grad is not None)
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                self.state_bytes += sum(nbytes(v) for v in state.values() if hasattr(v, "numel"))
        if self.cache is not None and self.cache.history:
            last = self.cache.history[-1]
            self.rows_bytes = float(last["bytes"])
            self.hit_rate = float(last["hit_rate"] or 0.0)


# ---------------------------------------------------------------------------------------------------- driver
def _launch(out_dir: str, quick: bool) -> list[dict]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "benchmarks.comparisons.sharded", out_dir, "quick" if quick else "full"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3000)
    reports = []
    for rank in range(2):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            raise RuntimeError(
                f"the 2-process run wrote no report (exit {proc.returncode}): {proc.stderr[-800:]}"
            )
        with open(path) as fh:
            reports.append(json.load(fh))
    return reports


def _measurements(reports: list[dict]) -> list[Measurement]:
    """One measurement per contender; a round's step time is the slower rank's (the ranks wait for each other)."""
    out = []
    for name, label in CONTENDERS.items():
        m = Measurement(label)
        error = next((r["errors"][name] for r in reports if name in r["errors"]), None)
        if error is not None:
            m.error = error
            out.append(m)
            continue
        per_rank = [r["samples"][name] for r in reports]
        m.samples["step_s"] = [max(v) for v in zip(*(s["step_s"] for s in per_rank), strict=True)]
        for key in ("state_mib", "rows_mib", "frozen_gathers_per_step", "trainable", "hit_rate"):
            m.extra[key] = [statistics.median(s[key]) for s in per_rank]
        out.append(m)
    return out


@comparison(
    "sharded", "Sharded fine-tuning (FSDP2, 2 CPU processes): step time and memory per rank", order=75
)
def run(ctx: BenchContext) -> Result:
    with tempfile.TemporaryDirectory(prefix="lf-sharded-") as out_dir:
        reports = _launch(out_dir, ctx.quick)
    measurements = _measurements(reports)
    by_name = {m.name: m for m in measurements}

    def per_rank(key: str, digits: int = 1) -> Any:
        return lambda m: " / ".join(f"{v:.{digits}f}" for v in m.extra[key]) if key in m.extra else "—"

    table = Table.build(
        "FSDP2, BERT-style encoder, embeddings + bottom half frozen (2 CPU processes, gloo)",
        measurements,
        baseline=CONTENDERS[BASELINE],
        metric="step_s",
        unit="ms",
        scale=1e3,
        label="step time",
        extra_columns={
            "state MiB (rank 0 / 1)": per_rank("state_mib"),
            "cached rows MiB": per_rank("rows_mib"),
            "frozen-unit all-gathers per step": per_rank("frozen_gathers_per_step", 2),
            "trainable": lambda m: f"{m.extra['trainable'][0]:.2f}" if "trainable" in m.extra else "—",
        },
        notes=[
            "Step time: the slower rank's median step (start to start) over the epochs after the first, so the "
            "cache serves every step; the ratio column is contender ÷ full fine-tuning (lower is better).",
            "State: this rank's parameter shards (a full copy of the replicated prefix), gradients and optimizer "
            "state at the end of the fit; cached rows: the cache's RAM (for the limit: its precomputed inputs). "
            "Process RSS is not separable per contender here: all fits share two processes.",
            "Frozen-unit all-gathers: the FSDP2 all-gathers of the embeddings' and frozen blocks' units per timed "
            "step (forward, plus the backward prefetch of the last frozen block).",
            "finetuning-scheduler runs the same steps in one longer epoch ended by max_steps: with an epoch end "
            "under ModelParallelStrategy its ranks ran different collectives here and a fit took minutes.",
        ],
    )
    goals = _goals(by_name)
    return Result(
        description=__doc__.split("\n\n")[0],
        tables=[table, goals],
        config=_config(ctx.quick),
    )


def _goals(by_name: dict[str, Measurement]) -> Table:
    """The issue's goals: the cached step gets at least 0.9 of the limit's speedup (limit ÷ cached step, paired by
    round), and no contender is slower than finetuning-scheduler."""
    rows, data = [], []

    def paired(a: str, b: str) -> float:
        va, vb = by_name[CONTENDERS[a]].samples.get("step_s"), by_name[CONTENDERS[b]].samples.get("step_s")
        if not va or not vb or len(va) != len(vb):
            return float("nan")
        return statistics.median(x / y for x, y in zip(va, vb, strict=True))

    share = 1 / paired("cached", "limit")
    rows.append(["cached step: share of the limit's speedup (limit ÷ cached)", f"{share:.2f}", "≥ 0.90"])
    rows[-1].append("met" if share >= 0.9 else "not met")
    data.append({"goal": "cached_share_of_limit", "value": share, "target": 0.9})
    for name in ("sharded", "replicated", "cached"):
        ratio = paired(name, "fts")
        verdict = "met" if ratio <= 1 else "not met"
        rows.append([f"{CONTENDERS[name]} ÷ finetuning-scheduler", fmt_ratio(ratio), "≤ 1", verdict])
        data.append({"goal": f"{name}_vs_fts", "value": ratio, "target": 1.0})
    return Table(
        title="Goals (step time ratios paired by round)",
        columns=["goal", "measured", "target", "verdict"],
        rows=rows,
        notes=[
            "Ratios are contender ÷ reference (lower is better); the share is its inverse against the limit."
        ],
        data=data,
    )


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2] == "quick")
