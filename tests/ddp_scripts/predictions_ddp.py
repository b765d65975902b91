"""Run by tests/test_oof.py as `python predictions_ddp.py <root> <devices>`; Lightning's DDP launcher re-runs it
once per extra rank. Validates and tests a fixed model (identical weights in every process) with
PredictionRecorder on odd-sized parts, and writes what every rank recorded before the gather."""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from lightning_freeze.splitrun import KFold, PredictionRecorder, SplitRunDataModule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import shutdown  # noqa: E402

N = 203  # 5-fold after a 0.2 test part: odd-sized val and test parts, uneven shards on 2 ranks


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


class Net(pl.LightningModule):
    """Calls self(x) in its steps and returns nothing: the recorder takes the forward output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = model()
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.rows.append(len(y))
        self(x)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self(x)


def main(root: str, devices: int) -> None:
    dm = SplitRunDataModule(data(), split=KFold(k=5, fold=1, test_ratio=0.2), batch_size=8, labels=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[PredictionRecorder()],
    )
    net = Net()
    trainer.validate(net, datamodule=dm, verbose=False)
    trainer.test(net, datamodule=dm, verbose=False)
    rows = [None] * trainer.world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(rows, sum(net.rows))
    else:
        rows = [sum(net.rows)]
    if trainer.is_global_zero:
        with open(os.path.join(root, "ranks.json"), "w") as fh:
            json.dump(
                {"val_rows_per_rank": rows, "val": dm.part("val").tolist(), "test": dm.part("test").tolist()},
                fh,
            )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    shutdown()
