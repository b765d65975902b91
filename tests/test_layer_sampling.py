"""LayerSampling (LISA): the pure sampling rule, per-interval membership on a real Trainer, optimizer state of
leaving and entering layers, scheduler LRs, exact resume mid-interval, and the arguments' checks."""

from __future__ import annotations

import random

import pytest
import torch
from models import Net, loaders, trainer
from resume import assert_same_weights, run_interrupted, run_uninterrupted

from lightning_freeze import LayerSampling
from lightning_freeze.rules.layer_sampling import SamplingPlan, check_n_layers

MIDDLE = [f"backbone.{i}" for i in range(1, 4)]


# ---------------------------------------------------------------------------------------------- the rule
def test_plan_is_a_pure_function_of_seed_and_interval():
    plan = SamplingPlan(MIDDLE, n_layers=2, interval=5, seed=7)
    random.seed(1), torch.manual_seed(1)
    first = [plan.chosen(k) for k in range(20)]
    random.seed(2), torch.manual_seed(2)  # the global generators play no part
    assert [SamplingPlan(MIDDLE, 2, 5, 7).chosen(k) for k in range(20)] == first
    assert all(len(c) == 2 and list(c) == [n for n in MIDDLE if n in c] for c in first)  # in layer order
    assert len(set(first)) == 3  # every pair of three comes up in 20 intervals
    assert [plan.chosen(k) for k in range(20)] != [SamplingPlan(MIDDLE, 2, 5, 8).chosen(k) for k in range(20)]
    assert [plan.interval_of(s) for s in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert set(plan.waiting(3)) == set(MIDDLE) - set(plan.chosen(3))


def test_plan_refuses_more_layers_than_the_middle_holds():
    assert check_n_layers(3, MIDDLE) == 3
    with pytest.raises(ValueError, match="n_layers=4 but there are only 3 middle layers"):
        check_n_layers(4, MIDDLE)


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=1.5), "n_layers"),
        (dict(interval=0), "interval"),
        (dict(seed=-1), "seed"),
        (dict(seed="0"), "seed"),
        (dict(keep_state="yes"), "keep_state"),
        (dict(always=[""]), "always"),
        (dict(always=3), "always"),
        (dict(norm="frozen"), "norm"),
        (dict(layers=[]), "layers"),
    ],
)
def test_constructor_checks_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=f"LayerSampling.*{option}"):
        LayerSampling(**kwargs)


def test_setup_refuses_n_layers_beyond_the_middle_layers():
    model = Net(n_blocks=3)  # auto: backbone.0-2 and head; the middle is backbone.1 and backbone.2
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"n_layers=3 but there are only 2 middle layers to sample from \(\['backbone.1', 'backbone.2'\]\)",
    ):
        trainer(callbacks=[LayerSampling(n_layers=3, seed=0)]).fit(model, *loaders())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---------------------------------------------------------------------------------------------- on a Trainer
