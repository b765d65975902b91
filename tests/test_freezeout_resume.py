"""FreezeOut resume: stop at any step, resume from the checkpoint, end with bit-identical weights (CPU).

One uninterrupted run saves checkpoints at the stop steps (saving does not change the run); each is then
resumed by a fresh Trainer with a freshly, *differently* initialised model, so everything that matters
must come from the checkpoint: weights, optimizer state, frozen set, LR schedule and the data position
(ResumableDataLoader, shuffled, so mid-epoch resumes see exactly the batches the full run saw).
"""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import Net, trainer
from resume import assert_same_weights, data, final_state

from lightning_freeze import FreezeOut


class SaveAt(Callback):
    """``trainer.save_checkpoint`` after the given optimizer steps (listed last: runs after the others)."""

    def __init__(self, dirpath, steps):
        self.dirpath, self.steps = dirpath, set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.dirpath / f"step={trainer.global_step}.ckpt")


def run(root, optimizer, seed=0, ckpt_path=None, save_at=()):
    torch.manual_seed(seed)
    model = Net(optimizer=optimizer, dropout=0.0)
    cb = FreezeOut(layers="backbone.*", t0=0.5, schedule="linear")  # 3 x 8 = 24 steps: freezes at 12, 16, 20
    tr = trainer(max_epochs=3, callbacks=[cb, SaveAt(root, save_at)], default_root_dir=root)
    tr.fit(model, *data(), ckpt_path=ckpt_path)
    return final_state(model), cb, tr


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_at_any_step_is_bit_identical(tmp_path, optimizer):
    # before the first freeze (8, epoch end), between freezes (13 mid-epoch, 16 epoch end), after the last
    # (21, mid-epoch); 8 steps per epoch
    stops = [8, 13, 21] if optimizer == "sgd" else [16]
    full, cb_full, _ = run(tmp_path, optimizer, save_at=stops)
    assert [e["step"] for e in cb_full.events] == [12, 16, 20]
    for stop in stops:
        resumed, cb, tr = run(
            tmp_path / f"resume{stop}", optimizer, seed=123, ckpt_path=str(tmp_path / f"step={stop}.ckpt")
        )
        assert tr.global_step == 24
        assert_same_weights(full, resumed)
        assert cb.events == cb_full.events
        assert cb.history == cb_full.history
        assert cb.layer_times() == cb_full.layer_times() and cb.total_steps == 24
