"""Resume: a run stopped at an epoch end or mid-epoch, mid-phase or at a phase boundary, and resumed from its
checkpoint ends with weights, LRs and scheduler state bit-identical to the uninterrupted run.

(Lightning's BackboneFinetuning leaves the backbone frozen after a resume, their issue #21901; these runs
resume after a thaw and must keep training the thawed layers exactly as before.)
"""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import Net, loaders, make_data, snapshot, trainer
from torch.utils.data import DataLoader

from lightning_freeze import ExactResume, ProgressiveUnfreezing
from lightning_freeze.splitrun import ResumableDataLoader

LAYERS = ["backbone.*", "head"]


class Scripted(Net):
    """val metric 'score' follows a script indexed by the validation run, so plateaus are known in advance."""

    script = [1.0, 0.5, 0.6, 0.4, 0.45, 0.3, 0.2, 0.25, 0.1]

    def validation_step(self, batch, batch_idx):
        self.log("score", self.script[self.current_epoch])


def run(
    tmp_path, name, make_callback, model_cls=Net, ckpt_path=None, loaders_fn=loaders, ckpt_kwargs=None, **kw
):
    torch.manual_seed(0)
    model = model_cls(
        dropout=0.0, scheduler=kw.pop("scheduler", "cosine"), total_steps=kw.pop("total_steps", 56)
    )
    callbacks = [make_callback(), ExactResume()]
    if ckpt_kwargs is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **ckpt_kwargs))
    t = trainer(
        callbacks=callbacks,
        default_root_dir=tmp_path / name,
        enable_checkpointing=ckpt_kwargs is not None,
        **kw,
    )
    t.fit(model, *loaders_fn(), ckpt_path=ckpt_path)
    return model, t, callbacks[0]


def assert_same_end_state(a, b):
    (ma, ta, ca), (mb, tb, cb) = a, b
    sa, sb = snapshot(ma), snapshot(mb)
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"not bit-identical: {diff}"
    ga, gb = ta.optimizers[0].param_groups, tb.optimizers[0].param_groups
    assert [(g["name"], g["lr"], len(g["params"])) for g in ga] == [
        (g["name"], g["lr"], len(g["params"])) for g in gb
    ]
    if ta.lr_scheduler_configs:
        assert (
            ta.lr_scheduler_configs[0].scheduler.state_dict()
            == tb.lr_scheduler_configs[0].scheduler.state_dict()
        )
    assert ca.events == cb.events
    assert ca.engine.frozen == cb.engine.frozen


def test_epoch_end_resume_mid_phase_and_at_phase_boundary(tmp_path):
    def make():
        return ProgressiveUnfreezing(LAYERS, every_n_epochs=2, warmup_steps=3)

    full = run(
        tmp_path,
        "full",
        make,
        max_epochs=7,
        ckpt_kwargs={"every_n_epochs": 1, "filename": "{epoch}"},
        limit_val_batches=0,
    )
    assert [e["epoch"] for e in full[2].events] == [2, 4, 6]
    # epoch=1.ckpt: the next epoch thaws (boundary); epoch=2.ckpt: backbone.2 thawed one epoch ago (mid-phase)
    for ckpt in ("epoch=1.ckpt", "epoch=2.ckpt"):
        resumed = run(
            tmp_path, ckpt, make, ckpt_path=tmp_path / "ckpt" / ckpt, max_epochs=7, limit_val_batches=0
        )
        assert_same_end_state(full, resumed)


