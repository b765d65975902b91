"""ProgressiveUnfreezing under DDP (2 CPU processes, gloo): metric-driven thaws in the middle of epochs.

Each rank logs its OWN validation score (no sync_dist): rank 0's plateaus after validations 2, 4 and 6,
rank 1's never does. The callback must decide on rank 0's value on every rank, thaw at the same step, and
all-reduce the newly thawed groups (a fresh DDP wrapper), so that the replicas end bit-identical
(Lightning's issue #20340 is replicas that diverge after a mid-run thaw). No find_unused_parameters.

Usage: python unfreezing_ddp.py OUT_DIR  -> writes OUT_DIR/rank0.json and OUT_DIR/rank1.json
"""

import hashlib
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from ddp import WrapperProbe, shutdown, write_rank_report  # noqa: E402
from models import Net, loaders, snapshot  # noqa: E402

from lightning_freeze import ProgressiveUnfreezing  # noqa: E402

SCRIPTS = {
    0: [1.0, 0.5, 0.6, 0.4, 0.45, 0.3, 0.35, 0.2, 0.1, 0.05, 0.01, 0.001],
    1: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01],
}


class PerRankScore(Net):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.n_val = 0

    def validation_step(self, batch, batch_idx):
        self.log("score", SCRIPTS[self.global_rank][self.n_val])

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.n_val += 1


def digest(tensors):
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out):
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = PerRankScore(dropout=0.1, scheduler="cosine", total_steps=24)
    initial = snapshot(model)
    cb = ProgressiveUnfreezing(
        ["backbone.*", "head"], monitor="score", patience=1, restore_best=True, warmup_steps=2
    )
    probe = WrapperProbe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=6,
        val_check_interval=0.5,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[cb, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    train, val = loaders(n_train=64, n_val=24, batch_size=8)
    trainer.fit(model, train, val)
    final = snapshot(model)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "steps_per_epoch": trainer.num_training_batches,
        "events": cb.events,
        "frozen": sorted(cb.engine.frozen),
        "digest": digest(final),
        "changed": {n: not torch.equal(initial[n], final[n]) for n in final if n.endswith("weight")},
        "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
        "ddp_params": probe.changes(),
    }
    write_rank_report(out, result)


if __name__ == "__main__":
    main(sys.argv[1])
    shutdown()
