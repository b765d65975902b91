"""What the cache does at each call of the cut: look the batch up, then serve, compute, or both.

Per call of the cut's root during a training step (see :mod:`lightning_freeze.cache.patch` for how the
calls reach here):

- **keys**: every tensor argument is fingerprinted per sample (:mod:`lightning_freeze.cache.keys`), or, when
  the loader gives sample ids, the fingerprints stored for the ids are the keys (:class:`SampleIds`: the rows
  are hashed until every id has been compared once on a revisit, then a rotating sample of them);
- **all found** (*serve*): the stored rows are gathered and the root's own ``forward`` runs with every
  skipped block answering from them; blocks whose outputs only other skipped blocks read get a
  placeholder of the right shape;
- **none found** (*capture*): the forward runs as usual and the needed block outputs are stored;
- **some found**: the missing samples' rows are computed as a sub-batch by running the forward only up
  to the last needed block (*prefix* run, random state restored afterwards), then the whole batch is
  served. Where that is not possible (a module that trains runs before the last needed block), or
  too few samples are missing (:data:`MIN_ROWS`), the batch is computed as usual and the missing rows stored.

:meth:`Server.enter` decides before the forward runs and :meth:`Server.leave` stores what it computed, so
the forward itself runs between them as the user's code (compiled, if the model is). The first call after
a new cut is recorded (:mod:`lightning_freeze.cache.trace`) to find the slots, and the rows of the cut it
replaces are carried over (:func:`lightning_freeze.cache.cut.carry_over`). :data:`VERIFY_PER_FIT` times per
fit, freshly stored samples are computed again in another batch composition and compared bit for bit
(:mod:`lightning_freeze.cache.verify`), so that serving never needs to compute the skipped blocks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lightning_freeze.cache.cut import CallPlan, Cut, carry_over
from lightning_freeze.cache.fingerprint import Fingerprinter
from lightning_freeze.cache.guard import Guard
from lightning_freeze.cache.keys import CallKeys, SampleIds, row_keys, select_rows
from lightning_freeze.cache.patch import Patch
from lightning_freeze.cache.stats import EpochStats
from lightning_freeze.cache.store import RowStore, Unsupported, memory_format
from lightning_freeze.cache.trace import record
from lightning_freeze.cache.verify import compare


class Reporter(Protocol):
    """What the serving code tells the callback."""

    def warn_once(self, key: str, message: str) -> None: ...
    def switch_off(self, reason: str) -> None: ...
    def event(self, action: str, **info: Any) -> None: ...
    def invalidate(self, reason: str) -> None: ...
    def no_cut(self, reason: str) -> None: ...
    def stop_ids(self, reason: str) -> None: ...


class CutMismatch(RuntimeError):
    """The forward called other blocks, or in another order, than the recorded one."""


class _PrefixDone(BaseException):  # noqa: N818 - a signal; BaseException: user code's `except Exception` lets it by
    pass


class Mode(enum.Enum):
    SERVE = "serve"  # skipped blocks answer from ``values``
    CAPTURE = "capture"  # blocks run; needed outputs are kept for storing
    PREFIX = "prefix"  # blocks run up to the last needed one, then the forward stops


@dataclass
class _Context:
    mode: Mode
    batch: int
    values: Sequence[torch.Tensor] = ()
    rows: torch.Tensor | None = None  # CAPTURE: the rows to keep (None: all)
    call: CallKeys | None = None  # CAPTURE of one slot: stored as soon as the block returns
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    metas: list[dict[int, Any]] | None = None  # per call: leaf index -> (tail, dtype, device)
    seconds: float = 0.0  # time spent computing skipped blocks
    at: int = 0  # index of the next block call
    broken: str = ""


_RUN = object()


@dataclass
class Step:
    """What an entry point does with one call: return ``result``, or run the forward (with ``context``
    set) and hand its output to :meth:`Server.leave`."""

    result: Any = _RUN
    context: _Context | None = None
    call: CallKeys | None = None  # set when the forward's output (or captured blocks) is to be stored
    rows: torch.Tensor | None = None  # which rows of the batch to store (None: all)
    first: bool = False  # the first call of a ``module`` cut: its output defines the slots
    start: float = 0.0
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    run: Callable[..., Any] | None = None

    @property
    def done(self) -> bool:
        return self.result is not _RUN


MIN_ROWS = 4
"""Batches (and sub-batches of misses) with fewer rows are computed and never stored: CPU kernels take other code
paths for tiny batches, whose last bits can differ."""
VERIFY_PER_FIT = 1
"""Batches per fit whose freshly stored rows are computed again in another batch composition and compared bit
for bit (rows carried over to a new cut are also compared, for free, with the batch that recorded it)."""


@dataclass
class Settings:
    """What the servers of one fit share (``verify_left`` counts down across cuts)."""

    min_rows: int
    verify_left: int
    off_on_rounding: bool  # on_mismatch='off'
    batches_per_epoch: int = 0  # training batches per epoch on this process (0: unknown)
    # what the guard watches for a parameter (FSDP2: the sharded one; engine.sharding.lasting_params)
    lasting: Callable[[Iterable[torch.Tensor]], list[torch.Tensor]] = list


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
        ids: SampleIds | None = None,
    ) -> None:
        self.cut, self.store, self.fp, self.settings = cut, store, fingerprinter, settings
        self.stats, self.reporter = stats, reporter
        self.inherited = inherited
        self.ids = ids  # keys by sample id (None: hash every row); goes with the store to a grown cut
        self.step_ids: list[int] | None = None  # the ids of this step's batch, for the step's first call
        # rows served without a copy (RowStore.alias) in this step and the last, with their versions, until checked
        self.aliased: list[tuple[int, list[torch.Tensor], list[int], Any, list[bytes]]] = []
        self.step_no = 0
        self.alias_ok = True  # False once the forward wrote into rows served without a copy
        self.guard: Guard | None = None
        self.metas: dict[Any, list[dict[int, Any]]] = {}  # per table key: the shapes of placeholder outputs
        self.full_placeholders: set[tuple[int, int]] = set()  # (call, leaf) the glue reads: zeros, not a view
        self.placeholders: dict[
            Any, torch.Tensor
        ] = {}  # the others, made once (expanded zeros cannot be written)
        self.active = False  # inside a training step
        self.calls = 0  # calls of the cut in the current training step
        self.context: _Context | None = None
        self.batch_rows = 0
        self.patch: Patch | None = None

    # ------------------------------------------------------------------ a training step
    def begin_step(self, ids: list[int] | None = None) -> None:
        """A training step starts: calls of the cut are looked up until :meth:`end_step`; ``ids``: the batch's
        sample ids, if the loader gives them (used for the step's first call of the cut)."""
        self.active, self.calls, self.step_ids = True, 0, ids
        self.step_no += 1
        self.stats.steps += 1

    def end_step(self) -> bool:
        """The training step ended; returns whether it called the cut's root."""
        self.active = False
        if self.aliased:
            self._check_aliases()
        return self.calls > 0

    # ------------------------------------------------------------------ entry points
    def install(self, prune: bool = False) -> None:
        """Put the entry points on the model: the root and every block that may be skipped (``prune``: only
        the blocks the recorded cut skips)."""
        self.uninstall()
        patch = self.patch = Patch()
        cut = self.cut
        if cut.kind == "module":
            patch.instead_of_call(cut.root, self.module_call)
        else:
            patch.around_forward(cut.root, self)
            for block in cut.skipped_modules() if prune else cut.blocks.values():
                patch.instead_of_call(block, self.block_call)

    def uninstall(self) -> None:
        if self.patch is not None:
            self.patch.restore()
            self.patch = None

    def module_call(self, module: nn.Module, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Any:
        """The ``module`` cut was called (it is the one skipped block)."""
        step = self.enter(args, kwargs, run)
        if step.done:
            return step.result
        try:
            out = run(*args, **kwargs)
        except BaseException:
            self.leave(step, None)
            raise
        self.leave(step, out)
        return out

    def block_call(self, module: nn.Module, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Any:
        """A skipped block of a ``graph`` cut was called (through the root's forward, or from anywhere)."""
        ctx = self.context
        if ctx is None:
            return run(*args, **kwargs)
        at, ctx.at = ctx.at, ctx.at + 1
        order = self.cut.patched_calls
        index = order[at] if at < len(order) else len(self.cut.calls)
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
            start = time.perf_counter()
            metas = ctx.metas[index] if ctx.metas is not None else {}
            out = _rebuild(
                plan, ctx.values, metas, ctx.batch, self.full_placeholders, index, self.placeholders
            )
            self.stats.overhead_seconds += time.perf_counter() - start
            return out
        start = time.perf_counter()
        out = run(*args, **kwargs)
        ctx.seconds += time.perf_counter() - start
        self._keep(index, plan, out, ctx)
        if ctx.mode is Mode.PREFIX and index == self.cut.last_needed:
            raise _PrefixDone
        return out

    # ------------------------------------------------------------------ before and after the forward
    def enter(self, args: tuple, kwargs: dict, run: Callable[..., Any]) -> Step:
        """Decide what to do with a call of the cut; serve it outright where possible."""
        if not self.active or self.context is not None:
            return Step()
        self.calls += 1
        ids, self.step_ids = self.step_ids, None
        if self.aliased:
            self._check_aliases()
        stats, start = self.stats, time.perf_counter()
        if self.cut.kind == "graph" and not self.cut.recorded:
            return Step(result=self._record(args, kwargs, run, ids))
        if self.guard is not None and (problem := self.guard.problem()) is not None:
            self.reporter.invalidate(problem)
            stats.bypassed += 1
            return Step()
        table_key, batch, batched = CallKeys.table_key_of(args, kwargs, self.fp)
        if batch < self.settings.min_rows or any(t.requires_grad for t in batched):
            stats.bypassed += 1
            return Step()
        call = CallKeys(table_key, self._keys(table_key, batch, batched, ids), batch, batched)
        step = Step(call=call, start=start, args=args, kwargs=kwargs, run=run)
        stats.lookups += batch
        self.batch_rows = max(self.batch_rows, batch)
        if not self.cut.recorded:  # the first call of a module cut: compute and store everything
            step.first = True
            return step
        found = self.store.lookup(table_key, call.keys)
        if -1 in found:
            hit = [i for i, r in enumerate(found) if r >= 0]
            miss = [i for i, r in enumerate(found) if r < 0]
        else:
            hit, miss = list(range(len(found))), []
        stats.found += len(hit)
        servable = self.cut.kind == "module" or table_key in self.metas
        try:
            if not miss and servable:
                values = self._stored(table_key, found, call.keys, batched[0].device)
                stats.hits += batch
            elif hit and servable and len(miss) >= self.settings.min_rows and self.cut.prefix_ok:
                values = self._with_misses(step, found, hit, miss)
                stats.hits += len(hit)
            else:
                step.rows = torch.as_tensor(miss) if hit else None
                if self.cut.kind == "graph":
                    step.context = self.context = _Context(Mode.CAPTURE, batch, rows=step.rows)
                    step.context.metas = [] if table_key not in self.metas else None
                    if len(self.cut.slots) == 1 and self.settings.verify_left <= 0:
                        step.context.call = call
                stats.overhead_seconds += time.perf_counter() - start
                return step
        except Unsupported as err:
            self.reporter.switch_off(str(err))
            return Step()
        if self.cut.kind == "module":
            result = _rebuild(self.cut.calls[0], values, {}, batch, set(), 0, {})
            stats.overhead_seconds += time.perf_counter() - start
            return Step(result=result)
        self.context = _Context(Mode.SERVE, batch, values=values, metas=self.metas[table_key])
        stats.overhead_seconds += time.perf_counter() - start
        return Step(context=self.context)

    def leave(self, step: Step, out: Any) -> None:
        """The forward ran (``out`` is None if it failed): store what it computed."""
        ctx, self.context = step.context, None
        if out is None or step.call is None:
            return
        call, seconds = step.call, time.perf_counter() - step.start
        if self.cut.kind == "module":
            values = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if step.first and not self._first_module_output(out, call, values):
                return
        else:
            assert ctx is not None
            seconds = ctx.seconds
            if ctx.broken or len(ctx.captured) != len(self.cut.slots):
                self.reporter.warn_once(
                    "capture",
                    f"FrozenPrefixCache: a forward of {self.cut.root_name!r} did not call its frozen blocks as "
                    f"recorded ({ctx.broken or 'a needed block was not called'}); that batch is not stored",
                )
                return
            if ctx.metas is not None:
                self.metas[call.table_key] = ctx.metas
            if ctx.call is not None:  # stored already
                self.stats.miss(call.batch if step.rows is None else len(step.rows), seconds)
                return
            values = [ctx.captured[s] for s in range(len(self.cut.slots))]
        self.stats.miss(call.batch if step.rows is None else len(step.rows), seconds)
        if step.rows is not None and self.cut.kind == "module":
            values = [v.index_select(0, step.rows.to(v.device)) for v in values]
        try:
            self._insert(call, values, step.rows)
        except Unsupported as err:
            self.reporter.switch_off(str(err))
            return
        if step.rows is None and step.run is not None:
            self._check(step.args, step.kwargs, step.run, call, values)

    def _keys(
        self, table_key: Any, batch: int, batched: list[torch.Tensor], ids: list[int] | None
    ) -> list[bytes]:
        """The call's row keys: by sample id where the step has ids for it, else by hashing every row."""
        if ids is None or self.ids is None:
            self.stats.hashed += batch
            return row_keys(self.fp, batched)
        if len(ids) != batch:
            self.reporter.warn_once(
                "ids-batch",
                f"FrozenPrefixCache: the training batch has {len(ids)} sample ids, but {self.cut.root_name!r} was "
                f"called with a batch of {batch}; such calls are keyed by hashing their inputs",
            )
            self.stats.hashed += batch
            return row_keys(self.fp, batched)
        keys, hashed = self.ids.keys(self.fp, table_key, ids, batched)
        self.stats.hashed += hashed
        if self.ids.mismatch is not None:
            self.reporter.stop_ids(self.ids.mismatch)
            self.ids = None
        return keys

    def _stored(
        self, table_key: Any, found: list[int], keys: list[bytes], device: torch.device
    ) -> list[torch.Tensor]:
        """The stored rows of a whole batch: without a copy where they lie in order in RAM (a batch asked for as it
        was stored), else gathered."""
        if (
            self.alias_ok
            and device.type == "cpu"
            and (values := self.store.alias(table_key, found)) is not None
        ):
            self.aliased.append((self.step_no, values, [v._version for v in values], table_key, keys))
            self.stats.uncopied += len(found)
            return values
        return self.store.gather(table_key, found, device)

    def _check_aliases(self) -> None:
        """Rows served without a copy (in this step or the last) that the step wrote into in place: their stored
        rows changed with them, so they are forgotten (computed and stored again when next asked for) and from
        then on rows are copied. Checked at every call of the cut and at the end of every step."""
        for _, values, versions, table_key, keys in self.aliased:
            if any(v._version != n for v, n in zip(values, versions, strict=True)):
                self.store.forget(table_key, keys)
                if self.alias_ok:
                    self.alias_ok = False
                    self.reporter.event(
                        "copy_rows", why="the step wrote in place into rows served without a copy"
                    )
        self.aliased = [a for a in self.aliased if not self.active or a[0] == self.step_no]

    # ------------------------------------------------------------------ first calls
    def _record(self, args: tuple, kwargs: dict, run: Callable[..., Any], ids: list[int] | None) -> Any:
        """The first call of a ``graph`` cut: run it once, recording which block outputs the rest needs."""
        table_key, batch, batched = CallKeys.table_key_of(args, kwargs, self.fp)
        if batch < self.settings.min_rows or any(t.requires_grad for t in batched):
            return run(*args, **kwargs)
        call = CallKeys(table_key, self._keys(table_key, batch, batched, ids), batch, batched)
        start = time.perf_counter()
        visible = {name for name, _, _ in self.inherited[0].slots} if self.inherited is not None else ()
        rec = record(self.cut.root, args, kwargs, self.cut.blocks, run, self.cut.root_name, visible)
        reason = self.cut.complete(rec)
        if reason is not None:
            self.reporter.no_cut(reason)
            return rec.output
        self.guard = Guard(
            self.cut.skipped_modules(), self.fp, self.cut.reads, self.cut.modes, self.settings.lasting
        )
        self.install(prune=True)  # the blocks as recorded: a promoted module is skipped whole
        self.placeholders = {}
        self.full_placeholders = {
            (i, j)
            for i, c in enumerate(self.cut.calls)
            for j, (path, what) in enumerate(c.leaves)
            if what == "tensor" and (i, path) in rec.glue_reads
        }
        self.metas[call.table_key] = [_metas(c.outputs) if c.cacheable else {} for c in rec.calls]
        values = [rec.value(vid) for vid in sorted(rec.needed)]
        self._adopt(call, values)
        self._insert(call, values, None)
        self.stats.record_seconds += time.perf_counter() - start
        self.stats.lookups += call.batch
        self.stats.miss(call.batch, 0.0)
        self.reporter.event("record", cut=self.cut.describe(), slots=len(self.cut.slots), stop=self.cut.stop)
        if self.cut.stop is not None:
            self.reporter.warn_once(
                f"stop:{self.cut.stop}",
                f"FrozenPrefixCache: caching {self.cut.describe()}, not the whole frozen prefix; the cut stops at "
                f"{self.cut.stop}.",
            )
        self._check(args, kwargs, run, call, values)
        return rec.output

    def _first_module_output(self, out: Any, call: CallKeys, values: list[torch.Tensor]) -> bool:
        reason = self.cut.complete_module(out, call.batch)
        if reason is not None:
            self.reporter.no_cut(reason)
            return False
        self.guard = Guard(self.cut.skipped_modules(), self.fp, (), lasting=self.settings.lasting)
        self._adopt(call, values)
        return True

    def _adopt(self, call: CallKeys, fresh: list[torch.Tensor]) -> None:
        """Take over the rows of the cut this one replaces; compare the carried-over rows of this batch's
        samples with their fresh values."""
        if self.inherited is None:
            return
        old_cut, old_store = self.inherited
        self.inherited = None
        start, before = time.perf_counter(), old_store.entries
        rows = max(self.settings.min_rows, self.batch_rows or 64)
        device = fresh[0].device
        store, what = carry_over(
            old_cut, old_store, self.cut, call.table_key, rows, self.settings.min_rows, device
        )
        if store is None:
            self.reporter.event("drop", entries=before, why=what)
            old_store.clear()
            self.ids = (
                SampleIds() if self.ids is not None else None
            )  # the ids' fingerprints went with the rows
            return
        self.store = store
        if what == "extended":
            self.reporter.event("extend", entries=store.entries, seconds=time.perf_counter() - start)
            found = store.lookup(call.table_key, call.keys)
            hit = [i for i, r in enumerate(found) if r >= 0]
            if hit:  # free: this batch's fresh values are at hand
                stored = store.gather(call.table_key, [found[i] for i in hit], device)
                pick = torch.as_tensor(hit, device=device)
                self._verdict(stored, [v.index_select(0, pick) for v in fresh])

    # ------------------------------------------------------------------ computing some samples
    def _with_misses(
        self, step: Step, found: list[int], hit: list[int], miss: list[int]
    ) -> list[torch.Tensor]:
        """The slot values of the whole batch: stored rows for ``hit``, computed (and stored) for ``miss``."""
        call = step.call
        assert call is not None and step.run is not None
        miss_idx = torch.as_tensor(miss)
        sub_args, sub_kwargs = select_rows(step.args, step.kwargs, call.batch, miss_idx)
        fresh = self._prefix_values(sub_args, sub_kwargs, step.run)
        old = self.store.gather(call.table_key, [found[i] for i in hit], fresh[0].device)
        values = []
        for slot, sub in enumerate(fresh):
            out = torch.empty((call.batch, *sub.shape[1:]), dtype=sub.dtype, device=sub.device)
            fmt = memory_format(sub)
            out = out.contiguous(memory_format=fmt) if fmt is not None else out
            out[torch.as_tensor(hit, device=sub.device)] = old[slot]
            out[miss_idx.to(sub.device)] = sub
            values.append(out)
        self._insert(CallKeys(call.table_key, [call.keys[i] for i in miss], len(miss), []), fresh, None)
        return values

    def _prefix_values(
        self, args: tuple, kwargs: dict, run: Callable[..., Any], count: bool = True
    ) -> list[torch.Tensor]:
        """The slot values for this (sub-)batch, from the forward run only up to the last needed block."""
        start = time.perf_counter()
        batch = CallKeys.split(args, kwargs)[0]
        if self.cut.kind == "module":
            with torch.no_grad():
                out = run(*args, **kwargs)
            if count:
                self.stats.miss(batch, time.perf_counter() - start)
            return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        ctx = self.context = _Context(Mode.PREFIX, batch)
        device = next(
            (t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None
        )
        devices = [device.index or 0] if device is not None and device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                run(*args, **kwargs)
        except _PrefixDone:
            pass
        finally:
            self.context = None
        if count:
            self.stats.miss(batch, ctx.seconds)
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
            ctx.metas[index] = _metas(out)
        for (_, what), leaf in zip(plan.leaves, pytree.tree_leaves(out), strict=False):
            if isinstance(what, int) and isinstance(leaf, torch.Tensor):
                leaf = leaf.detach()
                rows = ctx.rows
                if ctx.call is not None:  # the one slot: into the store right away (one copy)
                    ctx.captured[what] = leaf
                    picked = leaf if rows is None else leaf.index_select(0, rows.to(leaf.device))
                    self._insert(ctx.call, [picked], rows)
                    continue
                # a copy: the rest of the forward may write into the block's output in place
                ctx.captured[what] = (
                    leaf.index_select(0, rows.to(leaf.device)) if rows is not None else leaf.clone()
                )

    def _insert(self, call: CallKeys, values: list[torch.Tensor], rows: torch.Tensor | None) -> None:
        keys = call.keys if rows is None else [call.keys[i] for i in rows.tolist()]
        start = time.perf_counter()
        if not self.store.tables:  # room for an epoch of samples from the start
            self.store.expected_rows = self.settings.batches_per_epoch * call.batch
        self.stats.stored += self.store.insert(call.table_key, keys, values)
        self.stats.overhead_seconds += time.perf_counter() - start

    def _check(
        self, args: tuple, kwargs: dict, run: Callable[..., Any], call: CallKeys, values: list[torch.Tensor]
    ) -> None:
        """While checks are left (:data:`VERIFY_PER_FIT`): compute the first half of a batch just stored again, in reverse order (another
        batch composition), and compare it with what was stored."""
        if self.settings.verify_left <= 0 or (self.cut.kind == "graph" and not self.cut.prefix_ok):
            return
        half = call.batch // 2
        rows = torch.arange((half if half >= self.settings.min_rows else call.batch) - 1, -1, -1)
        sub_args, sub_kwargs = select_rows(args, kwargs, call.batch, rows)
        try:
            fresh = self._prefix_values(sub_args, sub_kwargs, run, count=False)
        except Unsupported as err:  # the check's own forward went another way: switch off, never fail the fit
            self.reporter.switch_off(str(err))
            return
        self.settings.verify_left -= 1
        self._verdict([v.index_select(0, rows.to(v.device)) for v in values], fresh)

    def _verdict(self, stored: list[torch.Tensor], fresh: list[torch.Tensor]) -> None:
        self.stats.verified += 1
        found = compare(stored, fresh, rounding_differs=self.settings.off_on_rounding)
        if found is None:
            return
        kind, message = found
        if kind == "rounding":
            self.reporter.warn_once(
                "rounding",
                f"FrozenPrefixCache: {message}. Training is as correct as with nondeterministic kernels, but not "
                "bit-identical to an uncached run. Pass on_mismatch='off' to switch the cache off in this case.",
            )
        else:
            self.reporter.switch_off(message)


def _metas(out: Any) -> dict[int, Any]:
    """The shape after the batch dimension, dtype and device of every tensor in a block's output."""
    return {
        j: (tuple(t.shape[1:]), t.dtype, t.device)
        for j, t in enumerate(pytree.tree_leaves(out))
        if isinstance(t, torch.Tensor)
    }


def _rebuild(
    plan: CallPlan,
    values: Sequence[torch.Tensor],
    metas: dict[int, Any],
    batch: int,
    full: set[tuple[int, int]],
    index: int,
    shared: dict[Any, torch.Tensor],
) -> Any:
    """A skipped block's output: stored rows in the slots, placeholders elsewhere, constants as recorded."""
    leaves = []
    for j, (_, what) in enumerate(plan.leaves):
        if isinstance(what, int):
            leaves.append(values[what])
        elif what == "tensor":
            tail, dtype, device = metas[j]
            if (index, j) in full:
                leaves.append(torch.zeros((batch, *tail), dtype=dtype, device=device))
            else:  # only skipped blocks and shape queries see it
                key = (index, j, batch, tail, dtype, device)
                if key not in shared:
                    shared[key] = torch.zeros((), dtype=dtype, device=device).expand(batch, *tail)
                leaves.append(shared[key])
        else:
            leaves.append(what[1])
    return pytree.tree_unflatten(leaves, plan.spec)
