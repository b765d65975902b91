"""AdaptiveFreeze's decision rule as pure logic, on hand-made signal sequences."""

import math

import pytest

from lightning_freeze import AdaptiveFreeze
from lightning_freeze.rules.adaptive import (
    Signals,
    decide,
    metric_worsened,
    percentile_of,
    relative_change,
    scores,
    warmup_steps,
)

LAYERS = ["embed", "block0", "block1", "block2", "head"]
CHANGE = dict(criterion="grad_norm_change", threshold=None)  # the rule takes every setting from its caller
MEDIAN = dict(CHANGE, percentile=50)


def signals(before, now, per_element=None):
    return Signals(
        dict(zip(LAYERS, before, strict=False)), dict(zip(LAYERS, now, strict=False)), per_element or {}
    )


def test_relative_change_and_percentile():
    assert relative_change(2.0, 2.5) == 0.25 and relative_change(2.0, 1.5) == 0.25
    assert relative_change(0.0, 0.0) == 0.0 and math.isinf(relative_change(0.0, 1.0))
    assert percentile_of([1, 2, 3, 4], 50) == 2.5
    assert percentile_of([1, 2, 3, 4], 25) == pytest.approx(1.75)  # linear interpolation, as numpy's default


def test_the_longest_front_run_of_settled_layers_freezes():
    # changes: 0.01, 0.02, 0.5, 0.01, 0.4 -> median 0.02: embed and block0 are settled; block2 is settled too,
    # but block1 in front of it is not, so only the front run freezes (the frozen part stays a prefix)
    d = decide(LAYERS, 0, signals([1, 1, 1, 1, 1], [1.01, 1.02, 1.5, 1.01, 1.4]), **MEDIAN, max_frozen=4)
    assert d.freeze == ("embed", "block0")
    assert d.threshold == pytest.approx(0.02)
    assert "embed: gradient-norm change 0.01" in d.reason and "50th percentile" in d.reason


def test_only_the_layers_still_training_count_and_the_head_never_freezes():
    # embed and block0 frozen already: their signals are ignored; the percentile is over block1.. head
    d = decide(LAYERS, 2, signals([1, 1, 1, 1, 1], [9, 9, 1.01, 1.01, 1.01]), **MEDIAN, max_frozen=4)
    assert d.freeze == ("block1", "block2")  # max_frozen=4 keeps the head training
    assert set(d.scores) == {"block1", "block2", "head"}
    assert decide(LAYERS, 4, signals([1] * 5, [1] * 5), **MEDIAN, max_frozen=4).freeze == ()


def test_no_previous_interval_no_candidate():
    d = decide(LAYERS, 0, Signals({}, {n: 1.0 for n in LAYERS}), **MEDIAN, max_frozen=4)
    assert d.freeze == () and d.threshold is None and d.reason == ""
    # a layer without a previous value blocks the run behind it
    partial = Signals({"block0": 1.0, "block1": 1.0}, {n: 1.0 for n in LAYERS})
    assert decide(LAYERS, 0, partial, **MEDIAN, max_frozen=4).freeze == ()


def test_a_sharper_percentile_freezes_less():
    s = signals([1] * 5, [1.01, 1.02, 1.03, 1.04, 1.05])
    assert decide(LAYERS, 0, s, **CHANGE, percentile=90, max_frozen=4).freeze == (
        "embed",
        "block0",
        "block1",
        "block2",
    )
    assert decide(LAYERS, 0, s, **CHANGE, percentile=30, max_frozen=4).freeze == ("embed", "block0")
    assert decide(LAYERS, 0, s, **CHANGE, percentile=10, max_frozen=4).freeze == ("embed",)


def test_absolute_gradient_norm_criterion():
    per_element = {"embed": 1e-6, "block0": 5e-7, "block1": 1e-3, "block2": 1e-7, "head": 1e-2}
    s = Signals({}, {n: 1.0 for n in LAYERS}, per_element)
    assert scores(s, "grad_norm") == per_element
    d = decide(LAYERS, 0, s, criterion="grad_norm", threshold=1e-5, percentile=50, max_frozen=4)
    assert d.freeze == ("embed", "block0") and d.threshold == 1e-5
    assert "gradient norm per element" in d.reason


def test_guards_as_pure_functions():
    assert warmup_steps(0.25, 400) == 100 and warmup_steps(30, 400) == 30 and warmup_steps(0.5, math.inf) == 0
    assert not metric_worsened(None, 1.0, "min")
    assert metric_worsened(1.0, 1.1, "min") and not metric_worsened(1.0, 0.9, "min")
    assert metric_worsened(0.9, 0.8, "max") and metric_worsened(0.9, float("nan"), "max")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(percentile=0), "percentile must be a number in (0, 100)"),
        (dict(percentile=100), "percentile must be a number in (0, 100)"),
        (dict(check_every_n_steps=0), "check_every_n_steps must be a positive integer"),
        (dict(check_every_n_steps=-3), "check_every_n_steps must be a positive integer"),
        (dict(criterion="loss"), "criterion='loss' is not supported"),
        (dict(criterion="grad_norm"), "threshold must be a positive number"),
        (dict(threshold=0.1), "threshold is used with criterion='grad_norm' only"),
        (dict(min_steps=1.5), "min_steps must be a number in [0, 1)"),
        (dict(min_steps=-2), "min_steps must be a non-negative integer"),
        (dict(max_frozen=0), "max_frozen must be a positive integer or None"),
        (dict(mode="down"), "mode='down' is not supported"),
    ],
)
def test_bad_settings_name_the_option(kwargs, words):
    with pytest.raises(ValueError) as err:
        AdaptiveFreeze(**kwargs)  # each value is checked once, where it enters: the constructor
    assert words in str(err.value) and str(err.value).startswith("AdaptiveFreeze: ")
