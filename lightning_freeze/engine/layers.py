"""Naming layers: turn a layer spec into an ordered list of :class:`Layer`.

A spec is a string or a list of strings. Each string is a glob on qualified module names
(``backbone.*``), a regex written ``re:...``, or ``auto`` (optionally sliced: ``auto[:-1]``).
A glob or regex yields one layer per top-most matching module that owns parameters.

``auto`` yields the model's blocks in the order the forward pass first calls them:

1. A *repeated container* is an ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict`` with at least
   two parameter-owning children, all of one class (BERT's ``encoder.layer``, GPT-2's ``h``, a ResNet
   stage's blocks). Its children are blocks, and they are never split further.
2. Descending from the model, a module that contains a repeated container (at any depth) is opened:
   its direct parameters, if any, form a block named after it, and each parameter-owning child is
   examined in turn. Any other parameter-owning module is one block.
3. If that leaves a single block that has parameter-owning children (``self.model = MLP()``), it is
   opened into them, until there are at least two blocks.
4. The blocks are ordered by one forward pass in eval mode without gradients, on
   ``example_input`` (or ``model.example_input_array``, or a batch the caller found); blocks the
   forward pass never calls are left out.

So BERT gives its embeddings, each encoder layer, the pooler and the classifier; a ResNet its stem,
its stages (or residual blocks) and the classifier.

Tied parameters (one tensor held by two modules, e.g. GPT-2's ``wte`` and ``lm_head``) may belong to
several layers; the freezing engine keeps such a parameter trainable while any user of it trains.
Module names of a ``torch.compile``'d submodule are written without ``_orig_mod``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_freeze.engine.example import ExampleCallError, call_with_example
from lightning_freeze.engine.sharding import clean_name, is_wrapper
from lightning_freeze.validation import AUTO_SPEC, check_layer_spec

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class LayerSpecError(ValueError):
    """A layer spec that matches nothing, selects a module twice, or cannot be parsed."""


@dataclass(frozen=True, eq=False)
class Layer:
    """One unit that a callback freezes, thaws and gives its own optimizer param group.

    ``modules`` are the modules whose mode (eval while frozen) the layer manages. A layer made of a
    module's own parameters only (``auto`` opening a module that holds parameters directly) has no
    modules to manage; ``holder`` is that module.
    """

    name: str
    modules: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...] = field(repr=False)
    holder: nn.Module | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def covers(self, module: nn.Module) -> bool:
        """Whether ``module``'s direct parameters, where the layer has them, are the layer's."""
        if self.holder is not None:
            return module is self.holder
        return any(module is m for top in self.modules for m in top.modules())


class ForwardOrderError(LayerSpecError):
    """``auto`` could not run the model once to find the order of its blocks."""


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified module names as a user writes them: the parts wrappers insert (``torch.compile``'s ``_orig_mod``,
    FSDP1's ``_fsdp_wrapped_module``, activation checkpointing's) left out, and the wrappers themselves."""
    named: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if is_wrapper(module):
            continue
        named.setdefault(clean_name(name), module)
    return named


def _is_compiled_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def select_layers(
    model: nn.Module, spec: str | Sequence[str] = "auto", example_input: Any = None
) -> list[Layer]:
    """Resolve ``spec`` on ``model`` into ordered layers.

    ``auto`` needs one forward pass: pass ``example_input`` (what ``model`` is called with: a tensor, a
    tuple of positional arguments, a dict of keyword arguments, or a batch as a loader yields it) or set
    ``model.example_input_array``. The freezing callbacks pass the first sample batch of the training data.

    Args:
        model: the module whose layers are named (a LightningModule or any ``nn.Module``).
        spec: a glob on qualified module names (``"backbone.*"``), a regex written ``"re:..."``, ``"auto"``
            (the parameter-owning blocks in forward order, sliceable like a list: ``"auto[:-1]"``), or a list
            of them; the layers come in the order of the list, each string's matches in model order.
        example_input: what ``model`` is run on once for ``auto`` (None: ``model.example_input_array``).

    Returns:
        The layers (name, modules, parameters), in order.

    Raises:
        LayerSpecError: a spec that matches nothing (the message lists the closest module names), selects a
            module twice, or cannot be parsed; :class:`ForwardOrderError` when ``auto`` cannot run the model.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    >>> model.head = nn.Linear(8, 2)
    >>> [layer.name for layer in select_layers(model, "backbone.*")]   # parameter-owning children only
    ['backbone.0', 'backbone.2']
    >>> [layer.name for layer in select_layers(model, ["re:backbone\\\\.0", "head"])]
    ['backbone.0', 'head']
    >>> [layer.name for layer in select_layers(model, "auto", example_input=torch.zeros(1, 4))]
    ['backbone.0', 'backbone.2', 'head']
    """
    return resolve_layers(model, check_layer_spec(spec, error=LayerSpecError), example_input)


