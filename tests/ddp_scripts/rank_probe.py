"""A callback for the multirun and cluster tests (added with `+callbacks.probe=...`): every DDP rank records
the config it was built from, where it runs and the weights it ended with, into the job's output dir."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


class RankProbe(pl.Callback):
    def __init__(self, stamp: str) -> None:
        self.stamp = stamp  # ${now:...}: differs if a rank composed its own config
        self.record: dict = {}

    def _write(self, trainer: pl.Trainer) -> None:
        out = Path(HydraConfig.get().runtime.output_dir)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hydra = HydraConfig.get()
        self.record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "stamp": self.stamp,
            "overrides": list(hydra.overrides.task),
            "job_num": OmegaConf.select(hydra, "job.num", default=None, throw_on_missing=False),
            "split_hashes": trainer.datamodule.split_parts.hashes,
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            "master_port": os.environ.get("MASTER_PORT"),
            "pid": os.getpid(),
        }
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()  # parameters: what DDP keeps identical (BatchNorm buffers move per rank)
        for name, tensor in sorted(pl_module.named_parameters()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.record["params_sha256"] = digest.hexdigest()
        self.record["global_step"] = trainer.global_step
        self._write(trainer)
