"""The cache's memory: per-sample rows in two tiers, RAM first, then memory-mapped files on disk.

A sample's entry is one row in each *slot* (one slot per tensor the suffix needs from the frozen prefix),
stored under its 128-bit input fingerprint, per table key (the non-per-sample part of the call: shapes, dtypes, constants). Rows live in chunks of about 8 MB: in RAM
(pinned when feeding a GPU) while ``ram_budget`` allows, then in files of the :class:`DiskTier` while its
budget allows. Past both budgets the store takes nothing more: it never evicts, so a full store keeps
serving the samples it has. Rows are kept in the dtype the prefix produced them in (under autocast
that is usually bf16/fp16: half the bytes, and exactly what the suffix receives).

No Lightning here; the callback decides what goes in.

>>> store = RowStore(ram_budget=1 << 20)
>>> rows = torch.arange(12.0).reshape(3, 4)
>>> store.insert("table_key", [b"a", b"b", b"c"], [rows])
3
>>> store.gather("table_key", store.lookup("table_key", [b"c", b"a"]), torch.device("cpu"))[0]
tensor([[ 8.,  9., 10., 11.],
        [ 0.,  1.,  2.,  3.]])
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_freeze.cache.disk import DiskTier

CHUNK_BYTES = 8 << 20
_ALIGN = 64


class Unsupported(Exception):
    """The prefix gives something the store cannot keep (e.g. rows whose shape changes for equal inputs)."""


@dataclass(frozen=True)
class Layout:
    """The shape, dtype and memory format of one slot's rows."""

    row_shape: tuple[int, ...]
    dtype: torch.dtype
    fmt: torch.memory_format | None = None

    @property
    def row_bytes(self) -> int:
        return max(1, math.prod(self.row_shape)) * torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def of(batch: torch.Tensor) -> Layout:
        return Layout(tuple(batch.shape[1:]), batch.dtype, memory_format(batch))


@dataclass(eq=False)
class Chunk:
    """Rows ``start .. start + rows - 1`` of every slot, in RAM or in one mapped file."""

    start: int
    rows: int
    on_disk: bool
    tensors: list[torch.Tensor]
    nbytes: int
    mapping: object = None  # the np.memmap behind disk chunks (kept alive with them)


@dataclass(eq=False)
class Table:
    """The rows of one table key: their slot layouts and the chunks holding them."""

    layouts: tuple[Layout, ...]
    chunks: list[Chunk] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    n: int = 0

    @property
    def row_bytes(self) -> int:
        return sum(layout.row_bytes for layout in self.layouts)

    @property
    def capacity(self) -> int:
        return sum(c.rows for c in self.chunks)

    def locate(self, rows: torch.Tensor) -> list[tuple[Chunk, torch.Tensor, torch.Tensor]]:
        """(chunk, positions in ``rows``, rows within the chunk) for every chunk that ``rows`` touch."""
        if len(self.chunks) == 1:
            chunk = self.chunks[0]
            return [(chunk, torch.arange(rows.shape[0]), rows - chunk.start if chunk.start else rows)]
        which = torch.searchsorted(torch.as_tensor(self.starts), rows, right=True) - 1
        out = []
        for c in torch.unique(which).tolist():
            where = (which == c).nonzero().squeeze(1)
            out.append((self.chunks[c], where, rows[where] - self.chunks[c].start))
        return out


