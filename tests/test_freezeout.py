"""FreezeOut with a real Trainer: per-step LRs, freeze steps, training length, backward pass, logging, errors."""

import csv
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from models import AtTrainEnd, Net, loaders, trainer
from torch import nn

from lightning_freeze import FreezeOut
from lightning_freeze.engine.layers import LayerSpecError

BACKBONE = ["backbone.0", "backbone.1", "backbone.2"]


def expected_lr(base, t_i, t, scale=True):
    if t_i < 1 and t >= t_i:
        return 0.0
    return (base / t_i if scale else base) * 0.5 * (1 + math.cos(math.pi * t / t_i))


class Recorder(Callback):
    """What the optimizer really uses at each step, and each backbone block's weights after each step."""

    def __init__(self):
        self.lrs, self.steps, self.weights, self.trainable = [], [], {}, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(trainer.global_step)
        self.lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        self.trainable.append({g["name"]: len(g["params"]) for g in optimizer.param_groups})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights[trainer.global_step] = {
            n: {k: v.detach().clone() for k, v in pl_module.backbone[i].state_dict().items()}
            for i, n in enumerate(BACKBONE)
        }


def fit(callbacks, model=None, n_train=64, batch_size=8, **kw):
    model = model or Net()
    train, val = loaders(n_train=n_train, batch_size=batch_size)
    tr = trainer(callbacks=callbacks, **kw)
    tr.fit(model, train, val)
    return model, tr


def test_lrs_and_freezes_follow_the_schedule(tmp_path):
    # layers = backbone.0-2; the head lies outside them, so it is the last group (t = 1)
    cb, rec = FreezeOut(layers="backbone.*", t0=0.5, schedule="linear"), Recorder()
    probe = AtTrainEnd()
    model, tr = fit(
        [cb, rec, probe], default_root_dir=tmp_path
    )  # SGD(lr=0.05, momentum, wd), 8 batches x 2 epochs
    assert cb.total_steps == 16 and rec.steps == list(range(16))
    times = {"backbone.0": 0.5, "backbone.1": 2 / 3, "backbone.2": 5 / 6, "head": 1.0}
    assert cb.layer_times() == pytest.approx({k: v for k, v in times.items() if k != "head"})
    for step, lrs in zip(rec.steps, rec.lrs, strict=True):
        for name, t_i in times.items():
            assert lrs[name] == pytest.approx(expected_lr(0.05, t_i, step / 16), rel=1e-12, abs=1e-15), (
                step,
                name,
            )
    # freeze at the first step with step / 16 >= t_i: 8, ceil(10.67) = 11, ceil(13.33) = 14
    events = [(e["layer"], e["step"]) for e in cb.events]
    assert events == [("backbone.0", 8), ("backbone.1", 11), ("backbone.2", 14)]
    assert cb.freeze_steps() == {"backbone.0": 8, "backbone.1": 11, "backbone.2": 14}
    for name, step in events:
        assert all(t[name] == 0 for t in rec.trainable[step:]) and all(
            t[name] > 0 for t in rec.trainable[:step]
        )
        # weights *and* BN statistics stay bit-identical from the freeze on (SGD momentum + weight decay)
        for later in range(step, 17):
            for key, value in rec.weights[step][name].items():
                assert torch.equal(value, rec.weights[later][name][key]), (name, key, later)
    assert probe.frozen("backbone.") and not probe.frozen("head.")
    # the head's LR reaches zero exactly at t = 1 (after the last step)
    assert cb.history.lr["backbone.0"][0] == pytest.approx(0.1)  # step 0: base / t_0 = 0.05 / 0.5


@pytest.mark.parametrize(
    "kw, total",
    [
        (dict(max_epochs=2, accumulate_grad_batches=3), 6),  # ceil(8 / 3) = 3 steps per epoch
        (dict(max_epochs=10, max_steps=7), 7),
        (dict(max_epochs=3, limit_train_batches=3), 9),
        (dict(max_epochs=2, limit_train_batches=0.5, accumulate_grad_batches=2), 4),
    ],
)
def test_training_length_from_the_trainer(kw, total):
    cb, rec = FreezeOut(t0=0.5, schedule="linear"), Recorder()
    fit([cb, rec], logger=False, **kw)
    assert cb.total_steps == total
    # one entry per optimizer step: t = step / total really spans [0, 1)
    assert rec.steps == list(range(total))
    # auto: the blocks of the repeated backbone container, then the head (the last managed layer)
    names = [layer.name for layer in cb.layers]
    assert names == ["backbone.0", "backbone.1", "backbone.2", "head"]
    t_first = 0.5
    first = names[0]
    for step, lrs in zip(rec.steps, rec.lrs, strict=True):
        assert lrs[first] == pytest.approx(expected_lr(0.05, t_first, step / total), abs=1e-15)
        assert lrs["head"] == pytest.approx(expected_lr(0.05, 1.0, step / total), abs=1e-15)
    assert [e["step"] for e in cb.events if e["layer"] == first] == [math.ceil(t_first * total)]


