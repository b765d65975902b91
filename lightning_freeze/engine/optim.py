"""Per-layer named param groups, learning-rate control and LR-scheduler bookkeeping.

The user's optimizer is split once, at fit start, into one group per managed layer (named after the
layer, so ``LearningRateMonitor`` shows readable names) plus the groups for everything else. A group
keeps existing while its layer is frozen, only its parameter list is emptied, so schedulers always see
the same number of groups and a frozen group's LR keeps following the schedule. Thawing refills the
list; an optional new base LR rescales every LR-valued entry of that group in the optimizer and in
every attached scheduler.

This module is the only code that reads or writes a param group's learning rate:

- :func:`base_lr` is the one definition of a group's nominal LR (what a user would write for it);
- :func:`set_base_lr` gives a group a new base LR, keeping the factor its scheduler applies now;
- :func:`set_lr_factors` sets groups' LRs to factors of their base LRs in one pass (FreezeOut's per-layer
  schedule, every step);
- :class:`StepScale` multiplies chosen groups' LRs only while ``optimizer.step()`` runs (warm-up), so
  schedulers that read ``group["lr"]`` never see the multiplier.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as torch_schedulers

from lightning_freeze.engine.layers import Layer

# Scheduler attributes that hold one entry per param group, in torch's own schedulers.
_PER_GROUP_ATTRS = (
    "base_lrs",
    "_last_lr",
    "min_lrs",
    "lr_lambdas",
    "max_lrs",
    "base_momentums",
    "max_momentums",
)
# Of those, the ones that are learning rates (rescaled when a group gets a new base LR).
_LR_ATTRS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
# LR-valued keys that schedulers store inside the param group itself (OneCycleLR, all LRSchedulers).
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Attributes of torch's schedulers that are lists but not per group.
_NOT_PER_GROUP = ("_schedulers", "_milestones", "milestones", "_step_count_history")


class SchedulerAdaptError(TypeError):
    """An LR scheduler whose per-group state the callbacks cannot keep in step with new param groups."""


@dataclass(frozen=True)
class GroupLayout:
    """How the per-layer param groups are laid out: which groups a layer owns, where each group's
    hyperparameters came from (so per-group scheduler state can follow it), and each managed
    parameter's group."""

    layer_groups: dict[str, list[int]]  # layer name -> indices of its groups (one per source group)
    source: list[int]  # new group index -> index of the user's group it copies hyperparameters from
    param_group: dict[int, int]  # id(param) of a managed param -> index of the group it belongs in


