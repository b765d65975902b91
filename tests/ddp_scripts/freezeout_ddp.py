"""2-process DDP on CPU (gloo): FreezeOut freezes three layers mid-run; report what each rank saw.

Run as ``python freezeout_ddp.py OUT_DIR``; Lightning's launcher starts rank 1 by re-running this
script. Each rank writes ``rank<r>.json``. A DDP communication hook counts the gradient elements that
are really all-reduced in every backward pass, so the test can see frozen layers leave the all-reduce.
"""

import os
import sys

import lightning.pytorch as pl
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import replicas_equal, shutdown, write_rank_report  # noqa: E402
from models import Net, loaders, trainer  # noqa: E402

from lightning_freeze import FreezeOut  # noqa: E402

REDUCED: list[int] = []


def counting_hook(state, bucket):
    REDUCED.append(bucket.buffer().numel())
    return allreduce_hook(None, bucket)


class Report(pl.Callback):
    """Listed after FreezeOut: on_train_batch_start sees the wrapper this step's forward will use."""

    def __init__(self, out_dir):
        self.out_dir, self.steps, self.wrappers = out_dir, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ddp = trainer.strategy.model
        if not self.wrappers or self.wrappers[-1] is not ddp:
            ddp.register_comm_hook(None, counting_hook)  # every re-wrap is a fresh DistributedDataParallel
            self.wrappers.append(ddp)
        info = ddp._get_ddp_logging_data()
        self.steps.append(
            {
                "step": trainer.global_step,
                "trainable": sum(p.numel() for p in ddp.module.parameters() if p.requires_grad),
                "ddp_param_bytes": info.get("total_parameter_size_bytes"),
                "find_unused_parameters": ddp.find_unused_parameters,
                "wrapper": len(self.wrappers),
            }
        )
        REDUCED.clear()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["allreduced"] = sum(REDUCED)

    def on_train_end(self, trainer, pl_module):
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "replicas_equal": replicas_equal(pl_module),
            "events": trainer.callbacks[0].events,
            "total_steps": trainer.callbacks[0].total_steps,
            "steps": self.steps,
            "groups": [[g["name"], len(g["params"]), g["lr"]] for g in trainer.optimizers[0].param_groups],
            "layer_numel": {
                name: sum(p.numel() for p in module.parameters())
                for name, module in [
                    *((f"backbone.{i}", b) for i, b in enumerate(pl_module.backbone)),
                    ("head", pl_module.head),
                ]
            },
        }
        write_rank_report(self.out_dir, result)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = Net("sgd", dropout=0.1)
    t = trainer(
        callbacks=[FreezeOut("backbone.*", t0=0.5, schedule="linear"), Report(out_dir)],
        max_epochs=4,  # 64 samples / 2 ranks / batch 8 = 4 steps per epoch: 16 steps, freezes at 8, 11, 14
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, *loaders(n_train=64, n_val=24))
    shutdown()
