"""LayerFreeze on a real Trainer: bit-identical frozen weights and statistics, modes, param groups, thaw."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from models import AtTrainEnd, Net, loaders, snapshot, trainer

from lightning_freeze import LayerFreeze
from lightning_freeze.engine.optim import SchedulerAdaptError


def fit(model, callback, tmp_path, **kwargs):
    t = trainer(callbacks=[callback], default_root_dir=tmp_path, **kwargs)
    t.fit(model, *loaders())
    return t


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_frozen_layers_stay_bit_identical_and_the_rest_trains(optimizer, tmp_path):
    torch.manual_seed(0)
    model = Net(optimizer)
    before_backbone, before_head = snapshot(model.backbone), snapshot(model.head)
    probe = AtTrainEnd()
    t = trainer(callbacks=[LayerFreeze("backbone.*"), probe], default_root_dir=tmp_path)
    t.fit(model, *loaders())
    after = snapshot(model.backbone)
    # Weights, biases, BN running stats and num_batches_tracked: all bit for bit.
    assert before_backbone.keys() == after.keys()
    assert all(torch.equal(before_backbone[k], after[k]) for k in after)
    assert any(not torch.equal(before_head[k], v) for k, v in snapshot(model.head).items())
    opt = t.optimizers[0]
    assert [g["name"] for g in opt.param_groups] == ["backbone.0", "backbone.1", "backbone.2", "head"]
    assert probe.frozen("backbone.") and not probe.frozen("head.")
    assert all(len(g["params"]) == 0 for g in opt.param_groups[:3])
    # after fit the model is handed back as it was given: everything trainable again
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_modules_stay_in_eval_through_validation_without_lightning_warning(tmp_path):
    torch.manual_seed(0)
    model = Net(dropout=0.5)
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, a: None)
    model.backbone[0][3].register_forward_hook(
        lambda m, a, out: seen.append((m.training, torch.equal(a[0], out)))
    )
    model.backbone[0][1].register_forward_hook(lambda m, a, out: seen.append((m.training, None)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, LayerFreeze("backbone.*"), tmp_path, max_epochs=2, limit_val_batches=2)
    assert not [w for w in caught if "eval mode" in str(w.message)]
    # Every call of the frozen dropout and BN ran in eval mode; dropout was the identity.
    assert seen and all(training is False for training, _ in seen)
    assert all(same for _, same in seen if same is not None)
    assert model.head.training


def test_norm_train_keeps_norm_layers_training_like_fastai(tmp_path):
    torch.manual_seed(0)
    model = Net()
    bn = model.backbone[0][1]
    linear_before = model.backbone[0][0].weight.detach().clone()
    stats_before = bn.running_mean.clone()
    bn_weight_before = bn.weight.detach().clone()
    t = fit(model, LayerFreeze("backbone.*", norm="train"), tmp_path, max_epochs=1)
    assert torch.equal(model.backbone[0][0].weight, linear_before)
    assert not torch.equal(bn.running_mean, stats_before)
    assert not torch.equal(bn.weight.detach(), bn_weight_before)
    assert bn.weight in t.optimizers[0].param_groups[0]["params"]


def test_user_frozen_parameter_is_never_thawed(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.backbone[1][0].bias.requires_grad_(False)
    kept = model.backbone[1][0].bias.detach().clone()
    fit(model, LayerFreeze("backbone.*", until_step=2), tmp_path, max_epochs=1)
    assert not model.backbone[1][0].bias.requires_grad
    assert torch.equal(model.backbone[1][0].bias, kept)
    assert model.backbone[1][0].weight.requires_grad


class FilteringNet(Net):
    """configure_optimizers that only hands trainable parameters to the optimizer."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def test_thaw_adds_parameters_the_optimizer_never_had(tmp_path):
    torch.manual_seed(0)
    model = FilteringNet()
    before = snapshot(model.backbone)
    t = fit(model, LayerFreeze("backbone.*", until_epoch=1, lr=0.01), tmp_path, max_epochs=2)
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    assert groups["backbone.0"]["lr"] == pytest.approx(0.01) and groups["head"]["lr"] == pytest.approx(0.05)
    assert len(groups["backbone.0"]["params"]) == 4
    assert any(not torch.equal(before[k], v) for k, v in snapshot(model.backbone).items())


