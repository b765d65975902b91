"""Record the dataflow of one forward call of a module, at the granularity of its frozen blocks.

The frozen prefix is rarely one module (BERT: the embeddings and the first encoder layers, called from
``BertModel.forward`` with an attention mask computed in between). To skip it, the cache must know which
values the rest of the network takes from it. :func:`record` finds out by running the module once on a
real batch and following every tensor:

- a call of a *frozen block* (a frozen layer's module) whose tensor inputs come only from the module's
  inputs, constants and frozen weights produces **prefix values** (one per output tensor);
- code between the blocks ("glue": ``torch`` functions and tensor methods, seen through a
  ``TorchFunctionMode``) passes the labels of its inputs on;
- anything that trains or draws random numbers (a trainable parameter, a module that is not a frozen
  block, dropout, ``torch.rand``...) produces **live values**.

A prefix value is **needed** (the frontier of the cut) when it reaches something live, the module's
output, or Python (``bool(t)``, ``t.item()``). Only needed values are cached; the glue is run again at
every step, so values computed from the inputs alone (BERT's extended attention mask) are recomputed,
not cached, and every Python branch in the glue is taken as in an uncached run.

No graph is built and nothing is replayed from a trace: the module's own ``forward`` runs at every step,
with the frozen blocks answered from the cache (:mod:`lightning_freeze.cache.patch`). So the suffix is
the original code, bit for bit.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
>>> _ = model[0].requires_grad_(False), model[2].requires_grad_(False)
>>> rec = record(model, (torch.randn(8, 4),), {}, blocks={"0": model[0], "2": model[2]})
>>> [(c.name, c.cacheable) for c in rec.calls], sorted(rec.needed)   # the ReLU is glue: only 2's output is needed
([('0', True), ('2', True)], [(1, ())])
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from lightning_freeze.cache.modes import mode_free

# A value's label: LIVE, or the frozenset of prefix values it is computed from (empty: inputs/constants only).
LIVE = "live"
Label = Any
ValueId = tuple[int, tuple[Any, ...]]  # (index of the block call, position of the tensor in its output)

_RANDOM = {
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal", "normal_",
    "bernoulli", "bernoulli_", "multinomial", "poisson", "uniform_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "random_", "dropout", "dropout_", "alpha_dropout", "alpha_dropout_",
    "feature_alpha_dropout", "feature_alpha_dropout_", "dropout1d", "dropout2d", "dropout3d",
    "native_dropout", "rrelu", "rrelu_", "gumbel_softmax", "fused_dropout",
}  # fmt: skip
_BATCH_STATISTICS = {"batch_norm", "instance_norm"}  # depend on the whole batch when training=True
_ESCAPES = {
    "__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__complex__", "numpy", "equal",
    "allclose", "is_nonzero", "__array__", "__repr__", "__format__", "__str__",
}  # fmt: skip


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a property getter such as Tensor.shape
        return getattr(getattr(func, "__self__", None), "__name__", "") or ""
    return name


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _union(labels: list[Label]) -> Label:
    if any(label == LIVE for label in labels):
        return LIVE
    out: frozenset[ValueId] = frozenset()
    for label in labels:
        out |= label
    return out


@dataclass
class BlockCall:
    """One call of a frozen block during the recorded forward."""

    index: int  # position among all block calls
    name: str  # the block's qualified name
    module: nn.Module = field(repr=False)
    occurrence: int  # how many calls of the same block came before this one
    cacheable: bool  # inputs from the inputs/constants/prefix only, output batch-first: it can be skipped
    why: str = ""  # why it cannot be skipped
    outputs: Any = field(default=None, repr=False)  # what it returned (tensors cloned)
    args: Any = field(
        default=None, repr=False
    )  # its arguments: ("value", ValueId) / ("tensor", None) / ("const", x)


@dataclass
class Recording:
    """What one recorded forward found: the block calls in order and the prefix values that are needed."""

    calls: list[BlockCall]
    needed: set[ValueId]
    batch_size: int
    output: Any = field(default=None, repr=False)  # the forward's result, for the step that recorded it
    reads: list[torch.Tensor] = field(default_factory=list, repr=False)  # weights and buffers the glue read
    glue_reads: set[ValueId] = field(default_factory=set)  # prefix values whose contents the glue reads
    live_before: int | None = None  # the first block call after a module that trains ran

    def value(self, vid: ValueId) -> torch.Tensor:
        out = self.calls[vid[0]].outputs
        for key in vid[1]:
            out = out[key] if not isinstance(key, str) or isinstance(out, Mapping) else getattr(out, key)
        return out


def plain_path(path: Sequence[Any]) -> tuple[Any, ...]:
    """A pytree key path as plain keys (index, dict key or attribute name)."""
    out = []
    for k in path:
        for attr in ("idx", "key", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(k)
    return tuple(out)


def plain_output(tree: Any) -> bool:
    """Tensors and constants only, in containers torch's pytree knows (tuples, dicts, ModelOutput...)."""
    return all(
        isinstance(leaf, (torch.Tensor, bool, int, float, str, type(None), torch.dtype, torch.device))
        for leaf in pytree.tree_leaves(tree)
    )


