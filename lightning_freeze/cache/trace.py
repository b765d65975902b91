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

import contextlib
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from lightning_freeze.cache.modes import mode_free


@dataclass(frozen=True)
class Live:
    """The label of a value that trains or is random: ``why`` names its source, ``remedy`` what would make
    it cacheable."""

    why: str
    remedy: str = ""


# A value's label: a Live, or the frozenset of prefix values it is computed from (empty: inputs/constants only).
Label = Any
ValueId = tuple[int, tuple[Any, ...]]  # (index of the block call, position of the tensor in its output)

_RANDOM = {
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "normal",
    "normal_",
    "bernoulli",
    "bernoulli_",
    "multinomial",
    "poisson",
    "uniform_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "random_",
    "gumbel_softmax",
    "fused_dropout",
}  # fmt: skip  (dropout and RReLU: see _random_op)
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


def is_live(label: Label) -> bool:
    return isinstance(label, Live)


def _union(labels: list[Label]) -> Label:
    live = next((label for label in labels if isinstance(label, Live)), None)
    if live is not None:
        return live
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
    remedy: str = ""  # what the user could change so that it can be
    glue: bool = False  # not skippable but harmless: no batch dimension (position embeddings), run as glue
    outputs: Any = field(default=None, repr=False)  # what it returned (tensors cloned)
    # its arguments: ("value", ValueId) / ("tensor", None) / ("const", x)
    args: Any = field(default=None, repr=False)


