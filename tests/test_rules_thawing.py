"""The thaw schedule as pure logic: phase checks, schedules, discriminative LRs, warm-up, growth, plateaus.

Phase layer specs are resolved into managed layer names by ``engine.layers.layers_within`` (tested in
test_layers.py); here phases arrive resolved, as the callback hands them over.
"""

import dataclasses
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lightning_freeze import ProgressiveUnfreezing
from lightning_freeze.rules.thawing import (
    Phase,
    PhaseError,
    PlateauTracker,
    build_thaw_schedule,
    check_triggers,
    growth_factor,
    parse_phases,
    target_lr,
    warmup_factor,
)

NAMES = ["backbone.0", "backbone.1", "backbone.2", "head"]
# The rules take every setting from their caller (the callback): here, no trigger unless a test names one.
NO_TRIGGER = dict(every_n_epochs=None, every_n_steps=None, groups_per_step=1, phases=None, monitor=None)


def plan(names, **triggers):
    return build_thaw_schedule(names, **{**NO_TRIGGER, **triggers})


def resolved(raw, names_per_phase, monitor=None):
    """Parse ``raw`` phases and resolve them as the callback would, to the given managed layer names."""
    return [
        dataclasses.replace(p, layers=tuple(n))
        for p, n in zip(parse_phases(raw, monitor), names_per_phase, strict=True)
    ]


def test_every_n_epochs_thaws_one_group_at_a_time_from_the_top():
    schedule = plan(NAMES, every_n_epochs=2)
    assert schedule.initial == ("head",)
    assert schedule.initially_frozen == ["backbone.0", "backbone.1", "backbone.2"]
    assert [(p.layers, p.at_epoch, p.at_step) for p in schedule.phases] == [
        (("backbone.2",), 2, None),
        (("backbone.1",), 4, None),
        (("backbone.0",), 6, None),
    ]
    assert schedule.due(epoch=3, step=99, done=set()) == [0]
    assert schedule.due(epoch=6, step=0, done={0}) == [1, 2]
    assert schedule.last_time() == (6, None)


def test_every_n_steps_with_groups_per_step():
    schedule = plan(NAMES, every_n_steps=5, groups_per_step=2)
    assert [(p.layers, p.at_step) for p in schedule.phases] == [
        (("backbone.1", "backbone.2"), 5),
        (("backbone.0",), 10),
    ]
    assert schedule.due(epoch=0, step=4, done=set()) == []
    assert schedule.due(epoch=0, step=5, done=set()) == [0]
    assert schedule.last_time() == (None, 10)


def test_monitor_schedule_has_no_times_and_thaws_in_order():
    schedule = plan(NAMES, monitor="val_loss")
    assert all(p.trigger == "monitor" for p in schedule.phases)
    assert schedule.due(epoch=100, step=10**6, done=set()) == []
    assert schedule.next_monitor_phase(set()) == 0
    assert schedule.next_monitor_phase({0, 1}) == 2
    assert schedule.next_monitor_phase({0, 1, 2}) is None


def test_explicit_phases_from_hydra_yaml_keep_the_spec_and_take_the_resolved_layers():
    cfg = OmegaConf.create(
        """
        phases:
          - {layers: backbone.2, at_epoch: 1, lr: 0.01}
          - {layers: [backbone.0, "re:backbone\\\\.1"], at_step: 30, lr_ratio: 0.1}
        """
    )
    phases = resolved(cfg.phases, [["backbone.2"], ["backbone.1", "backbone.0"]])
    assert phases[1].spec == ("backbone.0", "re:backbone\\.1")
    schedule = plan(NAMES, phases=phases)
    assert schedule.initial == ("head",)
    assert [(p.layers, p.at_epoch, p.at_step, p.lr, p.lr_ratio) for p in schedule.phases] == [
        (("backbone.2",), 1, None, 0.01, None),
        (("backbone.0", "backbone.1"), None, 30, None, 0.1),  # model order, whatever the spec's order
    ]


def test_layers_no_phase_names_train_from_the_start_and_a_phase_at_zero_too():
    phases = resolved(
        [{"layers": "head", "at_epoch": 0, "lr": 0.5}, {"layers": "backbone.*", "at_epoch": 1}],
        [["head"], ["backbone.0", "backbone.1", "backbone.2"]],
    )
    schedule = plan(NAMES + ["extra"], phases=phases)
    assert schedule.initial == ("head", "extra")
    assert len(schedule.phases) == 1
    assert schedule.phase_of("head").lr == 0.5


