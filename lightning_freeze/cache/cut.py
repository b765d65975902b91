"""Where the cache cuts the network: which frozen blocks it skips and which of their outputs it stores.

:func:`plan_cut` takes the frozen prefix the freezing engine reports and turns it into a :class:`Cut`:

1. The *blocks* are the prefix's layers (their modules), from the first on, as long as every parameter
   of a layer is frozen (a tied parameter that still trains elsewhere ends the prefix: GPT-2's ``wte``
   while ``lm_head`` trains) and every module in it is in eval mode or does not care (``norm="train"``
   ends it).
2. The *root* is the innermost module that contains every block (``model.bert`` for BERT's embeddings
   and first encoder layers). If that is a block itself (``backbone`` when ``backbone.*`` is frozen), the
   cut is that module (``kind="module"``): its output is stored, its input is the key.
3. Otherwise (``kind="graph"``) the root's first call in training is recorded
   (:mod:`lightning_freeze.cache.trace`): the *slots* are the block outputs the rest of the network
   needs. From then on the root's own ``forward`` runs at every step with the blocks answered from the
   cache, so everything else, including values computed from the inputs alone, is computed as usual.

:func:`fallback_cut` is the planner of before the graph cut, kept for models whose root is never called
(a ``training_step`` that calls the frozen modules itself): the largest sub-prefix whose parameters are
exactly one module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lightning_freeze.cache.modes import mode_free
from lightning_freeze.cache.store import RowStore
from lightning_freeze.cache.trace import BlockCall, Recording, ValueId, is_ref, plain_output, plain_path
from lightning_freeze.engine.freezing import NORM_TYPES
from lightning_freeze.engine.layers import named_modules

ValueKey = tuple[str, int, tuple[Any, ...]]  # (block name, occurrence, position in its output)


@dataclass(eq=False)
class CallPlan:
    """What to do with one call of a block while serving: skip it (``cacheable``) or run it."""

    name: str
    module: nn.Module = field(repr=False)
    cacheable: bool
    occurrence: int = 0
    spec: Any = field(default=None, repr=False)  # the output's pytree structure
    # per output leaf, in pytree order: its path and what serving returns there: a slot index (a stored row),
    # "tensor" (a placeholder: only skipped blocks read it) or ("const", value)
    leaves: list[tuple[tuple[Any, ...], Any]] = field(default_factory=list, repr=False)
    args: Any = field(default=None, repr=False)  # ("value", ValueKey) / ("tensor", None) / ("const", x) tree

    def value_key(self, path: tuple[Any, ...]) -> ValueKey:
        return (self.name, self.occurrence, path)


@dataclass(eq=False)
class Cut:
    """The part of the network the cache serves (stored as ``FrozenPrefixCache.cut``)."""

    kind: str  # "module" | "graph"
    root: nn.Module = field(repr=False)
    root_name: str
    layer_names: tuple[str, ...]
    blocks: dict[str, nn.Module] = field(repr=False)
    calls: list[CallPlan] = field(default_factory=list)
    slots: list[ValueKey] = field(default_factory=list)
    reads: list[torch.Tensor] = field(default_factory=list, repr=False)  # weights/buffers the glue reads
    prefix_ok: bool = True  # the slots of a sub-batch can be computed without running the rest
    last_needed: int = -1  # index of the last call that produces a slot
    # indices of the calls that reach the server once only the skipped blocks are patched: every call of a module
    # skipped in at least one call (a frozen block never skipped, e.g. GPT-2's position embedding, runs unseen)
    patched_calls: list[int] = field(default_factory=list)
    # parameter-free glue modules whose result depends on their mode, with the mode they were recorded in
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list, repr=False)
    stop: str | None = None  # why the cut ends before the frozen prefix does (None: it serves all of it)

    @property
    def recorded(self) -> bool:
        return bool(self.calls)

    def describe(self) -> str:
        if self.kind == "module":
            return f"module {self.root_name or '<root>'!r}"
        skipped = [c.name for c in self.calls if c.cacheable] or list(self.blocks)
        return f"{len(self.slots) or '?'} output(s) of {_span(skipped)} inside {self.root_name or '<root>'!r}"

    def __str__(self) -> str:
        """What is cached and, when the cut ends early, why: e.g. ``1 output(s) of 'model.conv_proj' inside
        'model'; stops at 'model.encoder.layers.encoder_layer_0': its input depends on the trainable parameter
        'model.class_token' (freeze 'model.class_token' too to cache more)``."""
        return self.describe() + (f"; stops at {self.stop}" if self.stop else "")

    def skipped_modules(self) -> list[nn.Module]:
        if self.kind == "module":
            return [self.root]
        seen: dict[int, nn.Module] = {}
        for c in self.calls:
            if c.cacheable:
                seen.setdefault(id(c.module), c.module)
        return list(seen.values())

    # ------------------------------------------------------------------ from a recording
    def complete(self, rec: Recording) -> str | None:
        """Fill the calls and slots from ``rec``; returns why nothing can be served, or None."""
        slot_of = {vid: s for s, vid in enumerate(sorted(rec.needed))}
        self.calls = [_call_plan(c, slot_of, rec.calls) for c in rec.calls]
        self.slots = [self.calls[vid[0]].value_key(vid[1]) for vid in sorted(rec.needed)]
        self.reads, self.modes = rec.reads, rec.modes
        first = next((c for c in rec.calls if not c.cacheable and not c.glue), None)
        if first is not None:
            remedy = f" ({first.remedy} to cache more)" if first.remedy else ""
            self.stop = f"{first.name!r}: {first.why}{remedy}"
        if not self.slots:
            if first is not None:
                return f"the frozen block {self.stop}"
            if not rec.calls:
                return f"{self.root_name or 'the model'}'s forward called none of the frozen blocks {list(self.blocks)}"
            return "no output of the frozen blocks is used by the rest of the network"
        self.last_needed = max(vid[0] for vid in rec.needed)
        skipped = {id(m) for m in self.skipped_modules()}
        self.patched_calls = [i for i, c in enumerate(self.calls) if id(c.module) in skipped]
        self.prefix_ok = rec.live_before is None or rec.live_before > self.last_needed
        return None

    def complete_module(self, output: Any, batch: int) -> str | None:
        """The ``module`` kind: every tensor of the module's output is a slot."""
        if not plain_output(output):
            return f"{self.root_name!r} returns a {type(output).__name__} that holds more than tensors and constants"
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        if not tensors or any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
            return f"not every tensor {self.root_name!r} returns has the batch ({batch}) first"
        if any(t.requires_grad for t in tensors):
            return f"the output of {self.root_name!r} requires grad, so part of it still trains"
        plan = CallPlan(self.root_name, self.root, True)
        flat, plan.spec = pytree.tree_flatten_with_path(output)
        for path, leaf in flat:
            if isinstance(leaf, torch.Tensor):
                plan.leaves.append((plain_path(path), len(self.slots)))
                self.slots.append(plan.value_key(plain_path(path)))
            else:
                plan.leaves.append((plain_path(path), ("const", leaf)))
        self.calls = [plan]
        self.last_needed = 0
        return None


