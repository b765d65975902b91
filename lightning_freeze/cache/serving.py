"""What the cache does at each call of the cut: look the batch up, then serve, compute, or both.

Per call of the cut's root during a training step (see :mod:`lightning_freeze.cache.patch` for how the
calls reach here):

- **keys**: every tensor argument is fingerprinted per sample (:mod:`lightning_freeze.cache.keys`);
- **all found** (*serve*): the stored rows are gathered and the root's own ``forward`` runs with every
  skipped block answering from them; blocks whose outputs only other skipped blocks read get a
  placeholder of the right shape;
- **none found** (*capture*): the forward runs as usual and the needed block outputs are stored;
- **some found**: the missing samples' rows are computed as a sub-batch by running the forward only up
  to the last needed block (*prefix* run, random state restored afterwards), then the whole batch is
  served. Where that is not possible (a module that trains runs before the last needed block), or
  too few samples are missing (``min_rows``), the batch is computed as usual and the missing rows stored.

The first call after a new cut is recorded (:mod:`lightning_freeze.cache.trace`) to find the slots; when
the cut grew (FreezeOut froze the next block) the rows already stored are pushed through the newly
skipped blocks, if those take nothing but stored rows, instead of being thrown away.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lightning_freeze.cache.cut import CallPlan, Cut, extension
from lightning_freeze.cache.fingerprint import Fingerprinter
from lightning_freeze.cache.guard import Guard
from lightning_freeze.cache.keys import CallKeys, row_keys, select_rows
from lightning_freeze.cache.stats import EpochStats
from lightning_freeze.cache.store import RowStore, Unsupported, bit_equal
from lightning_freeze.cache.trace import plain_path, record


class Reporter(Protocol):
    """What the serving code tells the callback."""

    def warn_once(self, key: str, message: str) -> None: ...
    def switch_off(self, reason: str) -> None: ...
    def event(self, action: str, **info: Any) -> None: ...
    def invalidate(self, reason: str) -> None: ...
    def no_cut(self, reason: str) -> None: ...


class CutMismatch(RuntimeError):
    """The forward called other blocks, or in another order, than the recorded one."""


class _PrefixDone(BaseException):  # noqa: N818 - a control-flow signal; BaseException: user code's `except Exception` lets it by
    pass


class Mode(enum.Enum):
    SERVE = "serve"  # skipped blocks answer from ``values``
    CAPTURE = "capture"  # blocks run; needed outputs are kept for storing
    PREFIX = "prefix"  # blocks run up to the last needed one, then the forward stops


@dataclass
class _Context:
    mode: Mode
    batch: int
    sig: Any
    values: Sequence[torch.Tensor] = ()
    rows: torch.Tensor | None = None  # CAPTURE: the rows to keep (None: all)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    metas: list[dict[int, Any]] | None = None  # per call: leaf index -> (tail, dtype, device, full)
    seconds: float = 0.0  # time spent computing skipped blocks
    at: int = 0  # index of the next block call
    broken: str = ""


@dataclass
class Settings:
    min_rows: int
    verify: int
    strict: bool


class Server:
    """Serves one :class:`Cut` from one :class:`RowStore`."""

    def __init__(
        self,
        cut: Cut,
        store: RowStore,
        fingerprinter: Fingerprinter,
        settings: Settings,
        stats: EpochStats,
        reporter: Reporter,
        inherited: tuple[Cut, RowStore] | None = None,
    ) -> None:
        self.cut, self.store, self.fp, self.settings = cut, store, fingerprinter, settings
        self.stats, self.reporter = stats, reporter
        self.inherited = inherited
        self.guard: Guard | None = (
            Guard(cut.skipped_modules(), fingerprinter, cut.reads) if cut.recorded else None
        )
        self.metas: dict[Any, list[dict[int, Any]]] = {}
        self.full_placeholders: set[tuple[int, int]] = (
            set()
        )  # (call, leaf) read by the glue: zeros, not a view
        self.verify_left = settings.verify
        self.active = False
        self.calls = 0  # calls of the cut in the current training step
        self.context: _Context | None = None
        self.batch_rows = 0
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ entry points
    def root_forward(self, module: nn.Module, args: tuple, kwargs: dict, original: Callable[..., Any]) -> Any:
        """The cut's root (``graph`` cuts) was called."""
        if not self.active or self.context is not None:
            return original(*args, **kwargs)
        self.calls += 1
        if not self.cut.recorded:
            return self._record(args, kwargs, original)
        return self._lookup_and_run(args, kwargs, original)

    def block_call(self, module: nn.Module, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Any:
        """A skipped block was called (through the root's forward, or from anywhere else)."""
        if self.cut.kind == "module":
            if not self.active or self.context is not None:
                return run(*args, **kwargs)
            self.calls += 1
            if not self.cut.recorded:
                return self._first_module_call(args, kwargs, run)
            return self._lookup_and_run(args, kwargs, run)
        ctx = self.context
        if ctx is None:
            return run(*args, **kwargs)
        index, ctx.at = ctx.at, ctx.at + 1
        plan = self.cut.calls[index] if index < len(self.cut.calls) else None
        if plan is None or plan.module is not module:
            ctx.broken = f"call {index} of the frozen blocks is not {plan.name if plan else 'recorded'}"
            if ctx.mode is Mode.SERVE:
                raise CutMismatch(
                    f"FrozenPrefixCache: the forward of {self.cut.root_name!r} called its frozen blocks differently "
                    f"from the call it recorded ({ctx.broken}); a model whose block calls depend on the data cannot "
                    "be served. Use FrozenPrefixCache(module=...) on one frozen module instead."
                )
            return run(*args, **kwargs)
        if not plan.cacheable:
            return run(*args, **kwargs)
        if ctx.mode is Mode.SERVE:
            return self._served_output(index, plan, ctx)
        start = time.perf_counter()
        out = run(*args, **kwargs)
        ctx.seconds += time.perf_counter() - start
        self._keep(index, plan, out, ctx)
        if ctx.mode is Mode.PREFIX and index == self.cut.last_needed:
            raise _PrefixDone
        return out

    # ------------------------------------------------------------------ first calls
    def _record(self, args: tuple, kwargs: dict, original: Callable[..., Any]) -> Any:
        call = CallKeys.of(self.fp, args, kwargs)
        if call.batch < self.settings.min_rows or any(t.requires_grad for t in call.batched):
            return original(*args, **kwargs)
        start = time.perf_counter()
        rec = record(self.cut.root, args, kwargs, self.cut.blocks, call=original)
        reason = self.cut.complete(rec)
        if reason is not None:
            self.reporter.no_cut(reason)
            return rec.output
        self.guard = Guard(self.cut.skipped_modules(), self.fp, self.cut.reads)
        self.full_placeholders = {
            (i, j)
            for i, c in enumerate(self.cut.calls)
            for j, (path, what) in enumerate(c.leaves)
            if what == "tensor" and (i, path) in rec.glue_reads
        }
        self.metas[call.sig] = [self._meta_of(c.outputs) if c.cacheable else {} for c in rec.calls]
        values = [rec.value(vid) for vid in sorted(rec.needed)]
        if self._adopt(call.sig, values[0].device):
            self._check_extended(call, values)
        self._insert(call, values, None)
        self.stats.record_seconds += time.perf_counter() - start
        self.stats.lookups += call.batch
        self.stats.miss(call.batch, 0.0)
        self.reporter.event("record", cut=self.cut.describe(), slots=len(self.cut.slots))
        self._check(args, kwargs, original, call, values)
        return rec.output

    def _first_module_call(self, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Any:
        call = CallKeys.of(self.fp, args, kwargs)
        if call.batch < self.settings.min_rows or any(t.requires_grad for t in call.batched):
            return run(*args, **kwargs)
        start = time.perf_counter()
        out = run(*args, **kwargs)
        seconds = time.perf_counter() - start
        reason = self.cut.complete_module(out, call.batch)
        if reason is not None:
            self.reporter.no_cut(reason)
            return out
        self.guard = Guard(self.cut.skipped_modules(), self.fp, ())
        values = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if self._adopt(call.sig, values[0].device):
            self._check_extended(call, values)
        self._insert(call, values, None)
        self.stats.lookups += call.batch
        self.stats.miss(call.batch, seconds)
        self._check(args, kwargs, run, call, values)
        return out

    def _adopt(self, sig: Any, device: torch.device) -> bool:
        """Take over the rows of the cut this one replaces, pushed through the newly skipped blocks; True when
        rows were pushed through blocks (so they are worth checking)."""
        if self.inherited is None:
            return False
        old_cut, old_store = self.inherited
        self.inherited = None
        if sig not in old_store.tables:
            self.reporter.event(
                "drop", entries=old_store.entries, why="the new cut is called with other arguments"
            )
            old_store.clear()
            return False
        if old_cut.slots == self.cut.slots:
            self.store = old_store
            return False
        steps = extension(old_cut, self.cut)
        if steps is None:
            self.reporter.event(
                "drop", entries=old_store.entries, why="the new cut needs more than the stored rows"
            )
            old_store.clear()
            return False
        start = time.perf_counter()
        before = old_store.entries
        try:
            with torch.no_grad():
                self.store = old_store.rebuild(
                    lambda rows: _extend(old_cut, self.cut, steps, rows),
                    max(self.settings.min_rows, self.batch_rows or 64),
                    self.settings.min_rows,
                    device,
                )
        except Exception as err:  # noqa: BLE001 - fall back to refilling
            self.reporter.event("drop", entries=before, why=f"could not extend the stored rows: {err}")
            old_store.clear()
            return False
        self.reporter.event(
            "extend", entries=self.store.entries, seconds=time.perf_counter() - start, through=len(steps)
        )
        return True

    # ------------------------------------------------------------------ every call
    def _lookup_and_run(self, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Any:
        stats = self.stats
        start = time.perf_counter()
        problem = self.guard.problem() if self.guard is not None else None
        if problem is not None:
            self.reporter.invalidate(problem)
            stats.bypassed += 1
            return run(*args, **kwargs)
        sig, batch, batched = CallKeys.signature(args, kwargs, self.fp)
        if batch < self.settings.min_rows or any(t.requires_grad for t in batched):
            stats.bypassed += 1
            return run(*args, **kwargs)
        call = CallKeys(sig, row_keys(self.fp, batched), batch, batched)
        self.device, self.batch_rows = batched[0].device, max(self.batch_rows, batch)
        found = self.store.lookup(sig, call.keys)
        hit = [i for i, r in enumerate(found) if r >= 0]
        stats.lookups += batch
        stats.found += len(hit)
        servable = self.cut.kind == "module" or sig in self.metas
        try:
            if len(hit) == batch and servable:
                values = self.store.gather(sig, found, self.device)
                stats.overhead_seconds += time.perf_counter() - start
                stats.hits += batch
                return self._serve(args, kwargs, run, sig, values)
            miss = [i for i, r in enumerate(found) if r < 0]
            if hit and servable and len(miss) >= self.settings.min_rows and self.cut.prefix_ok:
                return self._serve_partial(args, kwargs, run, call, found, hit, miss, start)
            rows = None if not hit else torch.as_tensor(miss)
            stats.overhead_seconds += time.perf_counter() - start
            return self._capture(args, kwargs, run, call, rows)
        except Unsupported as err:
            self.reporter.switch_off(str(err))
            return run(*args, **kwargs)

    def _serve(
        self, args: tuple, kwargs: dict, run: Callable[..., Any], sig: Any, values: list[torch.Tensor]
    ) -> Any:
        if self.cut.kind == "module":
            return _rebuild(self.cut.calls[0], values, None, 0, set(), 0)
        ctx = _Context(Mode.SERVE, values[0].shape[0], sig, values=values, metas=self.metas[sig])
        self.context = ctx
        try:
            return run(*args, **kwargs)
        finally:
            self.context = None

    def _serve_partial(
        self,
        args: tuple,
        kwargs: dict,
        run: Callable[..., Any],
        call: CallKeys,
        found: list[int],
        hit: list[int],
        miss: list[int],
        start: float,
    ) -> Any:
        miss_idx = torch.as_tensor(miss)
        sub_args, sub_kwargs = select_rows(args, kwargs, call.batch, miss_idx)
        fresh = self._prefix_values(sub_args, sub_kwargs, run, call.sig)
        t1 = time.perf_counter()
        old = self.store.gather(call.sig, [found[i] for i in hit], self.device)
        values = []
        for slot, sub in enumerate(fresh):
            out = torch.empty((call.batch, *sub.shape[1:]), dtype=sub.dtype, device=sub.device)
            if (
                sub.dim() == 4
                and sub.is_contiguous(memory_format=torch.channels_last)
                and not sub.is_contiguous()
            ):
                out = out.contiguous(memory_format=torch.channels_last)
            out[torch.as_tensor(hit, device=sub.device)] = old[slot]
            out[miss_idx.to(sub.device)] = sub
            values.append(out)
        self._insert(CallKeys(call.sig, [call.keys[i] for i in miss], len(miss), []), fresh, None)
        self.stats.hits += len(hit)
        self.stats.overhead_seconds += time.perf_counter() - t1
        return self._serve(args, kwargs, run, call.sig, values)

    def _capture(
        self, args: tuple, kwargs: dict, run: Callable[..., Any], call: CallKeys, rows: torch.Tensor | None
    ) -> Any:
        if self.cut.kind == "module":
            start = time.perf_counter()
            out = run(*args, **kwargs)
            self.stats.miss(call.batch if rows is None else len(rows), time.perf_counter() - start)
            values = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if rows is not None:
                values = [v.index_select(0, rows.to(v.device)) for v in values]
            self._insert(call, values, rows)
            if rows is None:
                self._check(args, kwargs, run, call, values)
            return out
        ctx = _Context(Mode.CAPTURE, call.batch, call.sig, rows=rows)
        if call.sig not in self.metas:
            ctx.metas = []
        self.context = ctx
        try:
            out = run(*args, **kwargs)
        finally:
            self.context = None
        self.stats.miss(call.batch if rows is None else len(rows), ctx.seconds)
        if ctx.broken or len(ctx.captured) != len(self.cut.slots):
            self.reporter.warn_once(
                "capture",
                f"FrozenPrefixCache: a forward of {self.cut.root_name!r} did not call its frozen blocks as recorded "
                f"({ctx.broken or 'a needed block was not called'}); that batch is not stored",
            )
            return out
        if ctx.metas is not None:
            self.metas[call.sig] = ctx.metas
        values = [ctx.captured[s] for s in range(len(self.cut.slots))]
        self._insert(call, values, rows)
        if rows is None:
            self._check(args, kwargs, run, call, values)
        return out

    def _prefix_values(
        self, args: tuple, kwargs: dict, run: Callable[..., Any], sig: Any, count: bool = True
    ) -> list[torch.Tensor]:
        """The slot values for this (sub-)batch, computed by running the forward up to the last needed block."""
        start = time.perf_counter()
        if self.cut.kind == "module":
            with torch.no_grad():
                out = run(*args, **kwargs)
            if count:
                self.stats.miss(_batch(args, kwargs), time.perf_counter() - start)
            return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        ctx = _Context(Mode.PREFIX, _batch(args, kwargs), sig)
        self.context = ctx
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                run(*args, **kwargs)
        except _PrefixDone:
            pass
        finally:
            self.context = None
        if count:
            self.stats.miss(ctx.batch, ctx.seconds)
        if len(ctx.captured) != len(self.cut.slots):
            raise Unsupported(
                f"a forward of {self.cut.root_name!r} stopped calling its frozen blocks as recorded"
            )
        return [ctx.captured[s] for s in range(len(self.cut.slots))]

    # ------------------------------------------------------------------ pieces
    def _keep(self, index: int, plan: CallPlan, out: Any, ctx: _Context) -> None:
        if ctx.metas is not None:
            while len(ctx.metas) <= index:
                ctx.metas.append({})
            ctx.metas[index] = self._meta_of(out)
        for (_, what), leaf in zip(plan.leaves, pytree.tree_leaves(out), strict=False):
            if isinstance(what, int) and isinstance(leaf, torch.Tensor):
                leaf = leaf.detach()
                ctx.captured[what] = (
                    leaf.index_select(0, ctx.rows.to(leaf.device)) if ctx.rows is not None else leaf.clone()
                )

    @staticmethod
    def _meta_of(out: Any) -> dict[int, Any]:
        return {
            j: (tuple(t.shape[1:]), t.dtype, t.device)
            for j, t in enumerate(pytree.tree_leaves(out))
            if isinstance(t, torch.Tensor)
        }

    def _served_output(self, index: int, plan: CallPlan, ctx: _Context) -> Any:
        metas = ctx.metas[index] if ctx.metas is not None and index < len(ctx.metas) else {}
        return _rebuild(plan, ctx.values, metas, ctx.batch, self.full_placeholders, index)

    def _insert(self, call: CallKeys, values: list[torch.Tensor], rows: torch.Tensor | None) -> None:
        keys = call.keys if rows is None else [call.keys[i] for i in rows.tolist()]
        start = time.perf_counter()
        self.stats.stored += self.store.insert(call.sig, keys, values)
        self.stats.overhead_seconds += time.perf_counter() - start

    def _check(
        self, args: tuple, kwargs: dict, run: Callable[..., Any], call: CallKeys, values: list[torch.Tensor]
    ) -> None:
        """While ``verify`` allows: recompute some samples of a batch just stored, in another batch composition
        (the first half, in reverse order), and compare with what was stored. Done when rows are stored, so
        that serving never has to compute the skipped blocks."""
        if self.verify_left <= 0 or (self.cut.kind == "graph" and not self.cut.prefix_ok):
            return
        half = call.batch // 2
        size = half if half >= self.settings.min_rows else call.batch
        rows = torch.arange(size - 1, -1, -1)
        sub_args, sub_kwargs = select_rows(args, kwargs, call.batch, rows)
        fresh = self._prefix_values(sub_args, sub_kwargs, run, call.sig, count=False)
        self.verify_left -= 1
        self._compare([v.index_select(0, rows.to(v.device)) for v in values], fresh)

    def _check_extended(self, call: CallKeys, fresh: list[torch.Tensor]) -> None:
        """Compare the rows pushed through the newly skipped blocks with this batch's fresh values."""
        found = self.store.lookup(call.sig, call.keys)
        hit = [i for i, r in enumerate(found) if r >= 0]
        if not hit or self.verify_left <= 0:
            return
        self.verify_left -= 1
        stored = self.store.gather(call.sig, [found[i] for i in hit], fresh[0].device)
        pick = torch.as_tensor(hit, device=fresh[0].device)
        self._compare(stored, [v.index_select(0, pick) for v in fresh])

    def _compare(self, stored: list[torch.Tensor], fresh: list[torch.Tensor]) -> None:
        self.stats.verified += 1
        for a, b in zip(stored, fresh, strict=True):
            if bit_equal(a, b):
                continue
            if a.shape != b.shape or a.dtype != b.dtype:
                self.reporter.switch_off(
                    f"stored rows have {tuple(a.shape)}/{a.dtype}, a fresh computation {tuple(b.shape)}/{b.dtype}"
                )
                return
            diff = (a.float() - b.float()).abs().max().item()
            scale = b.float().abs().max().item()
            close = torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(1.0, scale))
            if close and not self.settings.strict:
                self.reporter.warn_once(
                    "rounding",
                    f"FrozenPrefixCache: stored rows differ from the same samples computed in another batch by up to "
                    f"{diff:.3g} (rounding: the kernels here give the last bits differently for different batch "
                    "compositions). Training is as correct as with nondeterministic kernels, but not bit-identical to "
                    "an uncached run. Pass strict=True to switch the cache off in this case.",
                )
                return
            self.reporter.switch_off(
                f"stored rows differ from the same samples computed in another batch by up to {diff:.3g}; the cached "
                "part is not a pure function of its input here"
            )
            return


def _rebuild(
    plan: CallPlan,
    values: Sequence[torch.Tensor],
    metas: dict[int, Any] | None,
    batch: int,
    full: set[tuple[int, int]],
    index: int,
) -> Any:
    leaves = []
    for j, (_, what) in enumerate(plan.leaves):
        if isinstance(what, int):
            leaves.append(values[what])
        elif what == "tensor":
            tail, dtype, device = metas[j]  # type: ignore[index]
            if (index, j) in full:
                leaves.append(torch.zeros((batch, *tail), dtype=dtype, device=device))
            else:  # only skipped blocks and shape queries see it
                leaves.append(torch.zeros((), dtype=dtype, device=device).expand(batch, *tail))
        else:
            leaves.append(what[1])
    return pytree.tree_unflatten(leaves, plan.spec)


def _extend(old: Cut, new: Cut, steps: Sequence[CallPlan], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``new``'s slot rows from ``old``'s, through the newly skipped blocks ``steps``."""
    env: dict[Any, torch.Tensor] = dict(zip(old.slots, rows, strict=True))
    for step in steps:
        args, kwargs = pytree.tree_map(
            lambda ref: env[ref[1]] if ref[0] == "value" else ref[1],
            step.args,
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and x[0] in ("value", "const"),
        )
        out = step.module(*args, **kwargs)
        for path, leaf in pytree.tree_flatten_with_path(out)[0]:
            env[step.value_key(plain_path(path))] = leaf
    return [env[key] for key in new.slots]


def _batch(args: tuple, kwargs: dict) -> int:
    return CallKeys.split(args, kwargs)[0]
