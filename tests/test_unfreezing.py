"""ProgressiveUnfreezing on a real Trainer: thaw order, discriminative LRs, every torch scheduler across
thaws, warm-up around the optimizer step, metric-driven thaws with restore_best, clear errors at fit start."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from models import Net, loaders, snapshot, trainer

from lightning_freeze import ProgressiveUnfreezing
from lightning_freeze.engine.optim import SchedulerAdaptError, base_lr
from lightning_freeze.rules.thawing import PhaseError

LAYERS = ["backbone.*", "head"]
NAMES = ["backbone.0", "backbone.1", "backbone.2", "head"]


class Recorder(Callback):
    """Per optimizer step (seen after the freezing callback's hooks): LR and base LR of every named group."""

    def __init__(self):
        self.rows = []
        self.in_step = []  # the LR each group really had inside optimizer.step()

    def on_fit_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(
            lambda o, a, k: self.in_step.append({g["name"]: g["lr"] for g in o.param_groups})
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs]
        self.rows.append(
            {
                "step": trainer.global_step,
                "lr": {g["name"]: g["lr"] for g in opt.param_groups},
                "base": {g["name"]: base_lr(opt, scheds, i) for i, g in enumerate(opt.param_groups)},
                "trainable": {g["name"]: len(g["params"]) > 0 for g in opt.param_groups},
            }
        )


def fit(model, callbacks, tmp_path, loaders_=None, **kwargs):
    t = trainer(callbacks=callbacks, default_root_dir=tmp_path, **kwargs)
    t.fit(model, *(loaders_ or loaders()))
    return t


def test_head_first_then_top_down_with_discriminative_lrs_and_frozen_layers_untouched_until_thawed(tmp_path):
    torch.manual_seed(0)
    model = Net()
    before = snapshot(model.backbone[0])
    rec = Recorder()
    cb = ProgressiveUnfreezing(LAYERS, every_n_epochs=1, lr_decay=2.6, plot=True)
    t = fit(model, [cb, rec], tmp_path, max_epochs=3, log_every_n_steps=1, logger=True)
    # epoch 0: only the head; epoch 1: + backbone.2; epoch 2: + backbone.1; backbone.0 never thawed
    by_epoch = {0: rec.rows[0], 1: rec.rows[8], 2: rec.rows[16]}
    assert [n for n, on in by_epoch[0]["trainable"].items() if on] == ["head"]
    assert [n for n, on in by_epoch[1]["trainable"].items() if on] == ["backbone.2", "head"]
    assert [n for n, on in by_epoch[2]["trainable"].items() if on] == ["backbone.1", "backbone.2", "head"]
    assert [(e["epoch"], e["layer"], e["action"]) for e in cb.events] == [
        (1, "backbone.2", "thaw"),
        (2, "backbone.1", "thaw"),
    ]
    base = by_epoch[2]["base"]
    assert base["head"] == pytest.approx(0.05)
    assert base["backbone.2"] == pytest.approx(0.05 / 2.6)
    assert base["backbone.1"] == pytest.approx(0.05 / 2.6**2)
    # the never-thawed layer: weights and BN statistics bit-identical
    after = snapshot(model.backbone[0])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert t.callback_metrics["freeze/thawed_groups"] == 3
    timeline = json.loads((tmp_path / "lightning_logs" / "version_0" / "freeze_timeline.json").read_text())
    assert [e["layer"] for e in timeline["events"]] == ["backbone.2", "backbone.1"]


SCHEDULERS = [
    "step",
    "multistep",
    "exponential",
    "cosine",
    "warm_restarts",
    "lambda",
    "linear",
    "onecycle",
    "sequential",
    "plateau",
]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_applies_its_current_factor_to_groups_thawed_later(scheduler, tmp_path):
    """After a thaw, group LR / group base LR == head LR / head base LR at every later step."""
    torch.manual_seed(0)
    total = 24
    model = Net(scheduler=scheduler, total_steps=total)
    rec = Recorder()
    cb = ProgressiveUnfreezing(LAYERS, every_n_steps=5, groups_per_step=1, lr_decay=2.6)
    # plateau steps once per epoch on val_loss: short epochs so it gets a few chances to reduce
    fit(model, [cb, rec], tmp_path, max_steps=total, max_epochs=-1, limit_train_batches=4)
    thaw_step = {e["layer"]: e["step"] for e in cb.events}
    assert thaw_step == {"backbone.2": 5, "backbone.1": 10, "backbone.0": 15}
    checked = 0
    for row in rec.rows:
        head_factor = row["lr"]["head"] / row["base"]["head"]
        for name, step in thaw_step.items():
            if row["step"] >= step:
                assert row["trainable"][name]
                assert row["lr"][name] / row["base"][name] == pytest.approx(head_factor, rel=1e-9), (
                    name,
                    row,
                )
                checked += 1
        if row["step"] >= 5:
            assert row["base"]["backbone.2"] == pytest.approx(row["base"]["head"] / 2.6)
    assert checked > 30
    factors = {r["lr"]["head"] / r["base"]["head"] for r in rec.rows}
    if scheduler != "plateau":
        assert len(factors) > 2  # the schedule really moved while groups were thawing
    else:
        assert min(factors) < 1  # the plateau scheduler reduced at least once, and thawed groups followed


def test_warmup_scales_only_inside_the_optimizer_step(tmp_path):
    """Chainable schedulers compute from group['lr']: the warm-up must not leak into it."""
    torch.manual_seed(0)
    model = Net(scheduler="exponential")
    rec = Recorder()
    cb = ProgressiveUnfreezing(LAYERS, every_n_steps=4, warmup_steps=3)
    fit(model, [cb, rec], tmp_path, max_steps=16, max_epochs=-1)
    assert len(rec.in_step) == len(rec.rows) == 16
    for row, inside in zip(rec.rows, rec.in_step):
        step = row["step"]
        head_factor = row["lr"]["head"] / row["base"]["head"]
        assert inside["head"] == row["lr"]["head"]
        for name, thaw in (("backbone.2", 4), ("backbone.1", 8), ("backbone.0", 12)):
            if step < thaw:
                continue
            warm = min(1.0, (step - thaw + 1) / 3)
            # outside the step the group follows the schedule untouched; inside it is warmed up
            assert row["lr"][name] / row["base"][name] == pytest.approx(head_factor, rel=1e-12)
            assert inside[name] == pytest.approx(row["lr"][name] * warm, rel=1e-12)
            assert cb.warmup_factor(name, step) == pytest.approx(warm)


def test_lr_growth_reproduces_backbone_finetuning_lrs(tmp_path):
    from lightning.pytorch.callbacks import BackboneFinetuning

    class Filtered(Net):  # BackboneFinetuning needs the optimizer to hold only trainable parameters
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def backbone_lr_per_epoch(callback, group):
        lrs = []

        class Probe(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                groups = trainer.optimizers[0].param_groups
                thawed = pl_module.backbone[0][0].weight.requires_grad
                lrs.append(group(groups) if thawed else None)

        torch.manual_seed(0)
        fit(Filtered(), [callback, Probe()], tmp_path, max_epochs=7, limit_val_batches=0)
        return lrs

    theirs = backbone_lr_per_epoch(BackboneFinetuning(unfreeze_backbone_at_epoch=2), lambda gs: gs[-1]["lr"])
    ours = backbone_lr_per_epoch(
        ProgressiveUnfreezing(
            ["backbone", "head"],
            phases=[{"layers": "backbone", "at_epoch": 2, "lr_ratio": 0.1}],
            lr_growth=2.0,
            lr_decay=1.0,
            norm="train",
        ),
        lambda gs: gs[0]["lr"],
    )
    # Lightning's callback changes the LR in on_train_epoch_start too; read it at the next epoch's start
    assert ours[:2] == [None, None] and theirs[:2] == [None, None]
    assert ours[2:] == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.05])
    assert theirs[3:] == pytest.approx(ours[3:])


