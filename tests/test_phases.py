"""The thaw plan as pure logic: schedules, phase validation, discriminative LRs, warm-up, growth, plateaus."""

import math

import pytest
from omegaconf import OmegaConf

from lightning_freeze.rules.thawing import (
    Phase,
    PhaseError,
    PlateauTracker,
    build_plan,
    growth_factor,
    match_layers,
    target_lr,
    warmup_factor,
)

NAMES = ["backbone.0", "backbone.1", "backbone.2", "head"]


def test_every_n_epochs_thaws_one_group_at_a_time_from_the_top():
    plan = build_plan(NAMES, every_n_epochs=2)
    assert plan.initial == ("head",)
    assert plan.initially_frozen == ["backbone.0", "backbone.1", "backbone.2"]
    assert [(p.layers, p.at_epoch, p.at_step) for p in plan.phases] == [
        (("backbone.2",), 2, None),
        (("backbone.1",), 4, None),
        (("backbone.0",), 6, None),
    ]
    assert plan.due(epoch=3, step=99, done=set()) == [0]
    assert plan.due(epoch=6, step=0, done={0}) == [1, 2]


def test_every_n_steps_with_groups_per_step():
    plan = build_plan(NAMES, every_n_steps=5, groups_per_step=2)
    assert [(p.layers, p.at_step) for p in plan.phases] == [
        (("backbone.1", "backbone.2"), 5),
        (("backbone.0",), 10),
    ]
    assert plan.due(epoch=0, step=4, done=set()) == []
    assert plan.due(epoch=0, step=5, done=set()) == [0]


def test_monitor_plan_has_no_times_and_thaws_in_order():
    plan = build_plan(NAMES, monitor="val_loss")
    assert all(p.trigger == "monitor" for p in plan.phases)
    assert plan.due(epoch=100, step=10**6, done=set()) == []
    assert plan.next_monitor_phase(set()) == 0
    assert plan.next_monitor_phase({0, 1}) == 2
    assert plan.next_monitor_phase({0, 1, 2}) is None


def test_explicit_phases_from_hydra_yaml():
    cfg = OmegaConf.create(
        """
        phases:
          - {layers: backbone.2, at_epoch: 1, lr: 0.01}
          - {layers: [backbone.0, "re:backbone\\\\.1"], at_step: 30, lr_ratio: 0.1}
        """
    )
    plan = build_plan(NAMES, phases=cfg.phases)
    assert plan.initial == ("head",)
    assert plan.phases == (
        Phase(("backbone.2",), at_epoch=1, lr=0.01),
        Phase(("backbone.0", "backbone.1"), at_step=30, lr_ratio=0.1),
    )


def test_phase_layers_may_name_a_module_that_contains_layers_and_unnamed_layers_train_from_start():
    plan = build_plan(NAMES + ["extra"], phases=[{"layers": "backbone", "at_epoch": 3}])
    assert plan.phases[0].layers == ("backbone.0", "backbone.1", "backbone.2")
    assert plan.initial == ("head", "extra")


def test_a_phase_at_zero_trains_from_the_start_with_its_lr():
    plan = build_plan(
        NAMES, phases=[{"layers": "head", "at_epoch": 0, "lr": 0.5}, {"layers": "backbone.*", "at_epoch": 1}]
    )
    assert plan.initial == ("head",)
    assert len(plan.phases) == 1
    assert plan.phase_of("head").lr == 0.5


