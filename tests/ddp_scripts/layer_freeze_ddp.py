"""2-process DDP on CPU (gloo): LayerFreeze thaws mid-run; report what each rank ends with.

Run as ``python layer_freeze_ddp.py OUT_DIR``; Lightning's launcher starts rank 1 by re-running this
script. Each rank writes ``rank<r>.json``.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import WrapperProbe, shutdown, write_rank_report  # noqa: E402
from models import Net, loaders, trainer  # noqa: E402

from lightning_freeze import LayerFreeze  # noqa: E402

if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = Net("adam", "step", dropout=0.2)
    freeze, probe = LayerFreeze("backbone.*", until_step=5), WrapperProbe()
    t = trainer(
        callbacks=[freeze, probe],
        max_epochs=3,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, *loaders(n_train=63, n_val=25))
    write_rank_report(
        out_dir,
        {
            "rank": t.global_rank,
            "world_size": t.world_size,
            "replicas_equal": probe.replicas_equal,
            "events": freeze.events,
            "ddp_params": probe.steps,
            "groups": [[g["name"], len(g["params"])] for g in t.optimizers[0].param_groups],
        },
    )
    shutdown()