def test_metric_driven_thaws_with_restore_best(tmp_path):
    """val metric 1.0, 0.5, 0.6 -> plateau after epoch 2 -> restore epoch 1's weights, thaw at epoch 3."""
    scripted = [1.0, 0.5, 0.6, 0.7, 0.3, 0.2, 0.25, 0.9, 0.9]

    class Scripted(Net):
        def validation_step(self, batch, batch_idx):
            self.log("score", scripted[self.current_epoch])

    weights_after_val, weights_at_start = {}, {}

    class Probe(Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                weights_after_val[trainer.current_epoch] = snapshot(pl_module)

        def on_train_epoch_start(self, trainer, pl_module):
            weights_at_start[trainer.current_epoch] = snapshot(pl_module)

    torch.manual_seed(0)
    model = Scripted(dropout=0.0)
    cb = ProgressiveUnfreezing(LAYERS, monitor="score", patience=1, restore_best=True)
    fit(model, [cb, Probe()], tmp_path, max_epochs=9, limit_val_batches=1)
    thaws = [(e["epoch"], e["layer"]) for e in cb.events]
    # phase 1 (head): best 0.5 at epoch 1, plateau at epoch 2 -> thaw at epoch 3 from epoch 1's weights
    # phase 2: 0.7 (first), 0.3, 0.2, 0.25 plateau at epoch 6 -> thaw at 7 from epoch 5's weights
    # phase 3: 0.9 (first), 0.9 plateau at epoch 8 -> thaw pending when the fit ends
    assert thaws == [(3, "backbone.2"), (7, "backbone.1")]
    for epoch, best in ((3, 1), (7, 5)):
        assert all(
            torch.equal(weights_at_start[epoch][k], weights_after_val[best][k])
            for k in weights_at_start[epoch]
        )
        assert "restored the phase's best weights" in next(
            e["reason"] for e in cb.events if e["epoch"] == epoch
        )
    assert cb._pending == [2]


def test_missing_monitor_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="monitor='val_acc' was not logged"):
        fit(Net(), [ProgressiveUnfreezing(LAYERS, monitor="val_acc")], tmp_path, max_epochs=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"phases": [{"layers": "backbone.*", "at_epoch": 1}, {"layers": "backbone.2", "at_epoch": 2}]},
            "disjoint",
        ),
        (
            {"phases": [{"layers": "encoder", "at_epoch": 1}]},
            "phase 0: 'encoder' matches no parameter-owning module",
        ),
        ({"phases": [{"layers": ["backbone", "head"], "at_epoch": 1}]}, "nothing would train"),
    ],
)
def test_bad_phases_fail_at_fit_start_before_any_step(kwargs, match, tmp_path):
    model = Net()
    with pytest.raises(PhaseError, match=match):
        fit(model, [ProgressiveUnfreezing(LAYERS, **kwargs)], tmp_path, max_epochs=1)
    assert model.losses == []


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="restore_best=True needs monitor"):
        ProgressiveUnfreezing(restore_best=True)
    with pytest.raises(ValueError, match="lr_decay"):
        ProgressiveUnfreezing(lr_decay=0)
    with pytest.raises(PhaseError, match="mode"):
        ProgressiveUnfreezing(monitor="val_loss", mode="lowest")