@pytest.mark.parametrize(
    "phases, match",
    [
        ([{"layers": "backbone.*", "at_epoch": 1}, {"layers": "backbone.1", "at_epoch": 2}], "disjoint"),
        ([{"layers": "encoder.*", "at_epoch": 1}], "matches none of the managed layers"),
        ([{"layers": "backbone.0", "at_epoch": -1}], "non-negative"),
        ([{"layers": "backbone.0", "at_epoch": 1, "at_step": 3}], "not both"),
        ([{"layers": "backbone.0"}], "needs at_epoch or at_step"),
        ([{"layers": "backbone.0", "at_epch": 1}], "unknown key"),
        ([{"at_epoch": 1}], "'layers' is missing"),
        ([{"layers": "backbone.0", "at_epoch": 1, "lr": -1}], "positive"),
        ([{"layers": "backbone.0", "at_epoch": 1, "lr": 1, "lr_ratio": 0.1}], "lr or lr_ratio"),
        ([{"layers": "re:(", "at_epoch": 1}], "bad regex"),
        ([], "empty"),
        ({"layers": "backbone.0"}, "list of mappings"),
        (["backbone.0"], "expected a mapping"),
    ],
)
def test_bad_phases_are_clear_errors(phases, match):
    with pytest.raises(PhaseError, match=match):
        build_plan(NAMES, phases=phases)


def test_monitor_phases_must_not_have_times_and_triggers_do_not_mix():
    with pytest.raises(PhaseError, match="remove at_epoch"):
        build_plan(NAMES, monitor="val_loss", phases=[{"layers": "backbone.2", "at_epoch": 1}])
    assert (
        build_plan(NAMES, monitor="val_loss", phases=[{"layers": "backbone.*"}]).phases[0].trigger
        == "monitor"
    )
    with pytest.raises(PhaseError, match="not both"):
        build_plan(NAMES, every_n_epochs=2, every_n_steps=3)
    with pytest.raises(PhaseError, match="not both"):
        build_plan(NAMES, every_n_steps=3, phases=[{"layers": "head", "at_epoch": 1}])
    with pytest.raises(PhaseError, match="positive integer"):
        build_plan(NAMES, every_n_epochs=0)
    with pytest.raises(PhaseError, match="positive integer"):
        build_plan(NAMES, groups_per_step=0)


def test_match_layers_suggests_close_names():
    with pytest.raises(PhaseError, match="closest: .*'backbone.1'"):
        match_layers("backbone.l", NAMES)
    assert match_layers(["head", "backbone.0"], NAMES) == ["backbone.0", "head"]


def test_discriminative_lrs_divide_by_lr_decay_per_level_below_the_head():
    plan = build_plan(NAMES)
    lrs = [target_lr(plan, n, 0.026, 2.6) for n in NAMES]
    assert lrs[-1] == 0.026
    assert [lrs[i + 1] / lrs[i] for i in range(3)] == pytest.approx([2.6] * 3)
    assert target_lr(plan, "backbone.0", 0.1, 2.6, Phase(("backbone.0",), at_epoch=1, lr=0.003)) == 0.003
    assert target_lr(
        plan, "backbone.0", 0.1, 2.6, Phase(("backbone.0",), at_epoch=1, lr_ratio=0.1)
    ) == pytest.approx(0.01)


def test_warmup_and_growth_factors():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    # BackboneFinetuning's defaults: 0.1 of the head LR, doubled every epoch, aligned at the head LR.
    assert [growth_factor(e, 2.0, 0.1, 1.0) for e in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert growth_factor(3, None, 0.1, 1.0) == 0.1


def test_plateau_tracker():
    t = PlateauTracker(mode="min", patience=2, min_delta=0.01)
    assert t.update(1.0) == (True, False)
    assert t.update(0.995) == (False, False)  # within min_delta: no improvement
    assert t.update(0.5) == (True, False)
    assert t.update(0.6) == (False, False)
    assert t.update(0.7) == (False, True)
    state = t.state_dict()
    t2 = PlateauTracker(mode="min", patience=2, min_delta=0.01)
    t2.load_state_dict(state)
    assert (t2.best, t2.wait) == (0.5, 2)
    t.reset()
    assert t.update(0.9) == (True, False)
    mx = PlateauTracker(mode="max", patience=1)
    assert mx.update(0.5) == (True, False) and mx.update(0.4) == (False, True)
    assert PlateauTracker().update(math.nan) == (False, True)
    with pytest.raises(PhaseError):
        PlateauTracker(mode="up")
