"""A callback for tests/test_multirun.py (added with `+callbacks.probe=...`): every DDP rank records the
config it was built from and where it runs, into the job's output dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig


class RankProbe(pl.Callback):
    def __init__(self, stamp: str) -> None:
        self.stamp = stamp  # ${now:...}: differs if a rank composed its own config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hydra = HydraConfig.get()
        out = Path(hydra.runtime.output_dir)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "stamp": self.stamp,
            "overrides": list(hydra.overrides.task),
            "job_num": hydra.job.num,
            "split_hashes": trainer.datamodule.split_parts.hashes,
            "master_port": os.environ.get("MASTER_PORT"),
            "pid": os.getpid(),
        }
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