def resolve_layers(model: nn.Module, spec: str | Sequence[str], example_input: Any = None) -> list[Layer]:
    """:func:`select_layers` for a spec whose syntax is already checked (a callback checks its ``layers`` in its
    constructor, where the value enters)."""
    specs = [spec] if isinstance(spec, str) else spec
    named = named_modules(model)
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
    named = named_modules(model)
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
        found = _sliced(auto_layers(model, example_input), auto.groups(), spec)
    else:
        found = [_make_layer(name, named[name]) for name in _matching_names(named, spec)]
    if not found:
        raise LayerSpecError(_no_match_message(spec, named, where))
    return found


def _make_layer(name: str, module: nn.Module) -> Layer:
    return Layer(name=name or "<root>", modules=(module,), params=tuple(module.parameters()))


def _matching_names(named: dict[str, nn.Module], spec: str) -> list[str]:
    if spec.startswith("re:"):
        pattern = re.compile(spec[3:])
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


def _sliced(layers: list[Layer], groups: tuple[str | None, ...], spec: str) -> list[Layer]:
    if groups == (None, None, None):
        return layers
    start, stop, step = (int(g) if g not in (None, "") else None for g in groups)
    if groups[1] is None:  # auto[i]: a single index
        if start is None or not -len(layers) <= start < len(layers):
            found = [layer.name for layer in layers]
            raise LayerSpecError(
                f"layers: {spec!r} is out of range; auto found {len(layers)} blocks: {found}"
            )
        return [layers[start]]
    return layers[slice(start, stop, step)]


# ---------------------------------------------------------------------------------------------- auto
def auto_layers(model: nn.Module, example_input: Any = None) -> list[Layer]:
    """The blocks of ``model`` in forward order (the rule is in this module's docstring)."""
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ForwardOrderError(
            "layers='auto' needs one forward pass to find the execution order, and no example input was found: "
            "set `example_input_array` on your LightningModule, or name the layers explicitly "
            "(e.g. layers='backbone.*')"
        )
    candidates = blocks_of(model)
    order = _first_calls(model, [(name, module) for name, module, _ in candidates], example_input)
    layers = {
        name: Layer(name or "<root>", (), tuple(module.parameters(recurse=False)), holder=module)
        if own_only
        else _make_layer(name, module)
        for name, module, own_only in candidates
    }
    return [layers[name] for name in order]


def _first_calls(model: nn.Module, hooked: Sequence[tuple[str, nn.Module]], example: Any) -> list[str]:
    """The names in ``hooked`` in the order one forward pass on ``example`` first enters their modules."""
    order: dict[str, int] = {}
    handles = []
    for name, module in hooked:

        def hook(mod: nn.Module, args: Any, name: str = name) -> None:  # noqa: ARG001 - torch's signature
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        call_with_example(model, example)
    except ExampleCallError as err:
        raise ForwardOrderError(
            f"layers='auto' needs one forward pass to find the order of its blocks, but it {err}, or name the "
            "layers explicitly (e.g. layers='backbone.*')"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return sorted(order, key=order.__getitem__)


def forward_order(model: nn.Module, layers: Sequence[Layer], example: Any) -> list[str]:
    """The names of ``layers`` in the order one forward pass on ``example`` first calls them."""
    hooked = [
        (layer.name, module)
        for layer in layers
        for module in layer.modules or ((layer.holder,) if layer.holder is not None else ())
    ]
    return _first_calls(model, hooked, example)


def check_forward_order(
    model: nn.Module, layers: Sequence[Layer], example: Any, spec: Any, where: str
) -> None:
    """Raise :class:`LayerSpecError` when ``layers`` are not listed in forward order (the head last)."""
    called = forward_order(model, layers, example)
    listed = [layer.name for layer in layers if layer.name in called]
    if listed != called:
        raise LayerSpecError(
            f"{where}: layers={spec!r} lists the layers in the order {listed}, but the forward pass runs them in "
            f"the order {called}. The order matters here (the last layer is the head): list them in forward "
            "order, or use layers='auto'."
        )


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, own_only)`` per ``auto`` block, in registration order; ``own_only`` blocks hold just
    the module's direct parameters."""
    repeated = _modules_with_repeats(model)
    blocks = _open(model, "", repeated)
    while len(blocks) == 1 and not blocks[0][2] and any(_owns_params(c) for c in blocks[0][1].children()):
        name, module, _ = blocks[0]
        blocks = _open(module, name, repeated, force=True)
    return blocks


