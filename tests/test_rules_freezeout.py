"""FreezeOut's pure schedule math against hand-computed values."""

import math

import pytest

from lightning_freeze.rules.freezeout import (
    check_schedule,
    check_t0,
    cosine_factor,
    freeze_step,
    freeze_times,
    freezeout_schedule,
    is_frozen,
    lr_factors,
    progress,
)


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-15)


def test_cubic_t0_08_first_layer_is_0512():
    # tau = 0.8, 0.9, 1.0 -> cubed
    assert freeze_times(3, t0=0.8, schedule="cubic") == approx([0.512, 0.729, 1.0])
    # 5 groups: tau = 0.8, 0.85, 0.9, 0.95, 1.0
    assert freeze_times(5, 0.8, "cubic") == approx([0.512, 0.614125, 0.729, 0.857375, 1.0])


def test_linear_and_squared():
    assert freeze_times(5, 0.5, "linear") == approx([0.5, 0.625, 0.75, 0.875, 1.0])
    assert freeze_times(3, 0.8, "squared") == approx([0.64, 0.81, 1.0])
    assert freeze_times(4, 0.1, "squared") == approx([0.01, 0.16, 0.49, 1.0])


@pytest.mark.parametrize("schedule, power", [("linear", 1), ("squared", 2), ("cubic", 3)])
def test_one_layer_plus_head(schedule, power):
    # L = 1: groups i = 0 (the one layer, tau = t0) and i = 1 (the head, tau = 1)
    sched = freezeout_schedule(2, t0=0.6, schedule=schedule, scale_lr=True)
    assert [s.t for s in sched] == approx([0.6**power, 1.0])
    assert [s.lr_scale for s in sched] == approx([1 / 0.6**power, 1.0])


def test_scale_lr_off_keeps_base_lr():
    sched = freezeout_schedule(4, 0.8, "cubic", scale_lr=False)
    assert [s.lr_scale for s in sched] == [1.0, 1.0, 1.0, 1.0]
    assert sched[0].t == pytest.approx(0.512)


def test_t0_one_never_freezes():
    sched = freezeout_schedule(3, 1.0, "cubic", True)
    assert [s.t for s in sched] == [1.0, 1.0, 1.0]
    assert not any(s.frozen_at(0.9999) for s in sched)


def test_head_is_exactly_one():
    for t0 in (0.1, 0.3, 0.7, 0.9):
        for schedule in ("linear", "squared", "cubic"):
            assert freeze_times(7, t0, schedule)[-1] == 1.0


def test_per_step_cosine():
    s = freezeout_schedule(3, 0.8, "cubic", True)[0]  # t = 0.512, lr_scale = 1 / 0.512
    assert s.factor(0.0) == approx(1 / 0.512)
    assert s.factor(0.256) == approx(0.5 / 0.512)  # half way to t_i: cos(pi/2) = 0
    t = 0.1
    assert s.factor(t) == approx(0.5 / 0.512 * (1 + math.cos(math.pi * t / 0.512)))
    assert s.factor(0.512) == 0.0 and s.factor(0.9) == 0.0
    assert cosine_factor(0.5, 1.0) == approx(0.5)
    assert cosine_factor(0.0, 1.0) == 1.0 and cosine_factor(1.0, 1.0) == 0.0


def test_lr_factors_are_every_groups_factor_in_one_pass():
    schedules = freezeout_schedule(4, 0.5, "squared", True)
    for t in (0.0, 0.2, 0.3, 0.6, 0.99, 1.0):
        assert lr_factors(t, schedules) == [s.factor(t) for s in schedules]
    assert lr_factors(0.6, schedules)[0] == 0.0 and lr_factors(0.6, schedules)[-1] > 0


def test_frozen_from_t_i_on_and_head_never():
    assert not is_frozen(0.511, 0.512) and is_frozen(0.512, 0.512) and is_frozen(0.99, 0.512)
    assert not is_frozen(1.0, 1.0) and not is_frozen(5.0, 1.0)


def test_freeze_step_agrees_with_the_comparison():
    for total in (7, 10, 16, 100, 1000):
        for t in freeze_times(6, 0.8, "cubic")[:-1] + [0.5, 0.25]:
            s = freeze_step(t, total)
            if s is None:  # the first step with s / total >= t would be past the end of training
                assert (total - 1) / total < t
            else:
                assert s / total >= t and (s == 0 or (s - 1) / total < t)
    assert freeze_step(1.0, 10) is None
    assert freeze_step(0.5, 16) == 8
    assert progress(8, 16) == 0.5


@pytest.mark.parametrize("t0", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_t0(t0):
    with pytest.raises(ValueError, match=r"FreezeOut: t0 must be a number in \(0, 1\]"):
        check_t0(t0)


def test_bad_schedule_and_a_lone_group():
    with pytest.raises(ValueError, match="FreezeOut: schedule=.quartic. is not supported; use one of"):
        check_schedule("quartic")
    assert check_schedule("linear") == "linear" and check_t0(1) == 1.0
    assert freeze_times(1, 0.8, "cubic") == [1.0]  # a lone group is the head
    with pytest.raises(ValueError, match="total_steps"):
        progress(1, float("inf"))