@dataclass
class Recording:
    """What one recorded forward found: the block calls in order and the prefix values that are needed."""

    calls: list[BlockCall]
    needed: set[ValueId]
    batch_size: int
    output: Any = field(default=None, repr=False)  # the forward's result, for the step that recorded it
    reads: list[torch.Tensor] = field(default_factory=list, repr=False)  # weights and buffers the glue read
    glue_reads: set[ValueId] = field(default_factory=set)  # prefix values whose contents the glue reads
    live_before: int | None = None  # the first block call after something with side effects ran
    # parameter-free modules run as glue whose result depends on their mode, with the mode they had
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list, repr=False)

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

    def __init__(self, root: nn.Module, prefix: str, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.labels: dict[int, tuple[torch.Tensor, Label]] = {}
        # every parameter and buffer of the recorded module, by id: (tensor, qualified name)
        self.params = {
            id(t): (t, _qualified(prefix, n))
            for n, t in (*root.named_parameters(remove_duplicate=False), *root.named_buffers())
        }
        self.reads: dict[int, torch.Tensor] = {}
        self.needed: set[ValueId] = set()
        self.values: dict[ValueId, torch.Tensor] = {}  # each prefix value as the block returned it
        self.mutated: set[int] = set()  # ids of tensors written in place by the glue
        self.glue_reads: set[ValueId] = set()  # prefix values whose contents the glue reads
        self.depth = 0  # > 0 inside a block or a module call (where this mode is off)
        self.side_effects = 0  # ops or modules seen so far that change state (batch statistics, training)
        self.live_ops = 0  # random or batch-statistics ops seen so far

    def set(self, t: torch.Tensor, label: Label) -> None:
        self.labels[id(t)] = (t, label)

    def label(self, t: torch.Tensor) -> Label:
        known = self.labels.get(id(t))
        if known is not None and known[0] is t:
            return known[1]
        param = self.params.get(id(t))
        if t.requires_grad:
            if param is not None and param[0] is t:
                return Live(f"the trainable parameter {param[1]!r}", f"freeze {param[1]!r} too")
            return Live("a tensor that requires grad")
        if param is not None and param[0] is t:
            self.reads[id(t)] = t
        elif t.dim() > 0 and t.shape[0] == self.batch:
            # per-sample, yet neither an input nor made by the glue: made inside a module and handed out
            # other than as its output
            return Live("a per-sample tensor a module handed out other than as its output")
        return frozenset()

    def need(self, label: Label) -> None:
        if not is_live(label):
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
        name = _name(func)
        inputs = [self.label(t) for t in _tensors((args, kwargs))]
        if name in _ESCAPES:  # the value reaches Python (a branch, a print): it must be the real one
            for one in inputs:
                self.need(one)
            return out
        label = _union(inputs)
        if not is_live(label) and _tensors(out):
            self.glue_reads |= label
        random = _random_op(name, func, args, kwargs)
        if random is not None:
            self.live_ops += 1
            label = random
        elif name in _BATCH_STATISTICS and _training_flag(func, args, kwargs):
            self.side_effects += 1
            self.live_ops += 1
            label = Live(
                f"{name} in training mode (batch statistics)", "put that norm layer in eval mode (freeze it)"
            )
        if is_live(label):
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
_DROPOUTS = {
    "dropout", "dropout_", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_",
    "dropout1d", "dropout2d", "dropout3d", "native_dropout", "feature_dropout", "feature_dropout_",
}  # fmt: skip


def _random_op(name: str, func: Any, args: tuple, kwargs: dict) -> Live | None:
    """The Live label of a call that draws random numbers, or None. Dropout with ``p == 0`` or
    ``training=False`` (and RReLU in eval) is deterministic."""
    if name in _DROPOUTS or name in ("rrelu", "rrelu_"):
        training = _argument(func, args, kwargs, "training", True, also="train")
        p = _argument(func, args, kwargs, "p", None) if name not in ("rrelu", "rrelu_") else None
        if not training or (isinstance(p, (int, float)) and p == 0):
            return None
        return Live(
            f"{name} in training mode (random)",
            "set its probability to 0, or keep its module in eval mode, to cache past it",
        )
    if name == "scaled_dot_product_attention" and kwargs.get("dropout_p", args[4] if len(args) > 4 else 0):
        return Live("attention dropout (random)", "set the attention dropout to 0 to cache past it")
    if name in _RANDOM:
        return Live(
            f"the random operation {name} (e.g. stochastic depth)",
            "give it a rate of 0, or keep its module in eval mode, to cache past it",
        )
    return None


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
    root_name: str = "",
    visible: Collection[str] = (),
) -> Recording:
    """Run ``root(*args, **kwargs)`` once (through ``call`` if given: the original ``forward``) and record it.

    ``blocks`` maps names to the frozen modules the cut may skip (their parameters must not require grad).
    A module outside the blocks that holds no parameters (ReLU, pooling, dropout, a user's parameter-free
    module) is glue: the ops inside it are recorded like any other glue, so dropout with ``p == 0`` or in
    eval mode is deterministic, dropout in training mode is random, and what it reads is known. Any other
    module is live. A module that holds frozen blocks is skipped as one block when its whole call turns out to
    be a pure function of prefix values, unless it holds one of the blocks named in ``visible`` (the blocks
    whose outputs the previous cut stored, so that its rows can be carried over). ``root_name`` prefixes the
    names in messages.
    """
    batch = _batch_size(args, kwargs)
    block_names = {id(m): n for n, m in blocks.items()}
    inside_blocks = {id(sub) for m in blocks.values() for sub in m.modules()}
    ancestors = {id(m) for m in root.modules() if id(m) not in inside_blocks and _contains(m, inside_blocks)}
    module_names = {id(m): _qualified(root_name, n) for n, m in root.named_modules()}
    rec = _Recorder(root, root_name, batch)
    calls: list[BlockCall] = []
    occurrences: dict[int, int] = {}
    modes: dict[int, tuple[nn.Module, bool]] = {}
    state: dict[str, int | None] = {"live_before": None}

    def run_inside(module: nn.Module, a: tuple, k: dict) -> Any:
        # Without the recording mode: an active TorchFunctionMode changes kernels' code paths (the CPU fast path
        # of nn.MultiheadAttention and nn.TransformerEncoderLayer is off while one is), and a block must compute
        # here exactly what it computes in a step without the cache.
        rec.depth += 1
        try:
            with _mode_off(rec):
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
            if why and not is_live(label) and _batch_free(out, batch):
                # a frozen block without a batch dimension (position embeddings): run it, as glue
                call.glue = True
                rec.glue_reads |= label
                for t in _tensors(out):
                    rec.set(t, label)
                return out
            if why:
                call.remedy = label.remedy if is_live(label) else ""
                rec.consume((a, k))
                for t in _tensors(out):
                    rec.set(t, Live(f"the frozen block {call.name!r}, which cannot be skipped"))
                return out
            if rec.side_effects and state["live_before"] is None:
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
        name = module_names.get(id(module), type(module).__name__)
        trainable = any(p.requires_grad for p in module.parameters())
        live = Live(
            f"the module {name!r}, which " + ("trains" if trainable else "is not among the frozen layers"),
            f"freeze {name!r} too",
        )

        def run(*a: Any, **k: Any) -> Any:
            if rec.depth > 0:
                return type(module)._call_impl(module, *a, **k)
            rec.side_effects += 1
            rec.consume((a, k))
            out = run_inside(module, a, k)
            for t in _tensors(out):
                rec.set(t, live)
            return out

        return run

    promoted: list[tuple[int, int, BlockCall, set[ValueId]]] = []  # (first, end) of the inner calls, the call

    def ancestor_call(module: nn.Module) -> Callable[..., Any]:
        """A module that holds frozen blocks: when its whole call turns out to be a pure function of prefix values
        (every inner block skippable, no random op, no other module with parameters), it is skipped as one."""
        owned = {id(p) for p in module.parameters()}
        covered = not any(p.requires_grad for p in module.parameters()) and owned <= {
            id(p) for sub in module.modules() if id(sub) in block_names for p in sub.parameters()
        }

        def run(*a: Any, **k: Any) -> Any:
            if rec.depth > 0 or not covered:
                return type(module)._call_impl(module, *a, **k)
            label = rec.labels_of((a, k))
            first, effects, live_ops = len(calls), rec.side_effects, rec.live_ops
            refs = pytree.tree_map(lambda x: _arg_ref(rec, x), (a, k))
            out = type(module)._call_impl(module, *a, **k)
            inside = {c.name for c in calls[first:]} | {p[2].name for p in promoted if p[0] >= first}
            clean = (
                calls[first:]
                and not inside & set(visible)
                and all(c.cacheable for c in calls[first:])
                and (rec.side_effects, rec.live_ops) == (effects, live_ops)
                and not _why_not(_union([label, rec.labels_of(out)]), out, batch)
            )
            if not clean:
                return out
            occurrence = occurrences.get(id(module), 0)
            occurrences[id(module)] = occurrence + 1
            call = BlockCall(
                -1 - len(promoted), module_names[id(module)], module, occurrence, True, args=refs
            )
            call.outputs = pytree.tree_map(
                lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, out
            )
            promoted.append((first, len(calls), call, rec.needed | rec.glue_reads))
            for path, leaf in pytree.tree_flatten_with_path(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    vid = (call.index, plain_path(path))
                    rec.set(leaf, frozenset({vid}))
                    rec.values[vid] = leaf
            return out

        return run

    def glue_call(module: nn.Module) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            if rec.depth == 0 and not mode_free(module):
                modes.setdefault(id(module), (module, module.training))
            return type(module)._call_impl(module, *a, **k)  # its ops are seen as glue

        return run

    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for module in root.modules():
            if id(module) in block_names:
                fn = block_call(module)
            elif id(module) in inside_blocks or module is root:
                continue
            elif id(module) in ancestors:
                fn = ancestor_call(module)
            elif next(module.parameters(), None) is None:
                fn = glue_call(module)
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
    calls, index = _with_promotions(calls, promoted, rec.needed | rec.glue_reads)
    needed = {
        (index[i], path) for i, path in rec.needed if index.get(i) is not None and calls[index[i]].cacheable
    }
    for c in calls:
        c.args = pytree.tree_map(lambda ref: _renumbered(ref, index), c.args, is_leaf=is_ref)
    live_before = state["live_before"]
    if live_before is not None:
        live_before = min(
            (index[i] for i in index if i >= live_before and index[i] is not None), default=None
        )
    return Recording(
        calls,
        needed,
        batch,
        out,
        list(rec.reads.values()),
        {(index[i], path) for i, path in rec.glue_reads if index.get(i) is not None},
        live_before,
        list(modes.values()),
    )


def _with_promotions(
    calls: list[BlockCall], promoted: list[tuple[int, int, BlockCall, set[ValueId]]], used: set[ValueId]
) -> tuple[list[BlockCall], dict[int, int | None]]:
    """The block calls with each outermost promoted module call in place of the calls inside it, and the new
    index of every old one (promoted calls have negative old indices; None: inside a promoted call). A
    promotion whose inner values are used after it returned (other than through its output) is not made."""
    chosen: list[tuple[int, int, BlockCall]] = []
    for first, end, call, before in sorted(promoted, key=lambda p: (p[0], -p[1])):
        if chosen and first < chosen[-1][1]:
            continue  # inside one already chosen
        if any(first <= i < end for i, _ in used - before):
            continue
        chosen.append((first, end, call))
    out: list[BlockCall] = []
    index: dict[int, int | None] = {}
    starts = {first: (end, call) for first, end, call in chosen}
    i = 0
    while i < len(calls):
        if i in starts:
            end, call = starts[i]
            index[call.index] = len(out)
            for j in range(i, end):
                index[j] = None
            i = end
            out.append(call)
            continue
        index[i] = len(out)
        out.append(calls[i])
        i += 1
    for _, _, call, _ in promoted:
        index.setdefault(call.index, None)
    for n, c in enumerate(out):
        c.index = n
    return out, index


def _renumbered(ref: Any, index: dict[int, int | None]) -> Any:
    if isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "value":
        new = index.get(ref[1][0])
        return ("value", (new, ref[1][1])) if new is not None else ("tensor", None)
    return ref


def is_ref(x: Any) -> bool:
    """A reference to a block argument: ("value", key), ("tensor", None) or ("const", x)."""
    return isinstance(x, tuple) and len(x) == 2 and x[0] in ("value", "tensor", "const")


@contextlib.contextmanager
def _mode_off(mode: TorchFunctionMode) -> Any:
    """``mode`` switched off for the duration (when it is the innermost mode, as while recording)."""
    if torch.overrides._get_current_function_mode() is not mode:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def _qualified(prefix: str, name: str) -> str:
    return ".".join(part for part in (*prefix.split("."), *name.split(".")) if part and part != "_orig_mod")


def _why_not(label: Label, out: Any, batch: int) -> str:
    if is_live(label):
        return f"its input depends on {label.why}"
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
    if not is_live(label) and len(label) == 1:
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
