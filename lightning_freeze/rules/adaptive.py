"""Adaptive freezing as pure logic: which front layers have stopped learning, decided from recorded signals.

A *signal* is one number per layer and check interval, computed by the callback from the training gradients.
A *criterion* turns the signals of the layers still training into candidates for freezing:

- ``grad_norm_change`` (default; AutoFreeze, Liu, Agarwal & Venkataraman 2021): the layer's gradient norm
  accumulated over the interval; a layer is a candidate when the relative change of that norm since the
  previous interval, ``|g_now - g_before| / g_before``, is at or below the ``percentile``-th percentile of the
  changes of all layers still training. A layer that has stopped learning keeps a steady, small gradient.
- ``grad_norm`` (GradES-style): a layer is a candidate when its gradient norm per parameter element, averaged
  over the interval, is at or below an absolute ``threshold``.

:func:`decide` then freezes the longest run of candidates at the front of the layers still training (so the
frozen part stays a prefix that ``FrozenPrefixCache`` can serve), never more than ``max_frozen`` layers in all.
Guards that need no signal (``min_steps``, a worsening validation metric) are the caller's: it simply does not
ask. The settings are checked where they enter, in :class:`~lightning_freeze.AdaptiveFreeze`'s constructor
(with :func:`check_percentile`, :func:`check_threshold` and :func:`check_min_steps`); the functions here take
every value from the caller, checked, and have no defaults.

>>> layers = ["embed", "block0", "block1", "head"]
>>> before = {"embed": 1.0, "block0": 2.0, "block1": 4.0, "head": 8.0}
>>> now = {"embed": 1.01, "block0": 2.02, "block1": 3.0, "head": 5.0}
>>> decision = decide(layers, 0, Signals(before, now, {}), criterion="grad_norm_change", percentile=50,
...                   threshold=None, max_frozen=3)
>>> decision.freeze, round(decision.threshold, 4)
(('embed', 'block0'), 0.13)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lightning_freeze.validation import check_int, check_number

Criterion = Literal["grad_norm_change", "grad_norm"]
CRITERIA: tuple[Criterion, ...] = ("grad_norm_change", "grad_norm")


@dataclass(frozen=True)
class Signals:
    """One check's inputs: each layer's gradient norm accumulated over the previous and the current interval,
    and its gradient norm per parameter element averaged over the current interval (layers still training)."""

    previous: Mapping[str, float]
    current: Mapping[str, float]
    per_element: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What a check decided: the layers to freeze now, each layer's score, the threshold and why."""

    freeze: tuple[str, ...]
    scores: dict[str, float]
    threshold: float | None
    reason: str


def relative_change(before: float, now: float) -> float:
    """``|now - before| / before``; infinite when ``before`` is 0 (a layer that just started to learn)."""
    if before == 0:
        return 0.0 if now == 0 else float("inf")
    return abs(now - before) / before


def scores(signals: Signals, criterion: Criterion) -> dict[str, float]:
    """Each layer's score under ``criterion`` (lower: more settled); layers with no score yet are left out."""
    if criterion == "grad_norm":
        return dict(signals.per_element)
    return {
        name: relative_change(signals.previous[name], now)
        for name, now in signals.current.items()
        if name in signals.previous
    }


def percentile_of(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (linear interpolation between closest ranks, as numpy does)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def decide(
    layers: Sequence[str],
    n_frozen: int,
    signals: Signals,
    *,
    criterion: Criterion,
    percentile: float,
    threshold: float | None,
    max_frozen: int,
) -> Decision:
    """Which layers to freeze now. ``layers`` are in forward order, the first ``n_frozen`` already frozen.

    The candidates are the layers whose score is at or below the threshold (``grad_norm_change``: the
    ``percentile``-th percentile of the scores of the layers still training; ``grad_norm``: ``threshold``).
    The decision freezes the longest run of candidates that starts at the first layer still training, up to
    ``max_frozen`` frozen layers in all. A layer with no score (no previous interval yet) is no candidate.
    """
    active = list(layers[n_frozen:])
    by_layer = {name: value for name, value in scores(signals, criterion).items() if name in active}
    if criterion == "grad_norm":
        assert threshold is not None, "criterion='grad_norm' needs a threshold (check_threshold)"
        cut = threshold
        rule = f"<= threshold {cut:.4g}"
    else:
        values = list(by_layer.values())
        cut = percentile_of(values, percentile) if values else None
        rule = (
            f"<= the {percentile:g}th percentile of the layers still training ({cut:.4g})"
            if cut is not None
            else ""
        )
    room = max(0, max_frozen - n_frozen)
    chosen: list[str] = []
    for name in active[:room]:
        score = by_layer.get(name)
        if cut is None or score is None or score > cut:
            break
        chosen.append(name)
    label = "gradient-norm change" if criterion == "grad_norm_change" else "gradient norm per element"
    reason = ", ".join(f"{n}: {label} {by_layer[n]:.4g}" for n in chosen)
    return Decision(tuple(chosen), by_layer, cut, f"{reason} {rule}".strip() if chosen else "")


def check_percentile(percentile: object) -> float:
    """``percentile`` as a float in (0, 100)."""
    return check_number(
        percentile,
        "percentile",
        low=0,
        high=100,
        low_open=True,
        high_open=True,
        where="AdaptiveFreeze",
        hint="e.g. 30",
    )


def check_threshold(threshold: object, criterion: Criterion) -> float | None:
    """``threshold`` as a positive float with ``criterion='grad_norm'`` (which needs it), else None."""
    if criterion == "grad_norm":
        return check_number(
            threshold,
            "threshold",
            low=0,
            low_open=True,
            where="AdaptiveFreeze",
            hint="criterion='grad_norm' needs it",
        )
    if threshold is not None:
        raise ValueError(
            "AdaptiveFreeze: threshold is used with criterion='grad_norm' only; leave it None or change criterion"
        )
    return None


def check_min_steps(min_steps: object) -> int | float:
    """``min_steps`` as optimizer steps (an int >= 0) or a fraction of training (a float in [0, 1))."""
    if isinstance(min_steps, float):
        return check_number(
            min_steps,
            "min_steps",
            low=0,
            high=1,
            high_open=True,
            where="AdaptiveFreeze",
            hint="a fraction of training",
        )
    return check_int(
        min_steps,
        "min_steps",
        minimum=0,
        where="AdaptiveFreeze",
        hint="optimizer steps, or a float in [0, 1)",
    )


def warmup_steps(min_steps: int | float, total_steps: float) -> int:
    """``min_steps`` as optimizer steps: an int as is, a float as that fraction of ``total_steps``."""
    if isinstance(min_steps, float):
        return int(min_steps * total_steps) if total_steps != float("inf") else 0
    return int(min_steps)


def metric_worsened(previous: float | None, now: float, mode: str) -> bool:
    """Whether a validation metric got worse than at the previous validation (NaN counts as worse)."""
    if now != now:  # NaN
        return True
    if previous is None:
        return False
    return now > previous if mode == "min" else now < previous
