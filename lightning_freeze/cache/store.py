"""Memory of the FrozenPrefixCache: a byte-budgeted store of per-sample output rows on the CPU.

Rows of one shape and dtype live in fixed-size chunks (pinned and filled asynchronously when the model
runs on CUDA). Past the budget the store takes nothing more: it never evicts and never spills, so a
full store keeps serving the samples it has. No Lightning here; the callback decides what goes in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

_CHUNK_BYTES = 8 << 20


class Unsupported(Exception):
    """The cached part does something the cache cannot serve (e.g. output not batch-first)."""


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str | None, available: int | None = None) -> int | None:
    """``None`` -> None (use the default); ``int`` bytes; ``"512MB"``/``"2GiB"``; a float in (0, 1) is a
    fraction of ``available`` bytes. A float of 1 or more must be whole (``1.5`` is neither a fraction
    nor a byte count: write ``"1.5GB"``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"FrozenPrefixCache: max_bytes must be a size, got {value!r}")
    if isinstance(value, float) and 0 < value < 1:
        if available is None:
            raise ValueError("a fractional max_bytes needs the available memory")
        return int(value * available)
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value) or value != int(value):
            raise ValueError(
                f"FrozenPrefixCache: max_bytes={value!r} is neither a fraction of the available RAM (a number in "
                "(0, 1)) nor a whole number of bytes; write e.g. 0.25, 2000000000 or '2GB'"
            )
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"FrozenPrefixCache: max_bytes: cannot read {value!r}; give bytes (int) or e.g. '512MB', '2GiB'"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def should_switch_off(hits: int, lookups: int, entries_at_start: int, min_hit_rate: float) -> bool:
    """After an epoch that started with ``entries_at_start`` cached rows: were too few of them reused?

    If inputs repeat, every cached sample is looked up again, so ``hits`` is about
    ``min(entries_at_start, lookups)`` (also when the budget capped the cache); random augmentation
    makes ``hits`` about 0.
    """
    expected = min(entries_at_start, lookups)
    if expected <= 0:
        return False
    return hits < min_hit_rate * expected


