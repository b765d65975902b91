"""The thaw schedule of progressive unfreezing, as pure logic (no torch, no Lightning).

- :func:`parse_phases` checks explicit ``phases=[...]`` settings (keys, triggers, LRs) and
  :func:`check_triggers` the combination of triggers; both run in the callback's constructor, which checks
  each single value where it enters. The functions here take every value from the caller (no defaults).
- :func:`build_thaw_schedule` turns the settings into a :class:`ThawSchedule`: which layers train from
  the start and which :class:`Phase` thaws which layers when (an epoch, a step, or the next metric
  plateau). The phases' layer specs are resolved into managed layer names by the caller (through
  :func:`lightning_freeze.engine.layers.layers_within`, the one layer-spec language).
- :func:`target_lr` is the discriminative learning rate of ULMFiT: the layer ``k`` places below the head
  (head = 0) gets ``head_lr / lr_decay**k``.
- :func:`warmup_factor` and :func:`growth_factor` are the temporary and the per-epoch LR multipliers of a
  freshly thawed layer.
- :class:`PlateauTracker` decides "no improvement for ``patience`` validations".

>>> schedule = build_thaw_schedule(
...     ["backbone.0", "backbone.1", "head"], every_n_epochs=2, every_n_steps=None, groups_per_step=1,
...     phases=None, monitor=None)
>>> schedule.initial
('head',)
>>> [(p.layers, p.at_epoch) for p in schedule.phases]
[(('backbone.1',), 2), (('backbone.0',), 4)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lightning_freeze.validation import check_choice, check_int, check_layer_spec, check_number

PHASE_KEYS = ("layers", "at_epoch", "at_step", "lr", "lr_ratio")
MODES = ("min", "max")
Trigger = Literal["epoch", "step", "monitor"]


class PhaseError(ValueError):
    """Thawing settings that cannot work: overlapping or empty phases, unknown layers, bad triggers."""


@dataclass(frozen=True)
class Phase:
    """One thaw: ``layers`` become trainable at ``at_epoch`` or ``at_step``, or (neither) at the next plateau.

    ``spec`` is the layer spec as the user wrote it; ``layers`` are the managed layer names it resolves
    to (empty until resolved). ``lr`` (absolute) or ``lr_ratio`` (times the head's LR) overrides the
    discriminative LR of the layers.
    """

    spec: tuple[str, ...]
    at_epoch: int | None = None
    at_step: int | None = None
    lr: float | None = None
    lr_ratio: float | None = None
    layers: tuple[str, ...] = ()

    @property
    def trigger(self) -> Trigger:
        if self.at_epoch is not None:
            return "epoch"
        if self.at_step is not None:
            return "step"
        return "monitor"

    @property
    def at_start(self) -> bool:
        return self.at_epoch == 0 or self.at_step == 0

    def is_due(self, epoch: int, step: int) -> bool:
        """Whether a time-triggered phase's time has come (never for a monitor-triggered one)."""
        if self.at_epoch is not None:
            return epoch >= self.at_epoch
        if self.at_step is not None:
            return step >= self.at_step
        return False

    def describe(self) -> str:
        when = {"epoch": f"epoch {self.at_epoch}", "step": f"step {self.at_step}", "monitor": "plateau"}
        return f"{list(self.layers or self.spec)} at {when[self.trigger]}"


@dataclass(frozen=True)
class ThawSchedule:
    """When each layer thaws: the managed layer names (head last), what trains from the start, the phases."""

    layers: tuple[str, ...]
    initial: tuple[str, ...]
    phases: tuple[Phase, ...] = field(default_factory=tuple)
    start_phases: tuple[Phase, ...] = field(default_factory=tuple)  # explicit phases at epoch/step 0

    def phase_of(self, name: str) -> Phase | None:
        """The phase (later or at the start) that names layer ``name``, if any."""
        for phase in self.phases + self.start_phases:
            if name in phase.layers:
                return phase
        return None

    def describe(self) -> list[str]:
        """The schedule in words, one line per phase; comparable (a resumed run must follow the same one)."""
        return [f"initial {list(self.initial)}"] + [p.describe() for p in self.phases]

    @property
    def initially_frozen(self) -> list[str]:
        return [n for n in self.layers if n not in self.initial]

    def depth(self, name: str) -> int:
        """Places below the head: the head (last layer) is 0, the layer before it 1, ..."""
        return len(self.layers) - 1 - self.layers.index(name)

    def due(self, epoch: int, step: int, done: set[int] | frozenset[int]) -> list[int]:
        """Indices of the time-triggered phases due at (``epoch``, ``step``) and not applied yet."""
        return [i for i, p in enumerate(self.phases) if i not in done and p.is_due(epoch, step)]

    def next_monitor_phase(self, done: set[int] | frozenset[int]) -> int | None:
        """The first monitor-triggered phase not applied yet, in list order."""
        for i, p in enumerate(self.phases):
            if i not in done and p.trigger == "monitor":
                return i
        return None

    def last_time(self) -> tuple[int | None, int | None]:
        """The latest ``at_epoch`` and ``at_step`` of the time-triggered phases (None: no such phase)."""
        epochs = [p.at_epoch for p in self.phases if p.at_epoch is not None]
        steps = [p.at_step for p in self.phases if p.at_step is not None]
        return max(epochs, default=None), max(steps, default=None)


# ---------------------------------------------------------------------------------------------- settings
def check_triggers(
    *,
    every_n_epochs: int | None,
    every_n_steps: int | None,
    groups_per_step: int,
    phases: Sequence[Phase] | None,
    monitor: str | None,
) -> None:
    """Raise :class:`PhaseError` for a combination of thaw triggers that cannot work (each value is checked
    on its own where it enters, in the callback's constructor)."""
    if phases is not None:
        if every_n_steps is not None or groups_per_step != 1 or every_n_epochs not in (None, 1):
            raise PhaseError(
                "give either phases=[...] or an automatic schedule (every_n_epochs / every_n_steps / "
                "groups_per_step), not both"
            )
    elif monitor is not None:
        if every_n_steps is not None or every_n_epochs not in (None, 1):
            raise PhaseError(
                f"monitor={monitor!r} thaws at each plateau; every_n_epochs/every_n_steps cannot be set with it"
            )
    elif every_n_steps is not None:
        if every_n_epochs not in (None, 1):
            raise PhaseError("set every_n_epochs or every_n_steps, not both")
    elif every_n_epochs is None:
        raise PhaseError("no thaw trigger: set every_n_epochs, every_n_steps, monitor or phases")


def parse_phases(raw: Any, monitor: str | None) -> tuple[Phase, ...]:
    """Explicit ``phases=[{layers: ..., at_epoch: 2, lr: 1e-3}, ...]`` as checked, unresolved phases."""
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise PhaseError(f"phases must be a list of mappings like {{layers: ..., at_epoch: 2}}, got {raw!r}")
    if not raw:
        raise PhaseError("phases=[] is empty; give at least one phase or leave phases unset")
    return tuple(_parse_phase(i, item, monitor) for i, item in enumerate(raw))


def _parse_phase(i: int, raw: Any, monitor: str | None) -> Phase:
    where = f"phase {i}"
    if not isinstance(raw, Mapping):
        raise PhaseError(f"{where}: expected a mapping like {{layers: ..., at_epoch: 2}}, got {raw!r}")
    unknown = sorted(set(raw) - set(PHASE_KEYS))
    if unknown:
        raise PhaseError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(PHASE_KEYS)}")
    if "layers" not in raw:
        raise PhaseError(f"{where}: 'layers' is missing (a layer name, glob, 're:' regex, or a list of them)")
    spec = check_layer_spec(raw["layers"], where=where, error=PhaseError)
    at_epoch = check_int(
        raw.get("at_epoch"), "at_epoch", minimum=0, allow_none=True, where=where, error=PhaseError
    )
    at_step = check_int(
        raw.get("at_step"), "at_step", minimum=0, allow_none=True, where=where, error=PhaseError
    )
    if at_epoch is not None and at_step is not None:
        raise PhaseError(f"{where}: set at_epoch or at_step, not both")
    if monitor is None and at_epoch is None and at_step is None:
        raise PhaseError(
            f"{where}: needs at_epoch or at_step (or set monitor=... to thaw the phases at each plateau)"
        )
    if monitor is not None and (at_epoch is not None or at_step is not None):
        raise PhaseError(
            f"{where}: with monitor={monitor!r} the phases thaw in list order at each plateau; remove at_epoch/at_step"
        )
    lr, lr_ratio = raw.get("lr"), raw.get("lr_ratio")
    if lr is not None and lr_ratio is not None:
        raise PhaseError(f"{where}: set lr or lr_ratio, not both")
    return Phase(
        spec=(spec,) if isinstance(spec, str) else tuple(spec),
        at_epoch=at_epoch,
        at_step=at_step,
        lr=check_number(lr, "lr", low=0, low_open=True, allow_none=True, where=where, error=PhaseError),
        lr_ratio=check_number(
            lr_ratio, "lr_ratio", low=0, low_open=True, allow_none=True, where=where, error=PhaseError
        ),
    )