def split_into_layer_groups(
    optimizer: Optimizer,
    layers: Sequence[Layer],
    trainable: Iterable[torch.nn.Parameter],
    schedulers: Sequence[object] = (),
    param_names: dict[int, str] | None = None,
    empty_groups_last: bool = False,
) -> GroupLayout:
    """Rebuild ``optimizer.param_groups`` as named groups per layer, then the user's remaining groups.

    A layer whose parameters sit in one of the user's groups gets one group named after it; one spread
    over several user groups (say, weight decay off for biases) gets one group per user group, named
    ``layer/<user group name or index>``. Each copies the hyperparameters of its user group; parameters
    missing from the optimizer (the user filtered ``requires_grad``) join the layer's first group, or copy
    the user's first group. Only ``trainable`` parameters are put in; the rest wait for a thaw.
    Schedulers are adapted in place. Every group records its base LR as ``initial_lr`` (torch's
    schedulers do the same), so a plateau scheduler's reductions survive a later :func:`set_base_lr`.
    """
    for scheduler in schedulers:
        check_adaptable(scheduler, len(optimizer.param_groups))
    old_groups = optimizer.param_groups
    group_of = {id(p): i for i, g in enumerate(old_groups) for p in g["params"]}
    managed = {id(p) for layer in layers for p in layer.params}
    live = {id(p) for p in trainable}

    # A tied parameter (in several layers) trains in the group of the last layer that uses it: the one
    # that trains longest when layers freeze front to back or thaw back to front.
    home = {id(p): layer.name for layer in layers for p in layer.params}
    new_groups: list[dict] = []
    source: list[int] = []
    layer_groups: dict[str, list[int]] = {}
    param_group: dict[int, int] = {}
    for layer in layers:
        own = [p for p in layer.params if home[id(p)] == layer.name]
        sources = sorted({group_of[id(p)] for p in own if id(p) in group_of}) or [0]
        index_of_source = {}
        for src in sources:
            group = {k: v for k, v in old_groups[src].items() if k != "params"}
            suffix = old_groups[src].get("name", str(src))
            group["name"] = layer.name if len(sources) == 1 else f"{layer.name}/{suffix}"
            group["params"] = []
            index_of_source[src] = len(new_groups)
            new_groups.append(group)
            source.append(src)
        for p in own:
            index = index_of_source[group_of.get(id(p), sources[0])]
            param_group[id(p)] = index
            if id(p) in live:
                new_groups[index]["params"].append(p)
        layer_groups[layer.name] = list(index_of_source.values())
    for i, old in enumerate(old_groups):
        rest = [p for p in old["params"] if id(p) not in managed]
        if rest:
            group = dict(old)
            group["params"] = rest
            group.setdefault(
                "name",
                _common_module(rest, param_names or {}) or ("rest" if len(old_groups) == 1 else f"rest/{i}"),
            )
            new_groups.append(group)
            source.append(i)

    if empty_groups_last:
        # torch's distributed optimizer state dict maps a group without parameters to the *last* saved group
        # (torch/distributed/checkpoint/state_dict.py, _split_optim_state_dict): it must be the last group.
        empty = {i for indices in layer_groups.values() for i in indices} - set(param_group.values())
        order = [i for i in range(len(new_groups)) if i not in empty] + sorted(empty)
        position = {old: new for new, old in enumerate(order)}
        new_groups = [new_groups[i] for i in order]
        source = [source[i] for i in order]
        layer_groups = {name: [position[i] for i in indices] for name, indices in layer_groups.items()}
        param_group = {pid: position[i] for pid, i in param_group.items()}
    for p in [p for p in optimizer.state if id(p) in managed and id(p) not in live]:
        del optimizer.state[p]
    for group in new_groups:
        group.setdefault("initial_lr", group["lr"])
    optimizer.param_groups = new_groups
    for scheduler in schedulers:
        _remap_scheduler(scheduler, source)
    return GroupLayout(layer_groups=layer_groups, source=source, param_group=param_group)


def _common_module(params: list[torch.nn.Parameter], param_names: dict[int, str]) -> str:
    """The deepest module that holds all of ``params`` (``head`` for a classifier head), or ''."""
    paths = [param_names.get(id(p), "").split(".")[:-1] for p in params]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def check_adaptable(scheduler: object, n_groups: int) -> None:
    """Raise :class:`SchedulerAdaptError` for a scheduler with per-group state we do not know how to split."""
    for child in getattr(scheduler, "_schedulers", ()):
        check_adaptable(child, n_groups)
    if type(scheduler).__module__ == torch_schedulers.__name__:
        return
    unknown = [
        name
        for name, value in vars(scheduler).items()
        if isinstance(value, (list, tuple))
        and len(value) == n_groups
        and name not in _PER_GROUP_ATTRS
        and name not in _NOT_PER_GROUP
    ]
    if unknown:
        raise SchedulerAdaptError(
            f"LR scheduler {type(scheduler).__name__} keeps per-param-group state in {unknown}, which the freezing "
            "callbacks cannot split into per-layer groups. Use one of torch.optim.lr_scheduler's schedulers (or a "
            "LambdaLR), or store that state in base_lrs/lr_lambdas"
        )


def _remap_scheduler(scheduler: object, source: list[int]) -> None:
    for child in getattr(scheduler, "_schedulers", ()):
        _remap_scheduler(child, source)
    for attr in _PER_GROUP_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, (list, tuple)):
            setattr(scheduler, attr, [values[s] for s in source])


def schedulers_of(scheduler: object) -> list[object]:
    """The scheduler and every scheduler nested in it (SequentialLR, ChainedScheduler)."""
    found = [scheduler]
    for child in getattr(scheduler, "_schedulers", ()):
        found.extend(schedulers_of(child))
    return found