def _call_plan(c: BlockCall, slot_of: dict[ValueId, int], calls: Sequence[BlockCall]) -> CallPlan:
    def key_of(ref: Any) -> Any:
        if ref[0] == "value":
            i, path = ref[1]
            return ("value", (calls[i].name, calls[i].occurrence, path))
        return ref

    args = None if c.args is None else pytree.tree_map(key_of, c.args, is_leaf=is_ref)
    plan = CallPlan(c.name, c.module, c.cacheable, c.occurrence, args=args)
    if not c.cacheable:
        return plan
    flat, plan.spec = pytree.tree_flatten_with_path(c.outputs)
    for path, leaf in flat:
        where = plain_path(path)
        vid = (c.index, where)
        if vid in slot_of:
            plan.leaves.append((where, slot_of[vid]))
        elif isinstance(leaf, torch.Tensor):
            plan.leaves.append((where, "tensor"))
        else:
            plan.leaves.append((where, ("const", leaf)))
    return plan


def _span(names: Sequence[str]) -> str:
    if not names:
        return "nothing"
    return repr(names[0]) if len(names) == 1 else f"{names[0]!r}..{names[-1]!r} ({len(names)} blocks)"


# ---------------------------------------------------------------------------------------------- planning
def usable_prefix(prefix: Sequence[Any], model: nn.Module | None = None) -> tuple[list[Any], str | None]:
    """The leading layers of ``prefix`` the cache may skip, and why the next one cannot be, if any."""
    out = []
    for layer in prefix:
        why = _why_not_skippable(layer, model)
        if why is not None:
            return out, why
        out.append(layer)
    return out, None


def _why_not_skippable(layer: Any, model: nn.Module | None) -> str | None:
    inside = {id(m): m for top in layer.modules for m in top.modules()}
    for p in layer.params:
        if not p.requires_grad:
            continue
        holders = [(n, m) for n, m in (model.named_modules() if model is not None else ()) if _holds(m, p)]
        ours = [(n, m) for n, m in holders if id(m) in inside or m is layer.holder]
        others = [_clean(n) for n, m in holders if (n, m) not in ours]
        name = next(
            (f"{_clean(n)}.{k}" for n, m in ours for k, q in m.named_parameters(recurse=False) if q is p), ""
        )
        if others:
            return (
                f"layer {layer.name!r} is frozen but its weight {name!r} is tied to {others}, which train(s)"
            )
        if any(isinstance(m, NORM_TYPES) for _, m in ours):
            return f"layer {layer.name!r} has a norm layer that keeps training (norm='train'), so its output depends on the batch"
        return f"layer {layer.name!r} is frozen but its parameter {name or '?'!r} still trains"
    for m in inside.values():
        if m.training and not mode_free(m):
            return f"{type(m).__name__} in layer {layer.name!r} is in training mode, so its output can change"
    return None


