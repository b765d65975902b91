"""Naming layers: turn a layer spec into an ordered list of :class:`Layer`.

A spec is a string or a list of strings. Each string is a glob on qualified module names
(``backbone.*``), a regex written ``re:...``, or ``auto`` (optionally sliced: ``auto[:-1]``).
A glob or regex yields one layer per top-most matching module that owns parameters; ``auto``
yields the parameter-owning blocks of the model in forward-execution order.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_freeze.rules.checks import AUTO_SPEC, check_layer_spec

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class LayerSpecError(ValueError):
    """A layer spec that matches nothing, matches a parameter twice, or cannot be parsed."""


@dataclass(frozen=True, eq=False)
class Layer:
    """One unit that a callback freezes, thaws and gives its own optimizer param group."""

    name: str
    modules: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def select_layers(
    model: nn.Module, spec: str | Sequence[str] = "auto", example_input: Any = None
) -> list[Layer]:
    """Resolve ``spec`` on ``model`` into ordered layers.

    ``auto`` needs one forward pass: pass ``example_input`` or set ``model.example_input_array``.

    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    >>> model.head = nn.Linear(8, 2)
    >>> [layer.name for layer in select_layers(model, "backbone.*")]   # parameter-owning children only
    ['backbone.0', 'backbone.2']
    >>> [layer.name for layer in select_layers(model, ["re:backbone\\.0", "head"])]
    ['backbone.0', 'head']
    >>> [layer.name for layer in select_layers(model, "auto", example_input=torch.zeros(1, 4))]
    ['backbone.0', 'backbone.2', 'head']
    """
    specs = check_layer_spec(spec, error=LayerSpecError)
    specs = [specs] if isinstance(specs, str) else specs
    named = dict(model.named_modules())
    layers = [layer for one in specs for layer in _resolve_one(model, named, one, example_input, "layers")]
    _check_disjoint(layers)
    return layers


def layers_within(
    model: nn.Module, spec: str | Sequence[str], layers: Sequence[Layer], where: str = "layers"
) -> list[str]:
    """Names of the managed ``layers`` that ``spec`` covers, in their order.

    ``spec`` means what it means for :func:`select_layers`: ``backbone`` is the module ``backbone``, so it
    covers the managed layers ``backbone.0``, ``backbone.1``, ... inside it. Each string must cover at
    least one managed layer, and no string may cover only part of one (a phase thaws whole layers).
    """
    specs = check_layer_spec(spec, where=where, error=LayerSpecError)
    specs = [specs] if isinstance(specs, str) else specs
    named = dict(model.named_modules())
    covered: set[str] = set()
    for one in specs:
        selected = {id(p) for layer in _resolve_one(model, named, one, None, where) for p in layer.params}
        hits = []
        for layer in layers:
            inside = sum(id(p) in selected for p in layer.params)
            if inside and inside < len(layer.params):
                raise LayerSpecError(
                    f"{where}: {one!r} covers only part of the layer {layer.name!r}; name whole layers "
                    f"(the managed layers are {[m.name for m in layers]})"
                )
            if inside:
                hits.append(layer.name)
        if not hits:
            raise LayerSpecError(
                f"{where}: {one!r} covers none of the managed layers {[m.name for m in layers]}"
            )
        covered.update(hits)
    return [layer.name for layer in layers if layer.name in covered]


def _resolve_one(
    model: nn.Module, named: dict[str, nn.Module], spec: str, example_input: Any, where: str
) -> list[Layer]:
    auto = AUTO_SPEC.match(spec.strip())
    if auto:
        found = _sliced(_auto_layers(model, example_input), auto.groups(), spec)
    else:
        found = [_make_layer(name, named[name]) for name in _matching_names(named, spec)]
    if not found:
        raise LayerSpecError(_no_match_message(spec, named, where))
    return found


def _make_layer(name: str, module: nn.Module) -> Layer:
    return Layer(name=name or "<root>", modules=(module,), params=tuple(module.parameters()))


def _matching_names(named: dict[str, nn.Module], spec: str) -> list[str]:
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as err:
            raise LayerSpecError(f"layers: bad regex {spec!r}: {err}") from None
        hits = [n for n in named if n and pattern.fullmatch(n)]
    else:
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, spec)]
    hits = [n for n in hits if _owns_params(named[n])]
    hit_set = set(hits)
    # A match inside another match belongs to the outer one: ``backbone.*`` gives the blocks, not their convs.
    return [n for n in hits if not any(a in hit_set for a in _ancestors(n))]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _owns_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _sliced(names: list[Layer], groups: tuple[str | None, ...], spec: str) -> list[Layer]:
    if groups == (None, None, None):
        return names
    start, stop, step = (int(g) if g not in (None, "") else None for g in groups)
    if groups[1] is None:  # auto[i]: a single index
        if start is None or not -len(names) <= start < len(names):
            found = [layer.name for layer in names]
            raise LayerSpecError(f"layers: {spec!r} is out of range; auto found {len(names)} blocks: {found}")
        return [names[start]]
    return names[slice(start, stop, step)]


def _auto_layers(model: nn.Module, example_input: Any = None) -> list[Layer]:
    """The parameter-owning blocks of ``model``, in the order the forward pass first calls them.

    Containers (Sequential, ModuleList, ModuleDict) and single-child wrappers are opened up; any other
    module that owns parameters is one block. Parameters held directly by an opened module form a block
    under that module's own name. Blocks the forward pass never calls are left out.
    """
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise LayerSpecError(
            "layers='auto' needs one forward pass to find the execution order: set `example_input_array` "
            "on your LightningModule, or name the layers explicitly (e.g. layers='backbone.*')"
        )
    candidates = _candidate_blocks(model, "", force_open=True)
    # A model that is one big block (a LightningModule holding ``self.model = ResNet()``) is opened up.
    while (
        len(candidates) == 1
        and not candidates[0][2]
        and any(_owns_params(c) for c in candidates[0][1].children())
    ):
        candidates = _candidate_blocks(candidates[0][1], candidates[0][0], force_open=True)
    order: dict[str, int] = {}
    handles = []
    for name, module, _ in candidates:

        def hook(mod, args, name=name):  # noqa: ARG001 - signature fixed by torch
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            _call_forward(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in was_training.items():
            module.training = mode
    layers = {
        name: Layer(name or "<root>", (), tuple(module.parameters(recurse=False)))
        if own_only
        else _make_layer(name, module)
        for name, module, own_only in candidates
    }
    return [layers[name] for name in sorted(order, key=order.__getitem__)]


def _call_forward(model: nn.Module, example_input: Any) -> None:
    device = next(model.parameters()).device
    moved = _to_device(example_input, device)
    if isinstance(moved, tuple):
        model(*moved)
    elif isinstance(moved, dict):
        model(**moved)
    else:
        model(moved)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _candidate_blocks(
    module: nn.Module, prefix: str, force_open: bool = False
) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, own_only) per block; own_only blocks hold just the module's direct parameters."""
    children = [(n, c) for n, c in module.named_children() if _owns_params(c)]
    own = next(module.parameters(recurse=False), None) is not None
    opened = force_open or isinstance(module, _CONTAINERS) or (len(children) == 1 and not own)
    if not opened:
        return [(prefix, module, False)]
    # Parameters held directly by an opened module form a block of their own (no submodules: no mode to manage).
    found: list[tuple[str, nn.Module, bool]] = [(prefix, module, True)] if own else []
    for name, child in children:
        found.extend(_candidate_blocks(child, f"{prefix}.{name}" if prefix else name))
    return found


def _check_disjoint(layers: list[Layer]) -> None:
    owner: dict[int, str] = {}
    for layer in layers:
        for p in layer.params:
            if id(p) in owner and owner[id(p)] != layer.name:
                raise LayerSpecError(
                    f"layers: {layer.name!r} and {owner[id(p)]!r} share parameters; each parameter may belong "
                    "to one layer only. Narrow one of the specs."
                )
            owner[id(p)] = layer.name
    names = [layer.name for layer in layers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LayerSpecError(f"layers: {dupes} are selected more than once; list each layer once")


def _no_match_message(spec: str, named: dict[str, nn.Module], where: str) -> str:
    names = [n for n, m in named.items() if n and _owns_params(m)]
    probe = spec[3:] if spec.startswith("re:") else spec
    close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3)
    if not close:
        close = [n for n in names if "." not in n][:8]
    return f"{where}: {spec!r} matches no parameter-owning module. Closest module names: {close}"