def build_thaw_schedule(
    layers: Sequence[str],
    *,
    every_n_epochs: int | None,
    every_n_steps: int | None,
    groups_per_step: int,
    phases: Sequence[Phase] | None,
    monitor: str | None,
) -> ThawSchedule:
    """The thaw schedule for the managed ``layers`` (in model order, the head last).

    Exactly one trigger is used: explicit ``phases`` (already resolved: each phase's ``layers`` are
    managed layer names); else the metric (``monitor``: the next ``groups_per_step`` layers thaw at each
    plateau); else ``every_n_steps``; else ``every_n_epochs``. In the automatic schedules
    the last layer (the head) trains from the start and the others thaw from the top down,
    ``groups_per_step`` at a time. The settings are those :func:`check_triggers` accepted.
    """
    names = tuple(layers)
    if not names:
        raise PhaseError("progressive unfreezing needs at least one layer")
    if len(set(names)) != len(names):
        raise PhaseError(f"layer names must be unique, got {list(names)}")
    if phases is not None:
        return _explicit_schedule(names, phases)
    if monitor is not None:
        trigger_key, every = None, 0
    elif every_n_steps is not None:
        trigger_key, every = "at_step", every_n_steps
    else:
        trigger_key, every = "at_epoch", every_n_epochs
    below_head = list(reversed(names[:-1]))  # top down: the layer right below the head first
    out = []
    for i in range(0, len(below_head), groups_per_step):
        chunk = tuple(n for n in names if n in below_head[i : i + groups_per_step])
        trigger = {} if trigger_key is None else {trigger_key: (i // groups_per_step + 1) * every}
        out.append(Phase(spec=chunk, layers=chunk, **trigger))
    return ThawSchedule(layers=names, initial=(names[-1],), phases=tuple(out))


def _explicit_schedule(names: tuple[str, ...], phases: Sequence[Phase]) -> ThawSchedule:
    owner: dict[str, int] = {}
    for i, phase in enumerate(phases):
        if not phase.layers:
            raise PhaseError(f"phase {i}: its layers {list(phase.spec)} are not resolved to managed layers")
        unknown = [n for n in phase.layers if n not in names]
        if unknown:
            raise PhaseError(f"phase {i}: {unknown} are not managed layers ({list(names)})")
        for name in phase.layers:
            if name in owner:
                raise PhaseError(
                    f"phases {owner[name]} and {i} both thaw layer {name!r}; phases must be disjoint"
                )
            owner[name] = i
    ordered = [replace(p, layers=tuple(n for n in names if n in p.layers)) for p in phases]
    # A phase at epoch/step 0 trains from the start, like every layer that no phase names.
    at_start = {n for p in ordered if p.at_start for n in p.layers}
    initial = tuple(n for n in names if n not in owner or n in at_start)
    return ThawSchedule(
        layers=names,
        initial=initial,
        phases=tuple(p for p in ordered if not p.at_start),
        start_phases=tuple(p for p in ordered if p.at_start),
    )


# ---------------------------------------------------------------------------------------------- learning rates
def target_lr(
    schedule: ThawSchedule, name: str, head_lr: float, lr_decay: float, phase: Phase | None
) -> float:
    """The base LR a layer trains at: the phase's ``lr`` / ``lr_ratio`` if set, else ``head_lr / lr_decay**k``."""
    if phase is not None and phase.lr is not None:
        return phase.lr
    if phase is not None and phase.lr_ratio is not None:
        return head_lr * phase.lr_ratio
    return head_lr / lr_decay ** schedule.depth(name)


def warmup_factor(steps_since_thaw: int, warmup_steps: int) -> float:
    """Linear warm-up of a freshly thawed layer: ``1/W, 2/W, ..., 1`` for its first ``W`` optimizer steps."""
    if warmup_steps <= 0 or steps_since_thaw >= warmup_steps:
        return 1.0
    return (max(steps_since_thaw, 0) + 1) / warmup_steps


def growth_factor(epochs_since_thaw: int, growth: float | None, start: float, cap: float) -> float:
    """BackboneFinetuning-style ramp: the LR ``start`` times ``growth`` per epoch since the thaw, at most ``cap``."""
    if growth is None or epochs_since_thaw <= 0:
        return start
    return min(cap, start * growth**epochs_since_thaw)


# ---------------------------------------------------------------------------------------------- plateaus
class PlateauTracker:
    """ "No improvement of the metric for ``patience`` validations", like ``EarlyStopping`` without stopping.

    ``update(value)`` returns ``(improved, plateaued)``. ``reset()`` starts a new phase: the next value
    becomes the phase's first best.
    """

    def __init__(self, mode: str, patience: int, min_delta: float) -> None:
        self.mode = check_choice(mode, "mode", MODES, error=PhaseError)
        self.patience = check_int(patience, "patience", minimum=1, error=PhaseError)
        self.min_delta = check_number(min_delta, "min_delta", low=0, error=PhaseError)
        self.best: float | None = None
        self.wait = 0

    def is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def update(self, value: float) -> tuple[bool, bool]:
        if self.is_better(value, self.best):
            self.best, self.wait = float(value), 0
            return True, False
        self.wait += 1
        return False, self.wait >= self.patience

    def reset(self) -> None:
        self.best, self.wait = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.wait = state["best"], int(state["wait"])
