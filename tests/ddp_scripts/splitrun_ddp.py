"""Run by tests/test_sampling.py as `python splitrun_ddp.py <out.json> <devices>`; Lightning's DDP launcher
re-runs it once per extra rank. Fits one epoch and validates a fixed model on an odd-sized val part, and
records what every rank saw."""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torchmetrics
from torch import nn
from torch.utils.data import TensorDataset

from lightning_freeze.splitrun import KFold, SplitRunDataModule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import shutdown  # noqa: E402

N = 203  # holdout 0.8/0.1/0.1 -> 162 train, 20 val, 21 test; kfold below -> an odd val part


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.acc = torchmetrics.Accuracy("multiclass", num_classes=3)
        self.cat = torchmetrics.CatMetric()  # a "cat" state: all_gather of uneven per-rank sizes
        self.gathered: list[int] = []
        self.seen: dict[str, list[int]] = {"train": [], "val": []}
        self.train_batches = 0

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen["train"] += idx.tolist()
        self.train_batches += 1
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen["val"] += idx.tolist()
        self.acc(self.net(x), y)
        self.log("val_acc", self.acc, on_epoch=True)
        self.cat.update(idx.float())

    def on_validation_epoch_end(self):
        self.gathered = sorted(int(i) for i in self.cat.compute().tolist())
        self.cat.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def gather(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main(out: str, devices: int, root: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    data = TensorDataset(x, y)
    dm = SplitRunDataModule(
        data,
        split=KFold(k=5, fold=1, stratify=True),
        labels=y.numpy(),
        seed=0,
        batch_size=8,
        loader_options={"drop_last": True},
        return_indices=True,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    pl.seed_everything(0, verbose=False)
    model = Net()
    trainer.fit(model, datamodule=dm)
    fit_seen = gather(
        {"train": model.seen["train"], "val": model.seen["val"], "batches": model.train_batches}
    )
    pl.seed_everything(0, verbose=False)
    fixed = Net()  # identical weights in every process and in the 1-process run
    fixed.seen = {"train": [], "val": []}
    metrics = trainer.validate(fixed, datamodule=dm, verbose=False)
    val_seen = gather(fixed.seen["val"])
    if trainer.is_global_zero:
        val = torch.as_tensor(dm.part("val"))
        fixed.eval()
        with torch.no_grad():
            correct = int((fixed.net(x[val]).argmax(1) == y[val]).sum())
        with open(out, "w") as fh:
            json.dump(
                {
                    "val_acc": metrics[0]["val_acc"],
                    "correct": correct,
                    "gathered": fixed.gathered,
                    "fit": fit_seen,
                    "validate": val_seen,
                    "val_part": dm.part("val").tolist(),
                    "train_part": dm.part("train").tolist(),
                },
                fh,
            )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    shutdown()
