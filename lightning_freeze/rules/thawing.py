"""The thaw plan of progressive unfreezing, as pure logic (no torch, no Lightning).

- :func:`build_plan` turns the callback's settings into a :class:`ThawPlan`: which layers train from the
  start and which :class:`Phase` thaws which layers when (an epoch, a step, or the next metric plateau).
  Every mistake in the settings is a :class:`PhaseError` raised here, before any training.
- :func:`target_lr` is the discriminative learning rate of ULMFiT: the layer ``k`` places below the head
  (head = 0) gets ``head_lr / lr_decay**k``.
- :func:`warmup_factor` and :func:`growth_factor` are the temporary and the per-epoch LR multipliers of a
  freshly thawed layer.
- :class:`PlateauTracker` decides "no improvement for ``patience`` validations".

Example::

    plan = build_plan(["backbone.0", "backbone.1", "head"], every_n_epochs=2)
    plan.initial                                 # ('head',)
    [p.at_epoch for p in plan.phases]            # [2, 4]: backbone.1 thaws at epoch 2, backbone.0 at 4
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PHASE_KEYS = ("layers", "at_epoch", "at_step", "lr", "lr_ratio")
MODES = ("min", "max")


class PhaseError(ValueError):
    """Thawing settings that cannot work: overlapping or empty phases, unknown layers, bad triggers."""


@dataclass(frozen=True)
class Phase:
    """One thaw: ``layers`` become trainable at ``at_epoch`` or ``at_step``, or (neither) at the next plateau.

    ``lr`` (absolute) or ``lr_ratio`` (times the head's LR) overrides the discriminative LR of the layers.
    """

    layers: tuple[str, ...]
    at_epoch: int | None = None
    at_step: int | None = None
    lr: float | None = None
    lr_ratio: float | None = None

    @property
    def trigger(self) -> str:
        if self.at_epoch is not None:
            return "epoch"
        if self.at_step is not None:
            return "step"
        return "monitor"

    def is_due(self, epoch: int, step: int) -> bool:
        """Whether a time-triggered phase's time has come (never for a monitor-triggered one)."""
        if self.at_epoch is not None:
            return epoch >= self.at_epoch
        if self.at_step is not None:
            return step >= self.at_step
        return False

    def describe(self) -> str:
        when = {"epoch": f"epoch {self.at_epoch}", "step": f"step {self.at_step}", "monitor": "plateau"}
        return f"{list(self.layers)} at {when[self.trigger]}"


@dataclass(frozen=True)
class ThawPlan:
    """The whole schedule: the managed layer names (head last), what trains from the start, the phases."""

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

    def signature(self) -> list[str]:
        """A comparable description (a resumed run must follow the same plan)."""
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


# ---------------------------------------------------------------------------------------------- plans
def build_plan(
    layers: Sequence[str],
    *,
    every_n_epochs: int | None = 1,
    every_n_steps: int | None = None,
    groups_per_step: int = 1,
    phases: Any = None,
    monitor: str | None = None,
) -> ThawPlan:
    """The thaw plan for the managed ``layers`` (in model order, the head last).

    Exactly one trigger is used: explicit ``phases``; else the metric (``monitor``: the next
    ``groups_per_step`` layers thaw at each plateau); else ``every_n_steps``; else ``every_n_epochs``
    (the default). In the automatic schedules the last layer (the head) trains from the start and the
    others thaw from the top down, ``groups_per_step`` at a time.
    """
    names = tuple(layers)
    if not names:
        raise PhaseError("progressive unfreezing needs at least one layer")
    if len(set(names)) != len(names):
        raise PhaseError(f"layer names must be unique, got {list(names)}")
    _check_positive_int("groups_per_step", groups_per_step)
    if every_n_steps is not None:
        _check_positive_int("every_n_steps", every_n_steps)
    if every_n_epochs is not None:
        _check_positive_int("every_n_epochs", every_n_epochs)
    if phases is not None:
        if every_n_steps is not None or groups_per_step != 1 or every_n_epochs not in (None, 1):
            raise PhaseError(
                "give either phases=[...] or an automatic schedule (every_n_epochs / every_n_steps / "
                "groups_per_step), not both"
            )
        return _explicit_plan(names, phases, monitor)
    if monitor is not None:
        if every_n_steps is not None or every_n_epochs not in (None, 1):
            raise PhaseError(
                f"monitor={monitor!r} thaws at each plateau; every_n_epochs/every_n_steps cannot be set with it"
            )
        step_of = None
    elif every_n_steps is not None:
        if every_n_epochs not in (None, 1):
            raise PhaseError("set every_n_epochs or every_n_steps, not both")
        step_of = ("at_step", every_n_steps)
    elif every_n_epochs is not None:
        step_of = ("at_epoch", every_n_epochs)
    else:
        raise PhaseError("no thaw trigger: set every_n_epochs, every_n_steps, monitor or phases")
    below_head = list(reversed(names[:-1]))  # top down: the layer right below the head first
    out = []
    for i in range(0, len(below_head), groups_per_step):
        chunk = below_head[i : i + groups_per_step]
        trigger = {} if step_of is None else {step_of[0]: (i // groups_per_step + 1) * step_of[1]}
        out.append(Phase(layers=tuple(n for n in names if n in chunk), **trigger))
    return ThawPlan(layers=names, initial=(names[-1],), phases=tuple(out))


def _explicit_plan(names: tuple[str, ...], phases: Any, monitor: str | None) -> ThawPlan:
    phases = plain(phases)
    if isinstance(phases, (str, bytes, Mapping)) or not isinstance(phases, Sequence):
        raise PhaseError(
            f"phases must be a list of mappings like {{layers: ..., at_epoch: 2}}, got {phases!r}"
        )
    if not phases:
        raise PhaseError("phases=[] is empty; give at least one phase or leave phases unset")
    owner: dict[str, int] = {}
    parsed: list[Phase] = []
    for i, raw in enumerate(phases):
        phase = _parse_phase(i, raw, names, monitor)
        for name in phase.layers:
            if name in owner:
                raise PhaseError(
                    f"phases {owner[name]} and {i} both thaw layer {name!r}; phases must be disjoint"
                )
            owner[name] = i
        parsed.append(phase)
    # A phase at epoch/step 0 trains from the start, like every layer that no phase names.
    at_start = {n for p in parsed if p.at_epoch == 0 or p.at_step == 0 for n in p.layers}
    initial = tuple(n for n in names if n not in owner or n in at_start)
    later = tuple(p for p in parsed if not (p.at_epoch == 0 or p.at_step == 0))
    start = tuple(p for p in parsed if p.at_epoch == 0 or p.at_step == 0)
    return ThawPlan(layers=names, initial=initial, phases=later, start_phases=start)


def _parse_phase(i: int, raw: Any, names: tuple[str, ...], monitor: str | None) -> Phase:
    if not isinstance(raw, Mapping):
        raise PhaseError(f"phase {i}: expected a mapping like {{layers: ..., at_epoch: 2}}, got {raw!r}")
    unknown = sorted(set(raw) - set(PHASE_KEYS))
    if unknown:
        raise PhaseError(f"phase {i}: unknown key(s) {unknown}; allowed keys are {list(PHASE_KEYS)}")
    if "layers" not in raw:
        raise PhaseError(
            f"phase {i}: 'layers' is missing (a layer name, glob, 're:' regex, or a list of them)"
        )
    at_epoch, at_step = raw.get("at_epoch"), raw.get("at_step")
    for key, value in (("at_epoch", at_epoch), ("at_step", at_step)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise PhaseError(f"phase {i}: {key} must be a non-negative integer, got {value!r}")
    if at_epoch is not None and at_step is not None:
        raise PhaseError(f"phase {i}: set at_epoch or at_step, not both")
    if monitor is None and at_epoch is None and at_step is None:
        raise PhaseError(
            f"phase {i}: needs at_epoch or at_step (or set monitor=... to thaw the phases at each plateau)"
        )
    if monitor is not None and (at_epoch is not None or at_step is not None):
        raise PhaseError(
            f"phase {i}: with monitor={monitor!r} the phases thaw in list order at each plateau; "
            "remove at_epoch/at_step"
        )
    lr, lr_ratio = raw.get("lr"), raw.get("lr_ratio")
    if lr is not None and lr_ratio is not None:
        raise PhaseError(f"phase {i}: set lr or lr_ratio, not both")
    for key, value in (("lr", lr), ("lr_ratio", lr_ratio)):
        if value is not None and not (_is_number(value) and value > 0 and math.isfinite(value)):
            raise PhaseError(f"phase {i}: {key} must be a positive number, got {value!r}")
    matched = match_layers(raw["layers"], names, where=f"phase {i}")
    return Phase(
        layers=tuple(n for n in names if n in matched),
        at_epoch=at_epoch,
        at_step=at_step,
        lr=None if lr is None else float(lr),
        lr_ratio=None if lr_ratio is None else float(lr_ratio),
    )


def match_layers(spec: Any, names: Sequence[str], where: str = "layers") -> list[str]:
    """The managed layer names that ``spec`` selects, in model order.

    ``spec`` is a string or a list of strings; each is an exact layer name, a glob (``backbone.*``), a
    regex written ``re:...``, or the name of a module that contains layers (``backbone`` selects
    ``backbone.0``, ``backbone.1``, ...). Each string must select at least one layer.
    """
    spec = plain(spec)
    specs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Sequence) else None
    if not specs or not all(isinstance(s, str) for s in specs):
        raise PhaseError(f"{where}: layers must be a string or a non-empty list of strings, got {spec!r}")
    hits: set[str] = set()
    for one in specs:
        found = _match_one(one, names, where)
        if not found:
            close = difflib.get_close_matches(one.removeprefix("re:"), list(names), n=5, cutoff=0.3)
            raise PhaseError(
                f"{where}: {one!r} matches none of the managed layers {list(names)}"
                + (f"; closest: {close}" if close else "")
            )
        hits.update(found)
    return [n for n in names if n in hits]


def _match_one(spec: str, names: Sequence[str], where: str) -> list[str]:
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as err:
            raise PhaseError(f"{where}: bad regex {spec!r}: {err}") from None
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if n == spec or fnmatch.fnmatchcase(n, spec) or n.startswith(spec + ".")]


# ---------------------------------------------------------------------------------------------- learning rates
def target_lr(
    plan: ThawPlan, name: str, head_lr: float, lr_decay: float, phase: Phase | None = None
) -> float:
    """The base LR a layer trains at: the phase's ``lr`` / ``lr_ratio`` if set, else ``head_lr / lr_decay**k``."""
    if phase is not None and phase.lr is not None:
        return phase.lr
    if phase is not None and phase.lr_ratio is not None:
        return head_lr * phase.lr_ratio
    return head_lr / lr_decay ** plan.depth(name)


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

    def __init__(self, mode: str = "min", patience: int = 1, min_delta: float = 0.0) -> None:
        if mode not in MODES:
            raise PhaseError(f"mode={mode!r} is not supported; use 'min' or 'max'")
        _check_positive_int("patience", patience)
        if not (_is_number(min_delta) and min_delta >= 0):
            raise PhaseError(f"min_delta must be a non-negative number, got {min_delta!r}")
        self.mode, self.patience, self.min_delta = mode, patience, float(min_delta)
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


# ---------------------------------------------------------------------------------------------- helpers
def plain(obj: Any) -> Any:
    """OmegaConf ``ListConfig`` / ``DictConfig`` (Hydra YAML) as plain lists and dicts; anything else as is."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PhaseError(f"{name} must be a positive integer, got {value!r}")