class _Recorder(TorchFunctionMode):
    """Labels every tensor the glue makes; block and module calls are labelled by :func:`record`."""

    def __init__(self, params: Mapping[int, torch.Tensor]) -> None:
        super().__init__()
        self.labels: dict[int, tuple[torch.Tensor, Label]] = {}
        self.inner: dict[int, weakref.ref[torch.Tensor]] = {}
        self.params = params  # id -> every parameter and buffer of the recorded module
        self.reads: dict[int, torch.Tensor] = {}
        self.needed: set[ValueId] = set()
        self.values: dict[ValueId, torch.Tensor] = {}  # each prefix value as the block returned it
        self.mutated: set[int] = set()  # ids of tensors written in place by the glue
        self.glue_reads: set[ValueId] = set()  # prefix values whose contents the glue reads
        self.depth = 0  # > 0 inside a block or a module call: not glue

    def set(self, t: torch.Tensor, label: Label) -> None:
        self.labels[id(t)] = (t, label)

    def label(self, t: torch.Tensor) -> Label:
        known = self.labels.get(id(t))
        if known is not None and known[0] is t:
            return known[1]
        if t.requires_grad:
            return LIVE
        ref = self.inner.get(id(t))
        if ref is not None and ref() is t:
            return LIVE  # made inside a block or a module and handed out other than as its output
        if id(t) in self.params:
            self.reads[id(t)] = t
        return frozenset()

    def need(self, label: Label) -> None:
        if label != LIVE:
            self.needed |= label

    def labels_of(self, tree: Any) -> Label:
        return _union([self.label(t) for t in _tensors(tree)])

    def consume(self, tree: Any) -> None:
        """Something live reads these values: the prefix values among them are needed."""
        for t in _tensors(tree):
            self.need(self.label(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth > 0:
            for t in _tensors(out):
                self.inner[id(t)] = weakref.ref(t)
            return out
        name = _name(func)
        inputs = [self.label(t) for t in _tensors((args, kwargs))]
        if name in _ESCAPES:  # the value reaches Python (a branch, a print): it must be the real one
            for one in inputs:
                self.need(one)
            return out
        label = _union(inputs)
        if label != LIVE and _tensors(out):
            self.glue_reads |= label
        if name in _RANDOM or (name in _BATCH_STATISTICS and _training_flag(func, args, kwargs)):
            label = LIVE
        elif name == "scaled_dot_product_attention" and kwargs.get(
            "dropout_p", args[4] if len(args) > 4 else 0
        ):
            label = LIVE  # attention dropout
        if label == LIVE:
            for one in inputs:
                self.need(one)
        in_place = (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__")
        written = _tensors(kwargs.get("out")) + (_tensors(args[:1]) if in_place else [])
        for t in written:
            self.mutated.add(id(t))
            self.set(t, _union([self.label(t), label]))
        for t in _tensors(out):
            if not any(t is w for w in written):
                self.set(t, label)
        return out


_SIGNATURES: dict[Any, inspect.Signature | None] = {}


def _training_flag(func: Any, args: tuple, kwargs: dict) -> bool:
    """The ``training`` argument of a batch_norm/instance_norm call (True when it cannot be read)."""
    return bool(_argument(func, args, kwargs, "training", True, also="use_input_stats"))


def _argument(func: Any, args: tuple, kwargs: dict, name: str, unknown: Any, also: str = "") -> Any:
    """The argument ``name`` (or ``also``) of a call of ``func``; ``unknown`` when it cannot be read."""
    for key in (name, also):
        if key and key in kwargs:
            return kwargs[key]
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    sig = _SIGNATURES[func]
    if sig is None:
        return unknown
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return unknown
    key = name if name in sig.parameters else also
    if key not in sig.parameters:
        return unknown
    return bound.arguments.get(key, sig.parameters[key].default)


def record(
    root: nn.Module,
    args: tuple,
    kwargs: dict,
    blocks: Mapping[str, nn.Module],
    call: Callable[..., Any] | None = None,
) -> Recording:
    """Run ``root(*args, **kwargs)`` once (through ``call`` if given: the original ``forward``) and record it.

    ``blocks`` maps names to the frozen modules the cut may skip (their parameters must not require grad).
    A module outside the blocks counts as glue if it holds no parameters and computes the same in training
    and eval mode (ReLU, pooling; see :mod:`lightning_freeze.cache.modes`); any other is live.
    """
    batch = _batch_size(args, kwargs)
    block_names = {id(m): n for n, m in blocks.items()}
    inside_blocks = {id(sub) for m in blocks.values() for sub in m.modules()}
    ancestors = {id(m) for m in root.modules() if id(m) not in inside_blocks and _contains(m, inside_blocks)}
    rec = _Recorder({id(t): t for t in (*root.parameters(), *root.buffers())})
    calls: list[BlockCall] = []
    occurrences: dict[int, int] = {}
    state = {"live_calls": 0, "live_before": None}

    def run_inside(module: nn.Module, a: tuple, k: dict) -> Any:
        rec.depth += 1
        try:
            return type(module)._call_impl(module, *a, **k)
        finally:
            rec.depth -= 1

    def block_call(module: nn.Module) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            if rec.depth > 0:
                return type(module)._call_impl(module, *a, **k)
            label = rec.labels_of((a, k))
            index, occurrence = len(calls), occurrences.get(id(module), 0)
            occurrences[id(module)] = occurrence + 1
            out = run_inside(module, a, k)
            why = _why_not(label, out, batch)
            call = BlockCall(index, block_names[id(module)], module, occurrence, not why, why)
            calls.append(call)
            if why and label != LIVE and _batch_free(out, batch):
                # a frozen block without a batch dimension (position embeddings): run it, as glue
                rec.glue_reads |= label
                for t in _tensors(out):
                    rec.set(t, label)
                return out
            if why:
                rec.consume((a, k))
                for t in _tensors(out):
                    rec.set(t, LIVE)
                return out
            if state["live_calls"] and state["live_before"] is None:
                state["live_before"] = index
            call.args = pytree.tree_map(lambda x: _arg_ref(rec, x), (a, k))
            call.outputs = pytree.tree_map(
                lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, out
            )
            for path, leaf in pytree.tree_flatten_with_path(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    vid = (index, plain_path(path))
                    rec.set(leaf, frozenset({vid}))
                    rec.values[vid] = leaf
            return out

        return run

    def module_call(module: nn.Module) -> Callable[..., Any]:
        glue = next(module.parameters(), None) is None and all(mode_free(m) for m in module.modules())

        def run(*a: Any, **k: Any) -> Any:
            if rec.depth > 0:
                return type(module)._call_impl(module, *a, **k)
            label = rec.labels_of((a, k))
            out = run_inside(module, a, k)
            if glue and plain_output(out):
                for t in _tensors(out):
                    rec.set(t, label)
            else:
                state["live_calls"] += 1
                rec.consume((a, k))
                for t in _tensors(out):
                    rec.set(t, LIVE)
            return out

        return run

    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for module in root.modules():
            if id(module) in block_names:
                fn = block_call(module)
            elif id(module) in inside_blocks or id(module) in ancestors or module is root:
                continue
            else:
                fn = module_call(module)
            patched.append(
                (module, "_compiled_call_impl" in module.__dict__, module.__dict__.get("_compiled_call_impl"))
            )
            module._compiled_call_impl = fn
        for t in _tensors((args, kwargs)):
            rec.set(t, frozenset())
        with rec:
            out = (call or root)(*args, **kwargs)
        for t in _tensors(out):
            rec.need(rec.label(t))
    finally:
        for module, had, previous in reversed(patched):
            if had:
                module._compiled_call_impl = previous
            else:
                module.__dict__.pop("_compiled_call_impl", None)
    needed = {vid for vid in rec.needed if calls[vid[0]].cacheable}
    return Recording(
        calls, needed, batch, out, list(rec.reads.values()), rec.glue_reads, state["live_before"]
    )


def _why_not(label: Label, out: Any, batch: int) -> str:
    if label == LIVE:
        return "its input depends on something that trains or is random"
    if not plain_output(out):
        return f"it returns a {type(out).__name__} that holds more than tensors and constants"
    tensors = _tensors(out)
    if not tensors:
        return "it returns no tensor"
    if any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
        return f"not every tensor it returns has the batch ({batch}) first"
    if any(t.requires_grad for t in tensors):
        return "its output requires grad"
    return ""


def _batch_free(out: Any, batch: int) -> bool:
    return plain_output(out) and all(t.dim() == 0 or t.shape[0] != batch for t in _tensors(out))


def _arg_ref(rec: _Recorder, x: Any) -> Any:
    """An argument of a block call: ("value", ValueId) for a prefix value passed as the block returned it,
    ("tensor", None) for any other tensor, ("const", x) otherwise."""
    if not isinstance(x, torch.Tensor):
        return ("const", x)
    label = rec.label(x)
    if label != LIVE and len(label) == 1:
        (vid,) = label
        if rec.values.get(vid) is x and id(x) not in rec.mutated:
            return ("value", vid)
    return ("tensor", None)


def _contains(module: nn.Module, ids: set[int]) -> bool:
    return any(id(m) in ids for m in module.modules())


def _batch_size(args: tuple, kwargs: dict) -> int:
    for t in _tensors((args, kwargs)):
        if t.dim() > 0:
            return int(t.shape[0])
    raise ValueError("no tensor argument with a batch dimension")
