"""2-process DDP on CPU (gloo) with a third-party model: FreezeOut's default ``auto`` layers, and exact resume.

Run as ``python real_models_ddp.py OUT_DIR KIND``. Every rank runs, in order:

1. an uninterrupted fit with FreezeOut (default layers="auto", model dropout 0.1);
2. the same fit stopped (checkpoint saved) after optimizer step ``STOP``, mid-epoch;
3. a fresh, differently initialised model resumed from that checkpoint;

and writes ``rank<r>.json``: whether the replicas are identical after 1 and 3, the freeze events, how many
parameters the live DDP wrapper all-reduced at each step of run 1, and which tensors differ between the
uninterrupted and the resumed run.
"""

import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import WrapperProbe, shutdown, write_rank_report  # noqa: E402
from hf_models import FIXTURES  # noqa: E402
from models import trainer  # noqa: E402

from lightning_freeze import ExactResume, FreezeOut  # noqa: E402
from lightning_freeze.splitrun import ResumableDataLoader  # noqa: E402

STOP = 5  # 4 batches per rank and epoch: mid-epoch


class StopAt(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == STOP:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(kind, out_dir, seed, extra=(), ckpt_path=None):
    fixture = FIXTURES[kind]
    torch.manual_seed(seed)
    model = fixture.model(dropout=0.1)
    freezeout, probe = FreezeOut(t0=0.5), WrapperProbe()
    train = ResumableDataLoader(fixture.data(64, 0), batch_size=8, shuffle=True, seed=1)
    t = trainer(
        callbacks=[freezeout, ExactResume(), probe, *extra],
        max_epochs=3,
        strategy="ddp",
        devices=2,
        default_root_dir=out_dir,
        deterministic=False,
    )
    t.fit(model, train, ckpt_path=ckpt_path)
    return model, freezeout, probe, t


if __name__ == "__main__":
    out_dir, kind = sys.argv[1], sys.argv[2]
    full, freezeout, probe, t = fit(kind, out_dir, seed=0)
    ckpt = os.path.join(out_dir, "stop.ckpt")
    fit(kind, out_dir, seed=0, extra=[StopAt(ckpt)])
    resumed, _, resumed_probe, _ = fit(kind, out_dir, seed=7, ckpt_path=ckpt)
    a, b = full.state_dict(), resumed.state_dict()
    result = {
        "rank": t.global_rank,
        "layers": [layer.name for layer in freezeout.layers],
        "events": freezeout.events,
        "ddp_params": probe.steps,
        "replicas_equal": probe.replicas_equal and resumed_probe.replicas_equal,
        "resume_differs": [k for k in a if not torch.equal(a[k], b[k])],
        "tensors": len(a),
    }
    write_rank_report(out_dir, result)
    shutdown()