def test_scheduler_that_cannot_be_adapted_is_a_clear_error_at_fit_start(tmp_path):
    class PerGroupWarmup(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer):
            self.warm = [3] * len(optimizer.param_groups)  # per-group state we cannot know how to split
            super().__init__(optimizer)

        def get_lr(self):
            return [base * min(1, (self.last_epoch + 1) / w) for base, w in zip(self.base_lrs, self.warm)]

    class Custom(Net):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": PerGroupWarmup(opt)}

    model = Custom()
    with pytest.raises(
        SchedulerAdaptError, match="PerGroupWarmup keeps per-param-group state in \\['warm'\\]"
    ):
        fit(model, [ProgressiveUnfreezing(LAYERS)], tmp_path, max_epochs=1)
    assert model.losses == []


def test_timeline_png_shows_the_thaws(tmp_path):
    torch.manual_seed(0)
    fit(
        Net(scheduler="cosine", total_steps=32),
        [ProgressiveUnfreezing(LAYERS, every_n_steps=8, warmup_steps=4, plot=True)],
        tmp_path,
        max_epochs=4,
        limit_val_batches=0,
    )
    data = json.loads((tmp_path / "freeze_timeline.json").read_text())
    assert [(e["step"], e["layer"]) for e in data["events"]] == [
        (8, "backbone.2"),
        (16, "backbone.1"),
        (24, "backbone.0"),
    ]
    lr = data["history"]["lr"]
    assert lr["backbone.0"][0] is None and lr["backbone.0"][-1] is not None
    assert (tmp_path / "freeze_timeline.png").stat().st_size > 10_000
