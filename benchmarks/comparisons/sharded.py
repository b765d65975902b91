"""Sharded fine-tuning under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` per block and on the
root), 2 CPU processes with gloo: step time and peak memory per rank.

Model: a BERT-style encoder (``BertForSequenceClassification`` from a transformers config, random init, no
download), generated token sequences. Contenders, each a separate 2-process run:

- **full**: every weight trains, every block its own FSDP unit;
- **frozen prefix, sharded**: ``LayerFreeze`` over the embeddings and the bottom half of the blocks for the whole
  fit; every block stays an FSDP unit (the frozen units are still all-gathered in every forward, but get no
  gradient and no reduce-scatter);
- **frozen prefix, replicated**: the same freeze, but the frozen blocks are not sharded: ``fully_shard`` only on
  the top blocks and on the root with the frozen parameters as ``ignored_params``, so every rank keeps a full copy
  of the frozen prefix and nothing of it is ever gathered;
- **finetuning-scheduler**: ``FinetuningScheduler`` with an explicit schedule whose phase 0 trains the same top
  half + head (run where it runs under ``ModelParallelStrategy``; its error otherwise).

The frozen-prefix cache is refused under sharded strategies for now (docs/sharded.md), so it is not a contender.

Measured per rank: the median step time (the first steps left out) and the peak resident memory of the process
(``ru_maxrss``; it includes the Python/torch baseline, the same for every contender).

Run alone: ``python -m benchmarks --only sharded [--quick]``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

from benchmarks.harness import BenchContext, Result, Table, comparison

CONTENDERS = {
    "full": "full fine-tuning",
    "sharded": "frozen prefix, sharded",
    "replicated": "frozen prefix, replicated",
    "fts": "finetuning-scheduler",
}


def _config(quick: bool) -> dict:
    return dict(
        hidden=64 if quick else 256, blocks=4 if quick else 8, seq=32 if quick else 128, batch=8, steps=12
    )


def _worker(out_dir: str, contender: str, quick: bool) -> None:
    """One 2-process FSDP2 fit (run by Lightning's launcher on every rank); writes ``<contender>-rank<r>.json``."""
    import warnings

    import lightning.pytorch as pl
    import torch
    import transformers as tf
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_freeze import LayerFreeze

    warnings.filterwarnings("ignore")
    cfg = _config(quick)
    half = cfg["blocks"] // 2
    frozen_spec = ["model.bert.embeddings", *[f"model.bert.encoder.layer.{i}" for i in range(half)]]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = tf.BertConfig(
                vocab_size=512,
                hidden_size=cfg["hidden"],
                num_hidden_layers=cfg["blocks"],
                num_attention_heads=4,
                intermediate_size=cfg["hidden"] * 2,
                max_position_embeddings=cfg["seq"],
                num_labels=3,
            )
            self.model = tf.BertForSequenceClassification(config)

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            blocks = list(self.model.bert.encoder.layer)
            if contender == "replicated":
                prefix = [self.model.bert.embeddings, *blocks[:half]]
                for block in blocks[half:]:
                    fully_shard(block, mesh=mesh)
                ignored = {p for m in prefix for p in m.parameters()}
                fully_shard(self, mesh=mesh, ignored_params=ignored)
            else:
                for block in blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(self, mesh=mesh)

        def forward(self, ids, labels):  # through the root's forward, so FSDP2 gathers the root's parameters
            return self.model(input_ids=ids, labels=labels).loss

        def training_step(self, batch, batch_idx):
            return self(*batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    from benchmarks.lit import StepTimer

    class Timer(StepTimer):  # the benchmarks' one step timer (start to start), plus the trainable fraction
        def __init__(self) -> None:
            super().__init__("cpu")
            self.trainable = float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            # while training: a freezing callback hands requires_grad back when the fit ends
            params = list(pl_module.parameters())
            self.trainable = sum(p.numel() for p in params if p.requires_grad) / sum(
                p.numel() for p in params
            )

    module = Module()
    if (
        contender == "replicated"
    ):  # the replicated prefix is frozen by hand: no callback owns unsharded layers
        for name, p in module.named_parameters():
            if any(name.startswith(spec + ".") for spec in frozen_spec):
                p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    n = cfg["batch"] * 2 * (cfg["steps"] + 2)
    ids = torch.randint(1, 512, (n, cfg["seq"]), generator=g)
    data = DataLoader(TensorDataset(ids, ids[:, 0] * 3 // 512), batch_size=cfg["batch"])
    timer = Timer()
    callbacks: list = [timer]
    if contender == "sharded":
        callbacks.append(LayerFreeze(layers=frozen_spec))
    elif contender == "fts":
        from finetuning_scheduler import FinetuningScheduler

        names = [name for name, _ in module.named_parameters()]
        top = [name for name in names if not any(name.startswith(spec + ".") for spec in frozen_spec)]
        schedule = {
            0: {"params": top, "max_transition_epoch": 1000},
            1: {"params": [x for x in names if x not in top], "max_transition_epoch": 1001},
        }
        callbacks.append(
            FinetuningScheduler(
                ft_schedule=schedule, epoch_transitions_only=True, restore_best=False, logging_level=40
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=cfg["steps"],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    result: dict = {"rank": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        trainer.fit(module, data)
        times = timer.step_times()
        steady = times[3:] or times
        result["step_ms"] = statistics.median(steady) * 1e3
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["trainable_fraction"] = timer.trainable
    except Exception as err:  # noqa: BLE001 - a contender that does not run here is reported, not fatal
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    with open(os.path.join(out_dir, f"{contender}-rank{result['rank']}.json"), "w") as fh:
        json.dump(result, fh)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _launch(out_dir: str, contender: str, quick: bool) -> list[dict]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.comparisons.sharded",
        out_dir,
        contender,
        "quick" if quick else "full",
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    reports = []
    for rank in range(2):
        path = os.path.join(out_dir, f"{contender}-rank{rank}.json")
        if os.path.exists(path):
            with open(path) as fh:
                reports.append(json.load(fh))
        else:
            reports.append(
                {"rank": rank, "error": f"no report (exit {proc.returncode}): {proc.stderr[-300:]}"}
            )
    return reports


@comparison(
    "sharded", "Sharded fine-tuning (FSDP2, 2 CPU processes): step time and memory per rank", order=75
)
def run(ctx: BenchContext) -> Result:
    rows, data = [], []
    with tempfile.TemporaryDirectory(prefix="lf-sharded-") as out_dir:
        measured = {name: _launch(out_dir, name, ctx.quick) for name in CONTENDERS}
    full_ms = statistics.mean(r.get("step_ms", float("nan")) for r in measured["full"])
    for name, label in CONTENDERS.items():
        reports = measured[name]
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            rows.append([label, "—", "—", "—", errors[0][:120]])
            data.append({"contender": name, "error": errors[0]})
            continue
        step = [r["step_ms"] for r in reports]
        rss = [r["peak_rss_mib"] for r in reports]
        rows.append(
            [
                label,
                " / ".join(f"{s:.1f}" for s in step),
                f"{full_ms / statistics.mean(step):.2f}x",
                " / ".join(f"{m:.0f}" for m in rss),
                f"{reports[0]['trainable_fraction']:.2f}",
            ]
        )
        data.append({"contender": name, "step_ms": step, "peak_rss_mib": rss, **reports[0]})
    table = Table(
        title="FSDP2, BERT-style encoder, bottom half + embeddings frozen (2 CPU processes, gloo)",
        columns=[
            "contender",
            "step ms (rank 0 / 1)",
            "speed vs full",
            "peak RSS MiB (rank 0 / 1)",
            "trainable",
        ],
        rows=rows,
        data=data,
        notes=[
            "Peak RSS includes the Python/torch baseline of each process; compare contenders, not absolutes.",
            "Quick mode on a shared 2-core machine (other jobs running, load average about 5): step times are noisy.",
            "The frozen-prefix cache is refused under sharded strategies for now (docs/sharded.md).",
        ],
    )
    return Result(
        name="sharded",
        title="Sharded fine-tuning under FSDP2",
        description=__doc__.split("\n\n")[0],
        tables=[table],
        config=_config(ctx.quick),
    )


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] == "quick")
