"""A metric-driven thaw and a checkpoint in the same validation, under FSDP2 (2 CPU processes, gloo, tiny BERT).

Usage: ``python sharded_monitor.py OUT_DIR``. ProgressiveUnfreezing thaws the next block whenever ``val_loss`` has
not improved by ``min_delta`` (so at every validation after the first), and ModelCheckpoint saves a distributed
checkpoint in every validation (every 4 steps). Every rank runs:

1. an uninterrupted fit of ``STEPS`` steps;
2. for each checkpoint saved in a validation that decided a thaw: a differently initialised model resumed from it
   (the strategy's strict distributed load of model and optimizer) to ``STEPS``;

and writes ``rank<r>.json`` with the events of every run, the checkpoints resumed from, and the tensors of the full
state dict that differ between each resumed run and the uninterrupted one.
"""

import glob
import os
import sys
import warnings

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import shutdown, write_rank_report  # noqa: E402
from hf_models import FIXTURES, TextModule  # noqa: E402
from models import trainer  # noqa: E402
from sharded import ShardInConfigureModel, full_state, make_strategy  # noqa: E402

from lightning_freeze import ProgressiveUnfreezing  # noqa: E402
from lightning_freeze.splitrun import ResumableDataLoader  # noqa: E402

STEPS, EVERY = 18, 4


class ShardedText(ShardInConfigureModel, TextModule):
    pass


def fit(out_dir, seed, ckpt_dir, ckpt_path=None):
    torch.manual_seed(seed)
    model = ShardedText(kind="bert", dropout=0.0)
    # min_delta larger than any change: every validation after the first is a plateau
    thaw = ProgressiveUnfreezing(every_n_epochs=None, monitor="val_loss", patience=1, min_delta=100.0)
    saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1, monitor=None)
    train = ResumableDataLoader(FIXTURES["bert"].data(64, 0), batch_size=4, shuffle=True, seed=1)
    val = DataLoader(FIXTURES["bert"].data(16, 1), batch_size=4)
    t = trainer(
        callbacks=[thaw, saver],
        max_steps=STEPS,
        max_epochs=-1,
        val_check_interval=EVERY,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        strategy=make_strategy("fsdp2", model.model),
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, thaw


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out_dir = sys.argv[1]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    t, thaw = fit(out_dir, seed=0, ckpt_dir=ckpt_dir)
    final = full_state(t)
    # a thaw decided in the validation at step s is applied at the start of step s + 1
    decided_at = sorted({event["step"] for event in thaw.events})
    resumed = {}
    for step in decided_at:
        (path,) = glob.glob(os.path.join(ckpt_dir, f"step={step}*.ckpt"))
        t2, thaw2 = fit(out_dir, seed=7, ckpt_dir=os.path.join(out_dir, f"resumed-{step}"), ckpt_path=path)
        state = full_state(t2)
        resumed[str(step)] = {
            "events": thaw2.events,
            "differs": [k for k in final if not torch.equal(final[k], state[k])],
        }
    write_rank_report(
        out_dir,
        {"rank": int(os.environ.get("LOCAL_RANK", 0)), "events": thaw.events, "resumed": resumed},
    )
    shutdown()