@pytest.mark.parametrize("when", [{"until_epoch": 1}, {"until_step": 5}])
@pytest.mark.parametrize("scheduler", ["step", "onecycle", "plateau"])
def test_thaw_with_scheduler_follows_the_schedule(scheduler, when, tmp_path):
    """After the thaw each backbone group keeps the head's schedule factor, scaled to its own base LR."""
    torch.manual_seed(0)
    model = Net("sgd", scheduler, lr=0.05, total_steps=24)
    lrs = []

    class Record(torch.nn.Module):
        pass

    import lightning.pytorch as pl

    class RecordLRs(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    t = trainer(
        callbacks=[LayerFreeze("backbone.*", lr=0.01, **when), RecordLRs()],
        default_root_dir=tmp_path,
        max_epochs=3,
    )
    t.fit(model, *loaders())
    after_thaw = lrs[-8:]
    for row in after_thaw:
        assert row["backbone.0"] == pytest.approx(row["head"] * 0.01 / 0.05, rel=1e-9)
    if scheduler != "plateau":
        assert len({round(r["head"], 12) for r in lrs}) > 3, "the schedule should move"
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Custom(torch.optim.lr_scheduler.LRScheduler):
    """A user scheduler with per-group state the callbacks cannot know about."""

    def __init__(self, optimizer):
        self.per_group_floor = [1e-4 for _ in optimizer.param_groups]
        super().__init__(optimizer)

    def get_lr(self):
        return [max(g["lr"] * 0.9, f) for g, f in zip(self.optimizer.param_groups, self.per_group_floor)]


class CustomSchedulerNet(Net):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        return {"optimizer": opt, "lr_scheduler": Custom(opt)}


def test_unadaptable_scheduler_fails_at_fit_start(tmp_path):
    model = CustomSchedulerNet()
    t = trainer(callbacks=[LayerFreeze("backbone.*", until_epoch=1)], default_root_dir=tmp_path)
    with pytest.raises(SchedulerAdaptError, match="per_group_floor"):
        t.fit(model, *loaders())
    assert t.global_step == 0


def test_bad_arguments_fail_before_training():
    with pytest.raises(ValueError, match="until_epoch"):
        LayerFreeze(until_epoch=-1)
    with pytest.raises(ValueError, match="not both"):
        LayerFreeze(until_epoch=1, until_step=3)
    with pytest.raises(ValueError, match="norm"):
        LayerFreeze(norm="frozen")
    with pytest.raises(ValueError, match="lr"):
        LayerFreeze(lr=0)


def test_spec_that_matches_nothing_fails_at_setup(tmp_path):
    t = trainer(callbacks=[LayerFreeze("encoder.*")], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="closest|Closest"):
        t.fit(Net(), *loaders())


def test_timeline_and_trainable_fraction_are_written(tmp_path):

    torch.manual_seed(0)
    t = trainer(
        callbacks=[LayerFreeze("backbone.*", until_step=4, plot=True)],
        logger=CSVLogger(tmp_path),
        max_epochs=1,
        log_every_n_steps=1,
    )
    t.fit(Net(), *loaders())
    import csv
    import json
    import os

    data = json.load(open(os.path.join(t.log_dir, "freeze_timeline.json")))
    assert [e["action"] for e in data["events"]] == ["thaw"] * 3 and data["events"][0]["step"] == 4
    assert os.path.getsize(os.path.join(t.log_dir, "freeze_timeline.png")) > 1000
    rows = list(csv.DictReader(open(os.path.join(t.log_dir, "metrics.csv"))))
    fractions = [float(r["freeze/trainable_fraction"]) for r in rows if r.get("freeze/trainable_fraction")]
    assert fractions[0] < 0.2 and fractions[-1] == 1.0


def test_no_file_is_written_unless_plot_is_asked(tmp_path):

    fit(Net(), LayerFreeze("backbone.*"), tmp_path, max_epochs=1, logger=CSVLogger(tmp_path))
    assert not list(tmp_path.rglob("freeze_timeline.*"))


class ImageLogger(CSVLogger):
    """A CSV logger with the image API of WandbLogger (``log_image(key, images, step)``), as a user may write."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images = []

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def test_timeline_goes_to_every_logger_folder_and_every_logger_that_takes_images(tmp_path):

    csv_logger = CSVLogger(tmp_path, name="csv")
    image_logger = ImageLogger(tmp_path, name="images")
    t = fit(
        Net(),
        LayerFreeze("backbone.*", plot=True),
        tmp_path,
        max_epochs=1,
        logger=[csv_logger, image_logger],
    )
    for folder in (csv_logger.log_dir, image_logger.log_dir):
        assert os.path.getsize(os.path.join(folder, "freeze_timeline.png")) > 1000
        assert json.load(open(os.path.join(folder, "freeze_timeline.json")))["callback"] == "LayerFreeze"
    [(key, [image], step)] = image_logger.images
    assert key == "freeze_timeline" and step == t.global_step
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


def test_whole_fit_timeline_plots_the_lr_of_what_trains(tmp_path):
    callback = LayerFreeze("backbone.*", plot=True)
    fit(Net(), callback, tmp_path, max_epochs=1)
    # The frozen layers have no LR; the head's group (outside the managed layers) fills the LR panel.
    assert all(
        v is None for name in ("backbone.0", "backbone.1", "backbone.2") for v in callback.history.lr[name]
    )
    assert callback.history.lr["head"] and all(v == 0.05 for v in callback.history.lr["head"])
    data = json.load(open(tmp_path / "freeze_timeline.json"))
    assert data["history"]["lr"]["head"] == callback.history.lr["head"]


def test_timeline_without_any_lr_has_no_empty_panel():
    from lightning_freeze.callbacks.timeline import timeline_figure

    data = {"layers": ["a", "b"], "initially_frozen": ["a", "b"], "end_step": 10, "events": []}
    only_frozen = timeline_figure({**data, "history": {"step": [0, 10], "lr": {"a": [None, None]}}})
    with_lr = timeline_figure(
        {**data, "history": {"step": [0, 10], "lr": {"a": [None, None], "head": [0.1, 0.1]}}}
    )
    assert len(only_frozen.axes) == 1 and len(with_lr.axes) == 2


def test_two_layer_freezes_in_one_trainer_get_our_message_naming_the_fix(tmp_path):
    callbacks = [LayerFreeze("backbone.0"), LayerFreeze("backbone.1")]
    with pytest.raises(ValueError) as err:
        trainer(callbacks=callbacks, default_root_dir=tmp_path).fit(Net(), *loaders())
    message = str(err.value)
    assert "2 LayerFreeze callbacks in one Trainer" in message
    assert "LayerFreeze(layers=['backbone.0', 'backbone.1']" in message


def test_a_thaw_after_the_fit_warns_with_a_warning_category(tmp_path):
    from lightning_freeze.validation import FreezeWarning

    with pytest.warns(FreezeWarning, match="until_epoch|the layers thaw at epoch 5"):
        fit(Net(), LayerFreeze("backbone.*", until_epoch=5), tmp_path, max_epochs=1)