def _holds(module: nn.Module, p: torch.Tensor) -> bool:
    return any(q is p for q in module.parameters(recurse=False))


def plan_cut(model: nn.Module, layers: Sequence[Any]) -> Cut | None:
    """The cut for the frozen ``layers`` (already checked by :func:`usable_prefix`), or None if no block."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks = {names[id(top)]: top for layer in layers for top in layer.modules if id(top) in names}
    if not blocks:
        return None
    root_name = _common_parent(list(blocks))
    named = dict(model.named_modules())
    while root_name and type(named[root_name]).forward is nn.Module.forward:  # ModuleList/ModuleDict
        root_name = root_name.rpartition(".")[0]
    root = named[root_name]
    kind = "module" if root_name in blocks else "graph"
    if kind == "module":
        blocks = {root_name: root}
    return Cut(kind, root, _clean(root_name), tuple(layer.name for layer in layers), blocks)


def fallback_cut(model: nn.Module, layers: Sequence[Any]) -> Cut | None:
    """The largest leading part of ``layers`` whose parameters are exactly one module's (the outermost)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    for n in range(len(layers), 0, -1):
        want = {id(p) for layer in layers[:n] for p in layer.params}
        for name, module in sorted(named, key=lambda nm: nm[0].count(".")):
            if type(module).forward is nn.Module.forward:
                continue
            if {id(p) for p in module.parameters()} == want and not any(
                m.training and not mode_free(m) for m in module.modules()
            ):
                return Cut("module", module, _clean(name), tuple(x.name for x in layers[:n]), {name: module})
    return None


def named_cut(model: nn.Module, name: str) -> Cut:
    """The cut of ``module="name"``: that module (names as users write them, without ``_orig_mod``)."""
    module = named_modules(model)[name]
    return Cut("module", module, name, (name,), {name: module})


def _common_parent(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for group in zip(*parts, strict=False):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return ".".join(common)


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


# ---------------------------------------------------------------------------------------------- extending
def extension(old: Cut, new: Cut) -> list[CallPlan] | None:
    """The block calls that turn ``old``'s stored rows into ``new``'s, in order, or None if some slot of
    ``new`` needs more than ``old``'s rows (e.g. an attention mask computed from the inputs)."""
    have = set(old.slots)
    by_value: dict[ValueKey, CallPlan] = {}
    for c in new.calls:
        if c.cacheable:
            for path, _ in c.leaves:
                by_value[c.value_key(path)] = c
    steps: list[CallPlan] = []

    def derive(key: ValueKey) -> bool:
        if key in have:
            return True
        call = by_value.get(key)
        if call is None or call.args is None:
            return False
        refs = [leaf for leaf in pytree.tree_leaves(call.args, is_leaf=is_ref) if is_ref(leaf)]
        if any(kind == "tensor" for kind, _ in refs):
            return False
        if not all(derive(ref) for kind, ref in refs if kind == "value"):
            return False
        if call not in steps:
            steps.append(call)
        return True

    if not all(derive(key) for key in new.slots):
        return None
    return sorted(steps, key=new.calls.index)


# ---------------------------------------------------------------------------------------------- carrying rows over
# When a new cut's slots can be computed from the old cut's slots alone (the newly skipped blocks take nothing
# but stored rows and constants, as the stages of a ResNet or the children of an ``nn.Sequential`` do), every
# stored row is pushed through the new blocks once, in batches, instead of refilling the cache. Otherwise (a
# block that also takes an attention mask computed from the inputs) the rows are dropped and the cache fills again.
def carry_over(
    old: Cut, store: RowStore, new: Cut, table_key: Any, batch_rows: int, min_rows: int, device: torch.device
) -> tuple[RowStore | None, str]:
    """The rows of ``store`` (``old``'s) as rows of ``new``, and what was done ("kept", "extended" or why
    they were dropped); None when they were dropped."""
    if table_key not in store.tables:
        return None, "the new cut is called with other arguments"
    if old.slots == new.slots:
        return store, "kept"
    steps = extension(old, new)
    if steps is None:
        return None, "the new cut needs more than the stored rows"
    try:
        with torch.no_grad():
            rebuilt = store.rebuild(
                lambda rows: _through(old, new, steps, rows), batch_rows, min_rows, device
            )
    except Exception as err:  # noqa: BLE001 - fall back to refilling
        return None, f"could not extend the stored rows: {err}"
    return rebuilt, "extended"


def _through(old: Cut, new: Cut, steps: Sequence[CallPlan], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``new``'s slot rows from ``old``'s, through the newly skipped blocks ``steps``."""
    env: dict[Any, torch.Tensor] = dict(zip(old.slots, rows, strict=True))
    for step in steps:
        args, kwargs = pytree.tree_map(
            lambda ref: env[ref[1]] if ref[0] == "value" else ref[1],
            step.args,
            is_leaf=is_ref,
        )
        out = step.module(*args, **kwargs)
        for path, leaf in pytree.tree_flatten_with_path(out)[0]:
            env[step.value_key(plain_path(path))] = leaf
    return [env[key] for key in new.slots]
