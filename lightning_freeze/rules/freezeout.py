"""Pure schedule math for FreezeOut (Brock et al. 2017): no torch, no Lightning.

FreezeOut trains ``L + 1`` groups, indexed ``i = 0..L`` in forward order; group ``L`` is the head and
ends at ``t = 1`` (the end of training). Group ``i`` anneals its learning rate with a cosine that
reaches zero at its own freeze time ``t_i`` and is frozen from then on::

    tau_i = t0 + (1 - t0) * i / L           # linear in depth, tau_0 = t0, tau_L = 1
    t_i   = tau_i ** p                      # p = 1, 2, 3 for linear | squared | cubic
    lr0_i = base_lr / t_i  if scale_lr  else  base_lr
    lr_i(t) = 0.5 * lr0_i * (1 + cos(pi * t / t_i))   for t < t_i, and 0 (frozen) for t >= t_i

``t = step / total_steps`` with ``step`` the number of optimizer steps already taken. ``t0`` is given
before the power: ``t0=0.8`` with ``cubic`` gives ``t_0 = 0.512``.

The arguments are checked where they enter, in :class:`~lightning_freeze.FreezeOut`'s constructor
(:func:`check_t0`, :func:`check_schedule`); the functions here take them as checked and have no defaults.

>>> [round(t, 4) for t in freeze_times(3, t0=0.8, schedule="cubic")]
[0.512, 0.729, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_freeze.validation import check_choice, check_number

ScheduleName = Literal["linear", "squared", "cubic"]
SCHEDULES: dict[ScheduleName, int] = {"linear": 1, "squared": 2, "cubic": 3}


@dataclass(frozen=True)
class GroupSchedule:
    """One group's FreezeOut schedule: its freeze time ``t`` and its initial-LR multiplier ``lr_scale``."""

    t: float
    lr_scale: float

    def factor(self, progress: float) -> float:
        """The LR multiplier (relative to the base LR) at training progress ``progress`` in [0, 1]."""
        return self.lr_scale * cosine_factor(progress, self.t)

    def frozen_at(self, progress: float) -> bool:
        return is_frozen(progress, self.t)


def check_t0(t0: object) -> float:
    """``t0`` as a float in (0, 1]; ``ValueError`` naming the option otherwise."""
    return check_number(
        t0,
        "t0",
        low=0,
        high=1,
        low_open=True,
        where="FreezeOut",
        hint="the fraction of training after which the first layer freezes, before the schedule's power",
    )


def check_schedule(schedule: object) -> ScheduleName:
    """``schedule`` if it is one of :data:`SCHEDULES`; ``ValueError`` naming the option otherwise."""
    return check_choice(schedule, "schedule", SCHEDULES, where="FreezeOut")


def freeze_times(n_groups: int, t0: float, schedule: ScheduleName) -> list[float]:
    """``t_i`` for ``n_groups = L + 1`` groups; the last one (the head) is always 1.0 (a lone group is the head)."""
    last = max(n_groups - 1, 1)
    power = SCHEDULES[schedule]
    times = [(t0 + (1 - t0) * i / last) ** power for i in range(n_groups)]
    times[-1] = 1.0  # exact, whatever the rounding of t0 + (1 - t0)
    return times


def freezeout_schedule(
    n_groups: int, t0: float, schedule: ScheduleName, scale_lr: bool
) -> list[GroupSchedule]:
    """Each group's ``(t_i, lr0_i / base_lr)``: the pure FreezeOut schedule for ``n_groups = L + 1`` groups."""
    return [GroupSchedule(t, 1.0 / t if scale_lr else 1.0) for t in freeze_times(n_groups, t0, schedule)]


def lr_factors(progress: float, schedules: Sequence[GroupSchedule]) -> list[float]:
    """Every group's LR multiplier at training progress ``progress``, in one pass (the per-step update)."""
    return [s.factor(progress) for s in schedules]


def cosine_factor(progress: float, end: float) -> float:
    """``0.5 * (1 + cos(pi * progress / end))``, clamped to 0 from ``progress >= end`` on.

    With ``end=1`` this is the plain per-step cosine annealing (no restarts) used as the baseline.
    """
    if end <= 0:
        raise ValueError(f"end must be positive, got {end}")
    if progress >= end:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * max(progress, 0.0) / end))


def is_frozen(progress: float, t: float) -> bool:
    """A group with freeze time ``t < 1`` is frozen from ``progress >= t`` on; the head (``t = 1``) never is."""
    return t < 1.0 and progress >= t


def progress(step: int, total_steps: int | float) -> float:
    """``t = step / total_steps``: training progress after ``step`` optimizer steps."""
    if not total_steps or not math.isfinite(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive finite number, got {total_steps!r}")
    return step / total_steps


def freeze_step(t: float, total_steps: int) -> int | None:
    """The first optimizer step (0-based, counted before the step runs) at which a group with freeze time
    ``t`` is frozen, or None if it never is within ``total_steps`` steps."""
    if t >= 1.0:
        return None
    step = max(0, math.ceil(t * total_steps) - 1)
    while step / total_steps < t:  # the same comparison the callback makes, so rounding agrees
        step += 1
    return step if step < total_steps else None