class StepProbe:
    """What changed in each optimizer step, per layer, and the optimizer's view of each layer."""

    def __init__(self, sampling: LayerSampling) -> None:
        self.sampling = sampling
        self.changed: list[tuple[int, set[str]]] = []
        self.groups: list[dict[str, tuple[int, float]]] = []
        self.adam_steps: list[dict[str, int | None]] = []
        self._before: dict[str, dict[str, torch.Tensor]] = {}

    def callback(self):
        import lightning.pytorch as pl

        probe = self

        class _Probe(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                probe._before = {
                    layer.name: {n: t.detach().clone() for n, t in _tensors(layer)}
                    for layer in probe.sampling.layers
                }
                opt = trainer.optimizers[0]
                probe.groups.append({g["name"]: (len(g["params"]), g["lr"]) for g in opt.param_groups})

            def on_train_batch_end(self, trainer, pl_module, *args):
                changed = {
                    layer.name
                    for layer in probe.sampling.layers
                    if any(not torch.equal(t, probe._before[layer.name][n]) for n, t in _tensors(layer))
                }
                probe.changed.append((trainer.global_step - 1, changed))
                state = trainer.optimizers[0].state
                probe.adam_steps.append(
                    {
                        layer.name: int(state[layer.params[0]]["step"]) if layer.params[0] in state else None
                        for layer in probe.sampling.layers
                    }
                )

        return _Probe()


def _tensors(layer):
    for i, p in enumerate(layer.params):
        yield f"p{i}", p
    for module in layer.modules:
        yield from module.named_buffers()


def test_exactly_the_sampled_layers_and_the_always_layers_change_each_interval():
    torch.manual_seed(0)
    model = Net("adamw", "step", dropout=0.2, n_blocks=5)
    sampling = LayerSampling(n_layers=2, interval=3, seed=1)
    probe = StepProbe(sampling)
    t = trainer(callbacks=[sampling, probe.callback()], max_epochs=2)
    t.fit(model, *loaders())
    assert sampling.always == ["backbone.0", "head"] and sampling.middle == [
        f"backbone.{i}" for i in range(1, 5)
    ]
    assert len(probe.changed) == 16
    for step, changed in probe.changed:
        chosen = set(sampling.plan.chosen(step // 3))
        assert changed == {"backbone.0", "head"} | chosen, (step, changed, chosen)
    # One choice per interval, recorded with its step; the events say which layers left and entered.
    assert [c["step"] for c in sampling.choices] == [0, 3, 6, 9, 12, 15]
    assert sampling.timeline(16)["choices"] == sampling.choices  # written to freeze_timeline.json
    for event in sampling.events:
        k = event["step"] // 3
        inside = event["layer"] in sampling.plan.chosen(k)
        assert event["step"] % 3 == 0 and (event["action"] == "thaw") == inside
    # Every group keeps following the schedule: an entering layer trains at the LR its group has now.
    for groups in probe.groups:
        lrs = {lr for _, lr in groups.values()}
        assert len(lrs) == 1
    assert {lr for groups in probe.groups for _, lr in groups.values()} == {0.05, 0.025, 0.0125, 0.00625}
    # After fit the model is handed back trainable everywhere.
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("keep_state", [False, True])
def test_optimizer_state_of_leaving_layers_is_dropped_or_kept(keep_state):
    torch.manual_seed(0)
    model = Net("adam", dropout=0.0, n_blocks=4)
    sampling = LayerSampling(n_layers=1, interval=2, seed=3, keep_state=keep_state)
    probe = StepProbe(sampling)
    trainer(callbacks=[sampling, probe.callback()], max_epochs=3).fit(model, *loaders())
    returned = False
    for name in sampling.middle:
        stint = total = 0
        for (step, _), counts in zip(probe.changed, probe.adam_steps):
            if name in sampling.plan.chosen(step // 2):
                stint, total = stint + 1, total + 1
                returned |= stint < total
                assert counts[name] == (total if keep_state else stint), (name, step, counts[name])
            else:
                stint = 0
                assert counts[name] is None  # a waiting layer holds no optimizer state
    assert returned  # some layer left and came back, so the two settings differ


def test_resume_mid_interval_is_bit_exact(tmp_path):
    made: list[LayerSampling] = []

    def callbacks():
        made.append(LayerSampling(n_layers=1, interval=3, seed=5, keep_state=True))
        return [made[-1]]

    def model():
        return Net("adam", "step", dropout=0.2)

    full, _ = run_uninterrupted(model, callbacks, tmp_path)
    resumed, _ = run_interrupted(model, callbacks, tmp_path, stop_at=4)  # step 4: inside interval 1 (3-5)
    assert_same_weights(full, resumed)
    assert made[0].choices == made[2].choices and made[0].events == made[2].events


def test_resume_without_a_seed_continues_the_checkpoints_choices(tmp_path):
    made: list[LayerSampling] = []

    def callbacks():
        made.append(LayerSampling(n_layers=1, interval=3))
        return [made[-1]]

    resumed, _ = run_interrupted(lambda: Net("adam", dropout=0.0), callbacks, tmp_path, stop_at=7)
    first, second = made
    assert second._run_seed == first._run_seed
    assert second.choices[: len(first.choices)] == first.choices and len(second.choices) == 6
