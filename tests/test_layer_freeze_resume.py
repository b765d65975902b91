"""Resume with LayerFreeze is bit-exact: before the thaw, on it, after it, mid-epoch and at epoch ends."""

import pytest
import torch
from models import Net, loaders, snapshot, trainer
from resume import assert_same_weights, run_interrupted, run_uninterrupted

from lightning_freeze import LayerFreeze


def make_model():
    return Net("adamw", "cosine", dropout=0.0, total_steps=32)


@pytest.mark.parametrize("stop_at", [3, 8, 11, 16, 21])
def test_resume_until_step_is_bit_identical(stop_at, tmp_path):
    """8 steps per epoch; thaw at step 10 (mid-epoch 1). Stops before, at epoch ends, and after the thaw."""
    callbacks = lambda: [LayerFreeze("backbone.*", until_step=10, lr=0.01)]  # noqa: E731
    full, t_full = run_uninterrupted(make_model, callbacks, tmp_path, max_epochs=4)
    resumed, t_res = run_interrupted(make_model, callbacks, tmp_path, stop_at, max_epochs=4)
    assert_same_weights(full, resumed)
    assert t_res.global_step == t_full.global_step == 32
    names = [g["name"] for g in t_res.optimizers[0].param_groups]
    lrs = [g["lr"] for g in t_res.optimizers[0].param_groups]
    assert lrs == [g["lr"] for g in t_full.optimizers[0].param_groups] and names[-1] == "head"


@pytest.mark.parametrize("stop_at", [4, 13])
def test_resume_until_epoch_keeps_the_thaw(stop_at, tmp_path):
    """Lightning's BaseFinetuning loses the thaw on resume; here a run resumed after the thaw keeps it."""
    callbacks = lambda: [LayerFreeze("backbone.*", until_epoch=1)]  # noqa: E731
    full, _ = run_uninterrupted(make_model, callbacks, tmp_path, max_epochs=3)
    resumed, t_res = run_interrupted(make_model, callbacks, tmp_path, stop_at, max_epochs=3)
    assert_same_weights(full, resumed)
    engine_state = t_res.callbacks[0].state_dict()
    assert engine_state["frozen"] == []
    assert [e["step"] for e in engine_state["events"]] == [8, 8, 8]


def test_resume_with_other_layers_is_a_clear_error(tmp_path):
    import os

    import torch
    from models import trainer
    from resume import StopAt, data

    ckpt = os.path.join(tmp_path, "x.ckpt")
    torch.manual_seed(0)
    trainer(callbacks=[LayerFreeze("backbone.*"), StopAt(2, ckpt)], default_root_dir=tmp_path).fit(
        make_model(), *data()
    )
    t = trainer(callbacks=[LayerFreeze("backbone.[01]")], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="same `layers`"):
        t.fit(make_model(), *data(), ckpt_path=ckpt)


class SizedOneCycleNet(Net):
    """Sizes OneCycleLR from trainer.estimated_stepping_batches, as the Lightning docs suggest."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_resume_mid_epoch_when_configure_optimizers_reads_the_step_count(tmp_path):
    """Reading estimated_stepping_batches before the restore makes Lightning skip the loader's saved state;
    the callback applies it, so the resumed epoch continues where it stopped."""
    make = lambda: SizedOneCycleNet(dropout=0.0)  # noqa: E731
    callbacks = lambda: [LayerFreeze("backbone.*", until_step=6)]  # noqa: E731
    full, _ = run_uninterrupted(make, callbacks, tmp_path, max_epochs=2)
    resumed, _ = run_interrupted(make, callbacks, tmp_path, 11, max_epochs=2)
    assert_same_weights(full, resumed)


def test_a_checkpoint_saved_after_fit_continues_with_the_layers_still_frozen(tmp_path):
    """The model is handed back after fit, but the run's freeze state is not forgotten: training on from a
    checkpoint saved after fit keeps the backbone frozen."""
    torch.manual_seed(0)
    model = Net()
    first = trainer(callbacks=[LayerFreeze("backbone.*")], default_root_dir=tmp_path, max_epochs=1)
    first.fit(model, *loaders())
    assert all(p.requires_grad for p in model.parameters())  # handed back
    first.save_checkpoint(tmp_path / "after.ckpt")
    before = snapshot(model.backbone)
    more = trainer(callbacks=[LayerFreeze("backbone.*")], default_root_dir=tmp_path, max_epochs=2)
    more.fit(model, *loaders(), ckpt_path=str(tmp_path / "after.ckpt"))
    after = snapshot(model.backbone)
    assert more.global_step > first.global_step
    assert all(torch.equal(before[k], after[k]) for k in before)