def base_lr(optimizer: Optimizer, schedulers: Iterable[object], index: int) -> float:
    """The group's nominal LR: the number a user would write for it.

    That is OneCycleLR's peak (``max_lr``, kept in the group), else what the schedule scales
    (``base_lrs``), else the LR the group started with (``initial_lr``, recorded when the groups are
    split), else its plain LR.
    """
    group = optimizer.param_groups[index]
    if "max_lr" in group:
        return float(group["max_lr"])
    for top in schedulers:
        for scheduler in schedulers_of(top):
            base = getattr(scheduler, "base_lrs", None)
            if base is not None:
                return float(base[index])
    return _own_base_lr(group)


def current_lr(optimizer: Optimizer, index: int) -> float:
    """The LR group ``index`` trains with at the next step (before any :class:`StepScale`)."""
    return float(optimizer.param_groups[index]["lr"])


def _rescale(optimizer: Optimizer, schedulers: Iterable[object], index: int, ratio: float) -> None:
    """Multiply every LR-valued entry of group ``index`` by ``ratio``, in the optimizer and in the schedulers.

    The group then behaves as if it had been created with a base LR ``ratio`` times larger: a scheduler
    that is part way through its schedule keeps applying the same factor to it.
    """
    group = optimizer.param_groups[index]
    for key in _GROUP_LR_KEYS:
        if key in group:
            group[key] = group[key] * ratio
    for top in schedulers:
        for scheduler in schedulers_of(top):
            for attr in _LR_ATTRS:
                values = getattr(scheduler, attr, None)
                if isinstance(values, list) and index < len(values):
                    values[index] = values[index] * ratio


def set_base_lr(optimizer: Optimizer, schedulers: Sequence[object], index: int, lr: float) -> None:
    """Give group ``index`` the base LR ``lr``, keeping whatever factor its schedule currently applies."""
    current = base_lr(optimizer, schedulers, index)
    if current == lr:
        return
    if current == 0:
        raise ValueError(
            f"param group {optimizer.param_groups[index].get('name', index)!r} has base LR 0; cannot rescale"
        )
    _rescale(optimizer, schedulers, index, lr / current)


def set_lr_factors(optimizer: Optimizer, indices: Sequence[int], factors: Sequence[float]) -> None:
    """Set each group in ``indices`` to the matching factor times its base LR, in one pass over the groups.

    For a callback that is the LR schedule (no scheduler attached): a per-step update of every group.
    """
    groups = optimizer.param_groups
    for index, factor in zip(indices, factors, strict=True):
        group = groups[index]
        group["lr"] = _own_base_lr(group) * factor


def _own_base_lr(group: dict) -> float:
    """A group's base LR from its own entries: OneCycleLR's peak, else the LR it started with, else its LR."""
    if "max_lr" in group:
        return float(group["max_lr"])
    return float(group.get("initial_lr", group["lr"]))


class StepScale:
    """Multiply the LR of chosen groups only while ``optimizer.step()`` runs.

    Torch step pre/post hooks apply ``factors`` (group index -> multiplier) right before the update and
    undo them right after, so an LR scheduler that reads or chains on ``group["lr"]`` never sees them.
    Set :attr:`factors` before each step; :meth:`remove` takes the hooks off (and undoes a pending scale).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.factors: dict[int, float] = {}
        self._unscaled: dict[int, float] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._scale),
            optimizer.register_step_post_hook(self._unscale),
        ]

    def _scale(self, *_: object) -> None:
        self._unscale()
        for index, factor in self.factors.items():
            group = self.optimizer.param_groups[index]
            self._unscaled[index] = group["lr"]
            group["lr"] = group["lr"] * factor

    def _unscale(self, *_: object) -> None:
        for index, lr in self._unscaled.items():
            self.optimizer.param_groups[index]["lr"] = lr
        self._unscaled = {}

    def remove(self) -> None:
        self._unscale()
        for handle in self._handles:
            handle.remove()
        self._handles = []
