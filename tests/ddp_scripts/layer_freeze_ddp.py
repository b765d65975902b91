"""2-process DDP on CPU (gloo): LayerFreeze thaws mid-run; report what each rank ends with.

Run as ``python layer_freeze_ddp.py OUT_DIR``; Lightning's launcher starts rank 1 by re-running this
script. Each rank writes ``rank<r>.json``.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import replicas_equal, shutdown  # noqa: E402
from models import Net, loaders, trainer  # noqa: E402

from lightning_freeze import LayerFreeze  # noqa: E402


class Report(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir, self.ddp_params = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ddp = trainer.strategy.model
        # What the live DDP wrapper all-reduces: the parameters its reducer was built for.
        self.ddp_params.append(
            [
                trainer.global_step,
                sum(p.requires_grad for p in ddp.module.parameters()),
                ddp.find_unused_parameters,
            ]
        )

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat(
            [p.detach().flatten() for p in pl_module.state_dict().values() if p.is_floating_point()]
        )
        gathered = [torch.zeros_like(flat) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, flat)
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "replicas_equal": replicas_equal(pl_module),
            "events": trainer.callbacks[0].events,
            "ddp_params": self.ddp_params,
            "groups": [[g["name"], len(g["params"])] for g in trainer.optimizers[0].param_groups],
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = Net("adam", "step", dropout=0.2)
    t = trainer(
        callbacks=[LayerFreeze("backbone.*", until_step=5), Report(out_dir)],
        max_epochs=3,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, *loaders(n_train=63, n_val=25))
    shutdown()
