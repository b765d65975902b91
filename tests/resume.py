"""Stop-and-resume harness shared by the resume tests of every callback.

``run_uninterrupted`` and ``run_interrupted`` build the model, data and callbacks from the same factory;
the interrupted run saves a checkpoint after optimizer step ``stop_at`` and ends there, then a fresh
Trainer and a freshly initialised model resume from it. Data comes from a ResumableDataLoader, so the
resumed run sees the same batches (also mid-epoch). No ``ExactResume`` is added here: the freezing callbacks
add it themselves, and the tests rely on that.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from models import loaders, make_data, trainer

from lightning_freeze.splitrun import ResumableDataLoader


class StopAt(pl.Callback):
    """Save a checkpoint after optimizer step ``step`` and stop the run right there."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True  # what follows in this run is discarded; only the checkpoint counts


def data():
    train = ResumableDataLoader(make_data(64, 0), batch_size=8, shuffle=True, seed=3)
    return train, loaders()[1]


def final_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_uninterrupted(make_model: Callable, make_callbacks: Callable, tmp_path, **trainer_kwargs):
    torch.manual_seed(0)
    model = make_model()
    t = trainer(callbacks=make_callbacks(), default_root_dir=os.path.join(tmp_path, "full"), **trainer_kwargs)
    t.fit(model, *data())
    return final_state(model), t


def run_interrupted(make_model: Callable, make_callbacks: Callable, tmp_path, stop_at: int, **trainer_kwargs):
    ckpt = os.path.join(tmp_path, f"stop{stop_at}.ckpt")
    torch.manual_seed(0)
    first = make_model()
    t1 = trainer(
        callbacks=make_callbacks() + [StopAt(stop_at, ckpt)],
        default_root_dir=os.path.join(tmp_path, "a"),
        **trainer_kwargs,
    )
    t1.fit(first, *data())
    assert os.path.exists(ckpt) and t1.global_step == stop_at
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = make_model()
    t2 = trainer(callbacks=make_callbacks(), default_root_dir=os.path.join(tmp_path, "b"), **trainer_kwargs)
    t2.fit(model, *data(), ckpt_path=ckpt)
    return final_state(model), t2


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical after resume: {different}"