class RowStore:
    """Fingerprint -> row number per table key, and the rows of every slot, in RAM then on disk."""

    def __init__(self, ram_budget: int, disk: DiskTier | None = None, pin: bool = False) -> None:
        self.ram_budget, self.disk, self.pin = int(ram_budget), disk, pin
        self.index: dict[Hashable, dict[bytes, int]] = {}
        self.tables: dict[Hashable, Table] = {}
        self.full = False
        self.pending: object = None  # CUDA event of the last device-to-host copy
        # the rows one epoch should store (0: unknown): the first table's RAM tensor is made that large at once, so
        # filling it copies no row twice (growing copies every row so far)
        self.expected_rows = 0

    # ------------------------------------------------------------------ sizes
    @property
    def entries(self) -> int:
        return sum(len(ix) for ix in self.index.values())

    @property
    def ram_bytes(self) -> int:
        return sum(c.nbytes for t in self.tables.values() for c in t.chunks if not c.on_disk)

    @property
    def disk_bytes(self) -> int:
        return sum(c.nbytes for t in self.tables.values() for c in t.chunks if c.on_disk)

    @property
    def disk_entries(self) -> int:
        return sum(
            min(c.rows, max(0, t.n - c.start)) for t in self.tables.values() for c in t.chunks if c.on_disk
        )

    @property
    def used_bytes(self) -> int:
        return sum(t.n * t.row_bytes for t in self.tables.values())

    def sizes(self) -> dict[str, Any]:
        """What the store holds, for the callback's history (the same keys as :meth:`empty_sizes`)."""
        ram, disk = self.ram_bytes, self.disk_bytes
        return {
            "entries": self.entries,
            "ram_bytes": ram,
            "disk_bytes": disk,
            "bytes": ram + disk,
            "disk_entries": self.disk_entries,
            "used_bytes": self.used_bytes,
            "full": bool(self.full),
            "rows": self.describe_rows(),
        }

    @staticmethod
    def empty_sizes() -> dict[str, Any]:
        return {"entries": 0, "ram_bytes": 0, "disk_bytes": 0, "bytes": 0, "disk_entries": 0, "used_bytes": 0,
                "full": False, "rows": []}  # fmt: skip

    def describe_rows(self) -> list[str]:
        """Each table's slots as ``dtype[shape]``, e.g. ``['torch.bfloat16[16, 4, 4]']``."""
        return [
            f"{layout.dtype}{list(layout.row_shape)}" for t in self.tables.values() for layout in t.layouts
        ]

    # ------------------------------------------------------------------ reading
    def lookup(self, table_key: Hashable, keys: Sequence[bytes]) -> list[int]:
        ix = self.index.get(table_key)
        if not ix:
            return [-1] * len(keys)
        return [ix.get(k, -1) for k in keys]

    def alias(self, table_key: Hashable, rows: Sequence[int]) -> list[torch.Tensor] | None:
        """``rows`` of every slot without a copy, when they lie one after the other in the RAM tier's one tensor
        per slot (a batch asked for in the order it was stored) and no slot needs another memory format; else None.

        Each is a new tensor on the stored memory with a version counter of its own: writes into other rows of the
        store (new entries) do not count as writes into it (autograd would refuse its backward), and a write into it
        shows in its own ``_version`` (the caller checks it and makes the store :meth:`forget` the rows).
        """
        table = self.tables[table_key]
        first, n = rows[0], len(rows)
        if len(table.chunks) != 1 or table.chunks[0].on_disk or self.pin or rows[-1] != first + n - 1:
            return None
        if any(layout.fmt is not None for layout in table.layouts) or list(rows) != list(
            range(first, first + n)
        ):
            return None
        out = []
        for t in table.chunks[0].tensors:
            offset = t.storage_offset() + first * t.stride(0)
            if (t.data_ptr() + first * t.stride(0) * t.element_size()) % _ALIGN:
                return None  # a fresh tensor is aligned: kernels may take other paths otherwise
            out.append(t.new_empty(0).set_(t.untyped_storage(), offset, (n, *t.shape[1:]), t.stride()))
        return out

    def forget(self, table_key: Hashable, keys: Sequence[bytes]) -> None:
        """Drop ``keys`` from the index (their rows stay allocated but are never served again)."""
        ix = self.index.get(table_key, {})
        for k in keys:
            ix.pop(k, None)

    def gather(self, table_key: Hashable, rows: Sequence[int], device: torch.device) -> list[torch.Tensor]:
        """One tensor per slot holding ``rows`` in that order, on ``device``, in the stored memory format."""
        return self.place(table_key, self.read(table_key, rows, pin=device.type == "cuda"), device)

    def read(self, table_key: Hashable, rows: Sequence[int], pin: bool = False) -> list[torch.Tensor]:
        """``rows`` of every slot in host memory (pinned if asked and the store pins)."""
        self.sync()
        table = self.tables[table_key]
        pin = pin and self.pin
        index = torch.as_tensor(rows, dtype=torch.int64)
        if len(table.chunks) == 1 and not pin:  # the RAM tier alone: one indexed copy per slot
            return [t.index_select(0, index) for t in table.chunks[0].tensors]
        parts = table.locate(index)
        out = []
        for s, layout in enumerate(table.layouts):
            got = torch.empty((len(rows), *layout.row_shape), dtype=layout.dtype, pin_memory=pin)
            for chunk, where, local in parts:
                if len(parts) == 1:
                    torch.index_select(chunk.tensors[s], 0, local, out=got)
                else:
                    got.index_copy_(0, where, chunk.tensors[s].index_select(0, local))
            out.append(got)
        return out

    def place(
        self, table_key: Hashable, host: list[torch.Tensor], device: torch.device
    ) -> list[torch.Tensor]:
        """Rows read by :meth:`read`, on ``device`` and in the memory format the prefix produced."""
        out = []
        for got, layout in zip(host, self.tables[table_key].layouts, strict=True):
            if device.type != "cpu":
                got = got.to(device, non_blocking=got.is_pinned())
            if (
                layout.fmt is not None
            ):  # the strides the prefix produced: kernels downstream may depend on them
                got = got.contiguous(memory_format=layout.fmt)
            out.append(got)
        return out

    def sync(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()  # type: ignore[attr-defined]
            self.pending = None

    # ------------------------------------------------------------------ writing
    def insert(self, table_key: Hashable, keys: Sequence[bytes], values: Sequence[torch.Tensor]) -> int:
        """Store row ``i`` of every tensor in ``values`` under ``keys[i]`` for new keys, as far as the
        budgets allow; returns how many were stored."""
        layouts = tuple(Layout.of(v) for v in values)
        table = self.tables.get(table_key)
        if table is None:
            table = self.tables[table_key] = Table(layouts)
        elif [(a.row_shape, a.dtype) for a in table.layouts] != [(b.row_shape, b.dtype) for b in layouts]:
            raise Unsupported(
                f"the prefix gave rows of {[(b.row_shape, b.dtype) for b in layouts]} for inputs that gave "
                f"{[(a.row_shape, a.dtype) for a in table.layouts]} before"
            )
        ix = self.index.setdefault(table_key, {})
        fresh, seen = [], set()
        for i, k in enumerate(keys):
            if k not in ix and k not in seen:
                fresh.append(i)
                seen.add(k)
        fresh = fresh[: self._reserve(table, len(fresh))]
        if not fresh:
            return 0
        device = values[0].device
        pick = None if len(fresh) == values[0].shape[0] else torch.as_tensor(fresh, device=device)
        start = table.n
        for s, v in enumerate(values):
            v = v.detach()
            self._write(table, s, start, v if pick is None else v.index_select(0, pick))
        if self.pin and device.type == "cuda":
            self.pending = torch.cuda.Event()
            self.pending.record()  # type: ignore[attr-defined]
        for n, i in enumerate(fresh):
            ix[keys[i]] = start + n
        table.n += len(fresh)
        return len(fresh)

    def _write(self, table: Table, slot: int, start: int, rows: torch.Tensor) -> None:
        non_blocking = self.pin and rows.device.type == "cuda"
        with torch.inference_mode(False), torch.no_grad():
            done = 0
            while done < rows.shape[0]:
                at = start + done
                chunk = table.chunks[bisect.bisect_right(table.starts, at) - 1]
                off = at - chunk.start
                m = min(rows.shape[0] - done, chunk.rows - off)
                chunk.tensors[slot][off : off + m].copy_(rows[done : done + m], non_blocking=non_blocking)
                done += m

    def _reserve(self, table: Table, rows: int) -> int:
        """Grow ``table`` until ``rows`` more rows fit or both budgets are spent; returns how many fit."""
        per_chunk = max(1, CHUNK_BYTES // table.row_bytes)
        while table.capacity - table.n < rows and not self.full:
            if self._grow_ram(table, rows - (table.capacity - table.n)):
                continue
            chunk = self._new_chunk(table, per_chunk)
            if chunk is None:
                self.full = True
                break
            table.starts.append(chunk.start)
            table.chunks.append(chunk)
        return min(rows, table.capacity - table.n)

    def _grow_ram(self, table: Table, rows: int) -> bool:
        """Grow the table's one RAM chunk (at least doubling it, within the budget) by ``rows`` or more, so the
        RAM tier stays one tensor per slot and a lookup gathers its rows with one indexed copy. The rows are
        copied once per growth: amortised, one more copy per row."""
        if len(table.chunks) != 1 or table.chunks[0].on_disk:
            return False
        chunk = table.chunks[0]
        extra = min(max(chunk.rows, rows), (self.ram_budget - self.ram_bytes) // table.row_bytes)
        if extra <= 0:
            return False
        grown = chunk.rows + extra
        with torch.inference_mode(False), torch.no_grad():
            tensors = [
                torch.empty((grown, *layout.row_shape), dtype=layout.dtype, pin_memory=self.pin)
                for layout in table.layouts
            ]
            for new, old in zip(tensors, chunk.tensors, strict=True):
                new[: table.n].copy_(old[: table.n])
        chunk.tensors, chunk.rows, chunk.nbytes = tensors, grown, grown * table.row_bytes
        return True

    def _new_chunk(self, table: Table, per_chunk: int) -> Chunk | None:
        start = table.capacity
        ram_rows = (self.ram_budget - self.ram_bytes) // table.row_bytes
        if ram_rows > 0:
            first = not table.chunks and len(self.tables) == 1
            rows = int(min(max(per_chunk, self.expected_rows if first else 0), ram_rows))
            with torch.inference_mode(False):
                tensors = [
                    torch.empty((rows, *layout.row_shape), dtype=layout.dtype, pin_memory=self.pin)
                    for layout in table.layouts
                ]
            return Chunk(start, rows, False, tensors, rows * table.row_bytes)
        if self.disk is None:
            return None
        rows = int(min(per_chunk, self.disk.room() // (table.row_bytes + _ALIGN * len(table.layouts))))
        sizes = [_aligned(rows * layout.row_bytes) for layout in table.layouts]
        mapping = self.disk.allocate(sum(sizes)) if rows > 0 else None
        if mapping is None:
            return None
        tensors, off = [], 0
        with torch.inference_mode(False):
            raw = torch.from_numpy(mapping)
            for layout, size in zip(table.layouts, sizes, strict=True):
                part = raw[off : off + rows * layout.row_bytes].view(layout.dtype)
                tensors.append(part.view(rows, *layout.row_shape))
                off += size
        return Chunk(start, rows, True, tensors, sum(sizes), mapping)

    # ------------------------------------------------------------------ rebuilding
    def rebuild(
        self,
        fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        batch_rows: int,
        min_rows: int,
        device: torch.device,
    ) -> RowStore:
        """A new store holding ``fn(rows)`` for every stored entry (same keys), computed in batches of
        ``batch_rows`` (never fewer than ``min_rows``). This store's chunks are freed as they are consumed,
        so the peak stays near the budgets."""
        self.sync()
        new = RowStore(self.ram_budget, self.disk, self.pin)
        for table_key, table in list(self.tables.items()):
            items = sorted(self.index.get(table_key, {}).items(), key=lambda kv: kv[1])
            bounds = list(range(0, len(items), batch_rows)) + [len(items)]
            if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_rows:
                del bounds[-2]  # merge a tiny tail into the previous batch
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                part = items[lo:hi]
                rows = self._range(table, lo, hi)  # rows are numbered 0..n-1 in insertion order
                if rows is None:
                    rows = self.read(table_key, [row for _, row in part])
                rows = self.place(table_key, rows, device)
                new.append(table_key, [k for k, _ in part], fn(rows))
                while table.chunks and table.chunks[0].start + table.chunks[0].rows <= hi:
                    self._free(table.chunks.pop(0))  # consumed: give the memory back before the next batch
                    table.starts.pop(0)
        self.clear()
        return new

    @staticmethod
    def _range(table: Table, lo: int, hi: int) -> list[torch.Tensor] | None:
        """Rows ``lo .. hi - 1`` as views, when one chunk holds them all."""
        i = bisect.bisect_right(table.starts, lo) - 1
        chunk = table.chunks[i] if i >= 0 else None
        if chunk is None or hi > chunk.start + chunk.rows:
            return None
        return [t[lo - chunk.start : hi - chunk.start] for t in chunk.tensors]

    def append(self, table_key: Hashable, keys: Sequence[bytes], values: Sequence[torch.Tensor]) -> int:
        """Like :meth:`insert` for new, distinct keys, but takes the first batch's ``values`` over as the RAM chunk
        when they are contiguous host tensors that fit the RAM budget (no copy). For rebuilding a store."""
        table = self.tables.get(table_key)
        whole = table is None  # only the first batch: later ones grow the one RAM chunk (see _grow_ram)
        fits = self.ram_bytes + sum(v.numel() * v.element_size() for v in values) <= self.ram_budget
        host = all(v.device.type == "cpu" and v.is_contiguous() and not self.pin for v in values)
        ix = self.index.get(table_key, {})
        if not (whole and fits and host) or len(set(keys)) != len(keys) or any(k in ix for k in keys):
            return self.insert(table_key, keys, values)
        layouts = tuple(Layout.of(v) for v in values)
        if table is None:
            table = self.tables[table_key] = Table(layouts)
        elif [(a.row_shape, a.dtype) for a in table.layouts] != [(b.row_shape, b.dtype) for b in layouts]:
            return self.insert(table_key, keys, values)  # raises the usual error
        n = len(keys)
        chunk = Chunk(table.n, n, False, [v.detach() for v in values], n * table.row_bytes)
        table.starts.append(chunk.start)
        table.chunks.append(chunk)
        ix = self.index.setdefault(table_key, {})
        for i, k in enumerate(keys):
            ix[k] = table.n + i
        table.n += n
        return n

    def clear(self) -> None:
        """Forget every row and give the memory and the disk files back."""
        for table in self.tables.values():
            for chunk in table.chunks:
                self._free(chunk)
        self.tables, self.index, self.full = {}, {}, False

    def _free(self, chunk: Chunk) -> None:
        if chunk.on_disk and self.disk is not None:
            self.disk.free(chunk.mapping)  # type: ignore[arg-type]
        chunk.tensors = []


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def memory_format(t: torch.Tensor) -> torch.memory_format | None:
    """``channels_last`` (3d) when ``t`` is laid out that way rather than contiguous, else None."""
    if t.is_contiguous():
        return None
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == dims and t.is_contiguous(memory_format=fmt):
            return fmt
    return None