class Slab:
    """Rows of one shape and dtype in fixed-size CPU chunks (pinned when feeding a GPU)."""

    def __init__(
        self,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        pin: bool,
        fmt: torch.memory_format | None = None,
    ) -> None:
        self.row_shape, self.dtype, self.pin, self.fmt = row_shape, dtype, pin, fmt
        self.row_bytes = max(1, math.prod(row_shape)) * torch.empty((), dtype=dtype).element_size()
        self.chunk_rows = max(1, _CHUNK_BYTES // self.row_bytes)
        self.chunks: list[torch.Tensor] = []
        self.n = 0

    @property
    def capacity(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    @property
    def allocated(self) -> int:
        return self.capacity * self.row_bytes

    def grow(self, rows: int) -> None:
        with torch.inference_mode(False):
            self.chunks.append(torch.empty((rows, *self.row_shape), dtype=self.dtype, pin_memory=self.pin))

    def write(self, start: int, rows: torch.Tensor) -> None:
        non_blocking = self.pin and rows.device.type == "cuda"
        with torch.inference_mode(False), torch.no_grad():
            done = 0
            while done < rows.shape[0]:
                slot = start + done
                c, off = divmod(slot, self.chunk_rows)
                m = min(rows.shape[0] - done, self.chunks[c].shape[0] - off)
                self.chunks[c][off : off + m].copy_(rows[done : done + m], non_blocking=non_blocking)
                done += m

    def gather(self, slots: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(slots, dtype=torch.int64)
        with torch.inference_mode(False):
            if len(self.chunks) == 1:
                return (
                    self.chunks[0].index_select(0, idx)
                    if not self.pin
                    else _pinned_select(self.chunks[0], idx)
                )
            cid, off = idx // self.chunk_rows, idx % self.chunk_rows
            out = torch.empty((len(slots), *self.row_shape), dtype=self.dtype, pin_memory=self.pin)
            for c in torch.unique(cid).tolist():
                where = (cid == c).nonzero().squeeze(1)
                out[where] = self.chunks[c].index_select(0, off[where])
            return out


def _pinned_select(chunk: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.empty((idx.shape[0], *chunk.shape[1:]), dtype=chunk.dtype, pin_memory=True)
    torch.index_select(chunk, 0, idx, out=out)
    return out


class RowStore:
    """Fingerprint -> row, per input signature; bounded by ``budget`` bytes of chunk allocations."""

    def __init__(self, budget: int, pin: bool) -> None:
        self.budget, self.pin = budget, pin
        self.index: dict[tuple[Any, ...], dict[bytes, int]] = {}
        self.slabs: dict[tuple[Any, ...], Slab] = {}
        self.full = False
        self.pending: Any = None  # CUDA event of the last device-to-host copy

    @property
    def entries(self) -> int:
        return sum(len(ix) for ix in self.index.values())

    @property
    def allocated(self) -> int:
        return sum(s.allocated for s in self.slabs.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.n * s.row_bytes for s in self.slabs.values())

    def lookup(self, sig: tuple[Any, ...], keys: Sequence[bytes]) -> list[int]:
        ix = self.index.get(sig)
        if not ix:
            return [-1] * len(keys)
        return [ix.get(k, -1) for k in keys]

    def insert(self, sig: tuple[Any, ...], keys: Sequence[bytes], rows: torch.Tensor) -> int:
        """Store ``rows[i]`` under ``keys[i]`` for new keys, as far as the budget allows; returns how many."""
        ix = self.index.setdefault(sig, {})
        slab = self.slabs.get(sig)
        if slab is None:
            slab = self.slabs[sig] = Slab(tuple(rows.shape[1:]), rows.dtype, self.pin, memory_format(rows))
        elif slab.row_shape != tuple(rows.shape[1:]) or slab.dtype != rows.dtype:
            raise Unsupported(
                f"the prefix gave rows of {tuple(rows.shape[1:])}/{rows.dtype} for inputs that "
                f"gave {slab.row_shape}/{slab.dtype} before"
            )
        fresh, seen = [], set()
        for i, k in enumerate(keys):
            if k not in ix and k not in seen:
                fresh.append(i)
                seen.add(k)
        room = self._reserve(slab, len(fresh))
        fresh = fresh[:room]
        if not fresh:
            return 0
        start = slab.n
        if len(fresh) == rows.shape[0]:
            picked = rows.detach()
        else:
            picked = rows.detach().index_select(0, torch.as_tensor(fresh, device=rows.device))
        slab.write(start, picked)
        if slab.pin and rows.device.type == "cuda":
            self.pending = torch.cuda.Event()
            self.pending.record()
        for n, i in enumerate(fresh):
            ix[keys[i]] = start + n
        slab.n += len(fresh)
        return len(fresh)

    def _reserve(self, slab: Slab, rows: int) -> int:
        while slab.capacity - slab.n < rows and not self.full:
            left = (self.budget - self.allocated) // slab.row_bytes
            if left <= 0:
                self.full = True
                break
            slab.grow(int(min(slab.chunk_rows, left)))
        return min(rows, slab.capacity - slab.n)

    def gather(self, sig: tuple[Any, ...], slots: Sequence[int], device: torch.device) -> torch.Tensor:
        self.sync()
        slab = self.slabs[sig]
        rows = slab.gather(slots)
        if device.type != "cpu":
            rows = rows.to(device, non_blocking=self.pin)
        if (
            slab.fmt is not None
        ):  # serve the strides the prefix produced: kernels downstream may depend on them
            rows = rows.contiguous(memory_format=slab.fmt)
        return rows

    def sync(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None

    def transform(
        self, fn: Callable[[torch.Tensor], torch.Tensor], batch_rows: int, min_rows: int, device: torch.device
    ) -> None:
        """Replace every stored row ``r`` by ``fn(r)`` (in batches of ``batch_rows``, never fewer than
        ``min_rows``), keeping the keys; rows past the budget are dropped."""
        self.sync()
        old_slabs, old_index = self.slabs, self.index
        self.slabs, self.index, self.full = {}, {}, False
        for sig, old in old_slabs.items():
            items = sorted(old_index.get(sig, {}).items(), key=lambda kv: kv[1])
            bounds = list(range(0, len(items), batch_rows)) + [len(items)]
            if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_rows:
                del bounds[-2]  # merge a tiny tail into the previous batch
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                part = items[lo:hi]
                rows = old.gather([slot for _, slot in part])
                if device.type != "cpu":
                    rows = rows.to(device, non_blocking=old.pin)
                self.insert(sig, [k for k, _ in part], fn(rows))
                for c in range(len(old.chunks)):  # free consumed chunks: the peak stays near the budget
                    if (c + 1) * old.chunk_rows <= hi:
                        old.chunks[c] = old.chunks[c].new_empty((0, *old.row_shape))


def memory_format(t: torch.Tensor) -> torch.memory_format | None:
    """``channels_last`` (3d) when ``t`` is laid out that way rather than contiguous, else None."""
    if t.is_contiguous():
        return None
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == dims and t.is_contiguous(memory_format=fmt):
            return fmt
    return None


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaNs with equal payloads are equal; ``-0.0`` differs from ``0.0``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bool or a.numel() == 0:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