@pytest.mark.parametrize(
    "phases, match",
    [
        ([{"layers": "backbone.0", "at_epoch": -1}], "at_epoch must be a non-negative integer or None"),
        ([{"layers": "backbone.0", "at_epoch": True}], "at_epoch must be a non-negative integer"),
        ([{"layers": "backbone.0", "at_epoch": 1, "at_step": 3}], "not both"),
        ([{"layers": "backbone.0"}], "needs at_epoch or at_step"),
        ([{"layers": "backbone.0", "at_epch": 1}], r"unknown key\(s\) \['at_epch'\]"),
        ([{"at_epoch": 1}], "'layers' is missing"),
        ([{"layers": "backbone.0", "at_epoch": 1, "lr": -1}], "lr must be a positive number"),
        ([{"layers": "backbone.0", "at_epoch": 1, "lr": "big"}], "lr must be a positive number"),
        ([{"layers": "backbone.0", "at_epoch": 1, "lr": 1, "lr_ratio": 0.1}], "lr or lr_ratio"),
        ([{"layers": "re:(", "at_epoch": 1}], "bad regex"),
        ([{"layers": [], "at_epoch": 1}], "layer spec"),
        ([{"layers": 3, "at_epoch": 1}], "layer spec"),
        ([], "empty"),
        ("x", "list of mappings"),
        ({"layers": "backbone.0"}, "list of mappings"),
        (["backbone.0"], "expected a mapping"),
    ],
)
def test_bad_phases_are_clear_errors_without_a_model(phases, match):
    with pytest.raises(PhaseError, match=match):
        parse_phases(phases, None)


def test_overlapping_resolved_phases_are_an_error():
    phases = resolved(
        [{"layers": "backbone.*", "at_epoch": 1}, {"layers": "backbone.1", "at_epoch": 2}],
        [["backbone.0", "backbone.1", "backbone.2"], ["backbone.1"]],
    )
    with pytest.raises(
        PhaseError, match="phases 0 and 1 both thaw layer 'backbone.1'; phases must be disjoint"
    ):
        plan(NAMES, phases=phases)
    with pytest.raises(PhaseError, match="not resolved"):
        plan(NAMES, phases=parse_phases([{"layers": "head", "at_epoch": 1}], None))


def test_monitor_phases_must_not_have_times_and_triggers_do_not_mix():
    with pytest.raises(PhaseError, match="remove at_epoch"):
        parse_phases([{"layers": "backbone.2", "at_epoch": 1}], monitor="val_loss")
    assert parse_phases([{"layers": "backbone.*"}], monitor="val_loss")[0].trigger == "monitor"
    with pytest.raises(PhaseError, match="not both"):
        check_triggers(**{**NO_TRIGGER, "every_n_epochs": 2, "every_n_steps": 3})
    with pytest.raises(PhaseError, match="not both"):
        check_triggers(
            **{
                **NO_TRIGGER,
                "every_n_steps": 3,
                "phases": parse_phases([{"layers": "head", "at_epoch": 1}], None),
            }
        )
    with pytest.raises(PhaseError, match="no thaw trigger"):
        check_triggers(**NO_TRIGGER)


def test_single_values_are_checked_where_they_enter_the_constructor():
    with pytest.raises(PhaseError, match="every_n_epochs must be a positive integer or None, got 0"):
        ProgressiveUnfreezing(every_n_epochs=0)
    with pytest.raises(PhaseError, match="groups_per_step must be a positive integer, got -1"):
        ProgressiveUnfreezing(groups_per_step=-1)


def test_discriminative_lrs_divide_by_lr_decay_per_level_below_the_head():
    schedule = plan(NAMES, every_n_epochs=1)
    lrs = [target_lr(schedule, n, 0.026, 2.6, None) for n in NAMES]
    assert lrs[-1] == 0.026
    assert [lrs[i + 1] / lrs[i] for i in range(3)] == pytest.approx([2.6] * 3)
    phase = Phase(("backbone.0",), at_epoch=1, lr=0.003, layers=("backbone.0",))
    assert target_lr(schedule, "backbone.0", 0.1, 2.6, phase) == 0.003
    ratio = Phase(("backbone.0",), at_epoch=1, lr_ratio=0.1, layers=("backbone.0",))
    assert target_lr(schedule, "backbone.0", 0.1, 2.6, ratio) == pytest.approx(0.01)


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
    mx = PlateauTracker(mode="max", patience=1, min_delta=0.0)
    assert mx.update(0.5) == (True, False) and mx.update(0.4) == (False, True)
    assert PlateauTracker("min", 1, 0.0).update(math.nan) == (False, True)
    with pytest.raises(PhaseError, match="mode='up' is not supported"):
        PlateauTracker(mode="up", patience=1, min_delta=0.0)
    with pytest.raises(PhaseError, match="patience must be a positive integer"):
        PlateauTracker(mode="min", patience=0, min_delta=0.0)


def test_pure_rules_import_without_torch_lightning_or_hydra():
    code = (
        "import sys, time; t = time.perf_counter();"
        "import lightning_freeze.rules.thawing, lightning_freeze.rules.freezeout, lightning_freeze.validation;"
        "dt = time.perf_counter() - t;"
        "heavy = [m for m in ('torch', 'lightning', 'hydra', 'omegaconf', 'numpy') if m in sys.modules];"
        "print(heavy, dt)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "[]", out
    assert float(out[1]) < 0.5