def test_resume_keeps_a_pending_metric_driven_thaw_and_the_best_weights(tmp_path):
    def make():
        return ProgressiveUnfreezing(LAYERS, monitor="score", patience=1, restore_best=True)

    kw = dict(model_cls=Scripted, max_epochs=8, limit_val_batches=1, scheduler="step")
    full = run(tmp_path, "full", make, ckpt_kwargs={"every_n_epochs": 1, "filename": "{epoch}"}, **kw)
    # plateau at epoch 2 (0.6 after 0.5) -> thaw at 3; plateau at 4 -> thaw at 5; 7 -> pending at the end
    assert [e["epoch"] for e in full[2].events] == [3, 5]
    # epoch=2.ckpt holds a decided-but-not-applied thaw and the best weights of epoch 1
    resumed = run(tmp_path, "resumed", make, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt", **kw)
    assert_same_end_state(full, resumed)


def resumable_loaders():
    return (
        ResumableDataLoader(make_data(64, 0), batch_size=8, shuffle=True, seed=0),
        DataLoader(make_data(24, 1), batch_size=8),
    )


@pytest.mark.parametrize("ckpt", ["step=9.ckpt", "step=12.ckpt"])
def test_mid_epoch_resume_with_a_resumable_loader(ckpt, tmp_path):
    """Thaws every 6 steps (8 steps per epoch): step 9 is mid-phase and mid-warm-up, step 12 a phase boundary;
    both are mid-epoch."""

    def make():
        return ProgressiveUnfreezing(LAYERS, every_n_steps=6, warmup_steps=5)  # step 9 is mid-warm-up

    kw = dict(
        max_steps=24,
        max_epochs=-1,
        limit_val_batches=0,
        loaders_fn=resumable_loaders,
        total_steps=24,
        scheduler="exponential",
    )
    full = run(tmp_path, "full", make, ckpt_kwargs={"every_n_train_steps": 3, "filename": "{step}"}, **kw)
    assert [e["step"] for e in full[2].events] == [6, 12, 18]
    resumed = run(tmp_path, ckpt, make, ckpt_path=tmp_path / "ckpt" / ckpt, **kw)
    assert_same_end_state(full, resumed)


def test_resume_with_a_different_plan_is_a_clear_error(tmp_path):
    run(
        tmp_path,
        "full",
        lambda: ProgressiveUnfreezing(LAYERS, every_n_epochs=1),
        max_epochs=2,
        ckpt_kwargs={"every_n_epochs": 1, "filename": "{epoch}"},
        limit_val_batches=0,
    )
    with pytest.raises(ValueError, match="thaw schedule"):
        run(
            tmp_path,
            "other",
            lambda: ProgressiveUnfreezing(LAYERS, every_n_epochs=2),
            max_epochs=3,
            ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt",
            limit_val_batches=0,
        )


def test_thaw_survives_resume_where_lightning_backbone_finetuning_loses_it(tmp_path):
    """Thaw at epoch 1, checkpoint after epoch 1, resume: Lightning's BackboneFinetuning trains on with the
    backbone still frozen (requires_grad False); ours keeps it thawed."""
    from lightning.pytorch.callbacks import BackboneFinetuning, Callback

    class Filtered(Net):
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def backbone_trains_after_resume(make_callback, name):
        seen = []

        class Probe(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                seen.append(pl_module.backbone[0][0].weight.requires_grad)

        kw = dict(limit_val_batches=0, model_cls=Filtered)
        run(
            tmp_path / name,
            "full",
            make_callback,
            max_epochs=2,
            ckpt_kwargs={"every_n_epochs": 1, "filename": "{epoch}"},
            **kw,
        )
        torch.manual_seed(0)
        model = Filtered(dropout=0.0)
        t = trainer(
            callbacks=[make_callback(), Probe()],
            default_root_dir=tmp_path / name / "resumed",
            max_epochs=3,
            limit_val_batches=0,
        )
        t.fit(model, *loaders(), ckpt_path=tmp_path / name / "ckpt" / "epoch=1.ckpt")
        return seen

    assert backbone_trains_after_resume(
        lambda: BackboneFinetuning(unfreeze_backbone_at_epoch=1), "theirs"
    ) == [False]
    ours = lambda: ProgressiveUnfreezing(["backbone", "head"], phases=[{"layers": "backbone", "at_epoch": 1}])  # noqa: E731
    assert backbone_trains_after_resume(ours, "ours") == [True]
