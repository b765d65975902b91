"""2-process DDP on CPU (gloo): AdaptiveFreeze decides on rank 0 from all-reduced gradients and every rank
freezes alike. Run as ``python adaptive_ddp.py OUT_DIR``; each rank writes ``rank<r>.json``."""

import json
import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import replicas_equal, shutdown  # noqa: E402
from models import Net, loaders, trainer  # noqa: E402

from lightning_freeze import AdaptiveFreeze  # noqa: E402


class Report(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir, self.ddp_params = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ddp = trainer.strategy.model
        self.ddp_params.append([trainer.global_step, sum(p.requires_grad for p in ddp.module.parameters())])

    def on_train_end(self, trainer, pl_module):
        result = {
            "rank": trainer.global_rank,
            "replicas_equal": replicas_equal(pl_module),
            "events": trainer.callbacks[0].events,
            "ddp_params": self.ddp_params,
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = Net("adam", dropout=0.1)
    t = trainer(
        callbacks=[
            AdaptiveFreeze(check_every_n_steps=2, percentile=90, min_steps=2, plot=False),
            Report(out_dir),
        ],
        max_epochs=4,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, *loaders(n_train=64, n_val=24))
    shutdown()