def _count_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return len(seen)


class GraphProbe(Callback):
    """Autograd graph size of the loss and whether each block's output needs grad, per step."""

    def __init__(self):
        self.nodes, self.needs_grad = [], []
        self._current = {}

    def on_fit_start(self, trainer, pl_module):
        for i, block in enumerate(pl_module.backbone):
            block.register_forward_hook(
                lambda m, a, out, i=i: self._current.__setitem__(i, out.requires_grad)
            )

    def on_before_backward(self, trainer, pl_module, loss):
        self.nodes.append(_count_nodes(loss))
        self.needs_grad.append(dict(self._current))


def test_frozen_prefix_leaves_the_backward_pass():
    cb, probe = FreezeOut(layers="backbone.*", t0=0.5, schedule="linear"), GraphProbe()
    fit([cb, probe], logger=False)
    # before any freeze every block's output is in the graph; after backbone.0 and .1 froze (steps 8, 11)
    # their outputs carry no grad_fn, so autograd never reaches them
    assert probe.needs_grad[0] == {0: True, 1: True, 2: True}
    assert probe.needs_grad[8] == {0: False, 1: True, 2: True}
    assert probe.needs_grad[11] == {0: False, 1: False, 2: True}
    assert probe.needs_grad[15] == {0: False, 1: False, 2: False}
    nodes = probe.nodes
    assert nodes[0] == nodes[7] > nodes[8] == nodes[10] > nodes[11] == nodes[13] > nodes[14] == nodes[15]


def test_logging_with_lr_monitor_csv_and_timeline(tmp_path):
    cb = FreezeOut(layers="backbone.*", t0=0.5, schedule="linear", plot=True)
    # the monitor comes *before* FreezeOut: it still logs the LR each step really uses
    monitor = LearningRateMonitor(logging_interval="step")
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit([monitor, cb], logger=logger, log_every_n_steps=2, default_root_dir=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    keys = set(rows[0])
    for name in [*BACKBONE, "head"]:
        assert f"lr-SGD/{name}" in keys
    assert {"freeze/trainable_fraction", "freeze/frozen_layers"} <= keys
    lr_rows = {int(r["step"]): r for r in rows if r.get("lr-SGD/backbone.0")}
    assert len(lr_rows) >= 7  # the monitor logs every log_every_n_steps
    for step, row in lr_rows.items():
        assert float(row["lr-SGD/backbone.0"]) == pytest.approx(expected_lr(0.05, 0.5, step / 16), abs=1e-12)
        assert float(row["lr-SGD/head"]) == pytest.approx(expected_lr(0.05, 1.0, step / 16), abs=1e-12)
    stats = [
        (int(r["step"]), float(r["freeze/frozen_layers"]), float(r["freeze/trainable_fraction"]))
        for r in rows
        if r.get("freeze/frozen_layers")
    ]
    assert len(stats) >= 6  # every log_every_n_steps=2 steps
    frozen = [f for _, f, _ in stats]
    fraction = [x for _, _, x in stats]
    assert frozen == sorted(frozen) and frozen[0] == 0 and frozen[-1] == 3
    assert fraction == sorted(fraction, reverse=True) and fraction[0] == 1.0 and fraction[-1] < 0.2
    timeline = tmp_path / "run" / "version_0"
    assert (timeline / "freeze_timeline.png").stat().st_size > 10_000
    import json

    data = json.loads((timeline / "freeze_timeline.json").read_text())
    assert data["callback"] == "FreezeOut" and [e["step"] for e in data["events"]] == [8, 11, 14]
    assert data["history"]["step"][0] == 0 and data["history"]["lr"]["backbone.0"][0] == pytest.approx(0.1)


class OneLayer(Net):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential()
        self.head = nn.Linear(8, 3)


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"t0 must be a number in \(0, 1\]"):
        FreezeOut(t0=1.2)
    with pytest.raises(ValueError, match="schedule='cosine' is not supported"):
        FreezeOut(schedule="cosine")
    with pytest.raises(LayerSpecError, match="matches no parameter-owning module. Closest module names"):
        fit([FreezeOut(layers="encoder.*")], logger=False)
    with pytest.raises(ValueError, match="at least 2 layers"):
        fit([FreezeOut()], model=OneLayer(), logger=False)
    with pytest.raises(ValueError, match="FreezeOut sets every param group's learning rate itself"):
        fit([FreezeOut()], model=Net(scheduler="cosine"), logger=False)
    with pytest.raises(ValueError, match="finite training length"):
        fit([FreezeOut()], logger=False, max_epochs=-1, max_steps=-1)