def is_repeated_container(module: nn.Module) -> bool:
    """A Sequential/ModuleList/ModuleDict with two or more parameter-owning children, all of one class."""
    if not isinstance(module, _CONTAINERS):
        return False
    kinds = [type(child) for child in module.children() if _owns_params(child)]
    return len(kinds) >= 2 and len(set(kinds)) == 1


def _modules_with_repeats(model: nn.Module) -> set[int]:
    """ids of the modules that contain a repeated container (themselves included)."""
    found: set[int] = set()

    def visit(module: nn.Module) -> bool:
        inside = [visit(child) for child in module.children()]  # every child visited: no short-circuit
        has = is_repeated_container(module) or any(inside)
        if has:
            found.add(id(module))
        return has

    visit(model)
    return found


def _open(
    module: nn.Module, prefix: str, repeated: set[int], force: bool = False
) -> list[tuple[str, nn.Module, bool]]:
    if not force and id(module) not in repeated:
        return [(prefix, module, False)]
    found: list[tuple[str, nn.Module, bool]] = []
    if next(module.parameters(recurse=False), None) is not None:
        found.append((prefix, module, True))
    elements = is_repeated_container(module)
    for name, child in _named_children(module):
        if not _owns_params(child):
            continue
        child_name = f"{prefix}.{name}" if prefix else name
        # Elements of a repeated container are the blocks, even when they hold repeated parts themselves.
        found.extend([(child_name, child, False)] if elements else _open(child, child_name, repeated))
    return found


def _named_children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if _is_compiled_wrapper(child):
            yield name, child._orig_mod  # type: ignore[misc]
        else:
            yield name, child


# ---------------------------------------------------------------------------------------------- checks
def _check_disjoint(layers: list[Layer]) -> None:
    """Two layers may share a parameter only through a tie (one tensor held by two separate modules), never
    because one layer's module contains the other's."""
    names = [layer.name for layer in layers]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise LayerSpecError(f"layers: {dupes} are selected more than once; list each layer once")
    inside: dict[int, str] = {}  # module id -> the layer whose modules contain it
    for layer in layers:
        for top in layer.modules:
            for module in top.modules():
                other = inside.setdefault(id(module), layer.name)
                if other != layer.name:
                    raise LayerSpecError(
                        f"layers: {layer.name!r} and {other!r} contain the same module, so both select its "
                        "parameters; each module may belong to one layer only. Narrow one of the specs."
                    )
    for layer in layers:
        if layer.holder is not None and id(layer.holder) in inside:
            raise LayerSpecError(
                f"layers: the parameters of {layer.name!r} lie inside {inside[id(layer.holder)]!r}; each module "
                "may belong to one layer only. Narrow one of the specs."
            )


def _no_match_message(spec: str, named: dict[str, nn.Module], where: str) -> str:
    names = [n for n, m in named.items() if n and _owns_params(m)]
    probe = spec[3:] if spec.startswith("re:") else spec
    close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3)
    if not close:
        close = [n for n in names if "." not in n][:8]
    return f"{where}: {spec!r} matches no parameter-owning module. Closest module names: {close}"
