"""2-process DDP on CPU (gloo): AdaptiveFreeze decides on rank 0 from all-reduced gradients and every rank
freezes alike. Run as ``python adaptive_ddp.py OUT_DIR``; each rank writes ``rank<r>.json``."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import WrapperProbe, shutdown, write_rank_report  # noqa: E402
from models import Net, loaders, trainer  # noqa: E402

from lightning_freeze import AdaptiveFreeze  # noqa: E402

if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = Net("adam", dropout=0.1)
    adaptive = AdaptiveFreeze(check_every_n_steps=2, percentile=90, min_steps=2)
    probe = WrapperProbe()
    t = trainer(
        callbacks=[adaptive, probe],
        max_epochs=4,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, *loaders(n_train=64, n_val=24))
    write_rank_report(
        out_dir,
        {
            "rank": t.global_rank,
            "replicas_equal": probe.replicas_equal,
            "events": adaptive.events,
            "ddp_params": probe.steps,
        },
    )
    shutdown()
