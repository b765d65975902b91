"""Read the next batch's rows in a background thread while the current step runs.

When Lightning has fetched the next batch already (it does for iterable datasets and loaders without a
length, to know when an epoch ends), a worker thread fingerprints it and gathers its stored rows, from
RAM or from the disk tier's files, into a ready tensor while the current step computes. The step that
gets the batch then finds its keys and rows ready. This needs to know which of the batch's tensors the
cut's root is called with: learned from the previous step, where the root got tensors of the batch
unchanged. Anything that does not match exactly (other tensors, another signature, rows dropped or
rewritten in between) is ignored and the step reads as usual.

Hashing (``hashlib`` releases the GIL for large buffers) and ``index_select`` (torch releases it too) run in
parallel with the training step.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lightning_freeze.cache.fingerprint import Fingerprinter
from lightning_freeze.cache.keys import row_keys
from lightning_freeze.cache.store import RowStore


@dataclass
class Ready:
    """The next batch's keys and, when every sample was found, its rows (one tensor per slot, on the CPU)."""

    tensors: tuple[torch.Tensor, ...]  # the batch tensors the keys were computed from
    sig: Any
    keys: list[bytes]
    found: list[int]
    values: list[torch.Tensor] | None
    generation: int


class Readahead:
    """One worker thread that prepares the next batch's rows."""

    def __init__(self, fingerprinter: Fingerprinter) -> None:
        self.fp = fingerprinter
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        # batches being prepared, by the number of the step they are for
        self.pending: dict[int, concurrent.futures.Future[Ready | None]] = {}
        self.step = 0  # the number of the current training step (counted by :meth:`start`)
        self.leaves: list[int] | None = None  # which batch leaves the root's per-sample arguments are
        self.sig: Any = None  # the root's signature at the last call
        self.scheme = "cpu"
        self.used = 0  # batches served from a read-ahead

    # ------------------------------------------------------------------ learning where the root's inputs come from
    def learn(self, batch_leaves: Sequence[Any], batched: Sequence[torch.Tensor], sig: Any) -> None:
        """Remember which leaves of the current batch the root's per-sample tensors are (identity)."""
        where = []
        for t in batched:
            index = next((i for i, leaf in enumerate(batch_leaves) if leaf is t), None)
            if index is None:
                self.leaves = None
                return
            where.append(index)
        self.leaves, self.sig = where, sig
        self.scheme = "cpu" if batched[0].device.type == "cpu" else "device"

    # ------------------------------------------------------------------ the next batch
    def start(self, next_batch: Any, store: RowStore, pin: bool) -> None:
        """A training step starts: begin preparing the batch of the next one, ``next_batch`` (as the loader yields
        it), in the background."""
        self.step += 1
        self.pending = {k: v for k, v in self.pending.items() if k >= self.step}  # older ones were not taken
        if self.leaves is None or next_batch is None:
            return
        leaves = pytree.tree_leaves(next_batch)
        if max(self.leaves) >= len(leaves) or not all(
            isinstance(leaves[i], torch.Tensor) for i in self.leaves
        ):
            return
        tensors = tuple(leaves[i] for i in self.leaves)
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="frozen-prefix-readahead")
        self.pending[self.step + 1] = self.pool.submit(self._prepare, tensors, self.sig, store, pin)

    def _prepare(
        self, tensors: tuple[torch.Tensor, ...], sig: Any, store: RowStore, pin: bool
    ) -> Ready | None:
        try:
            generation = store.generation
            keys = row_keys(self.fp, tensors, self.scheme)
            found = store.lookup(sig, keys)
            values = None
            if found and min(found) >= 0:
                values = store.read(sig, found, pin=pin)
            return Ready(tensors, sig, keys, found, values, generation)
        except Exception:  # noqa: BLE001 - a read-ahead is only a guess: the step reads as usual
            return None

    def take(self, batched: Sequence[torch.Tensor], sig: Any, store: RowStore) -> Ready | None:
        """The prepared batch if it is the one the root got now (same tensors, or same keys), else None."""
        pending = self.pending.pop(self.step, None)
        if pending is None:
            return None
        ready = pending.result()
        if ready is None or ready.sig != sig or ready.generation != store.generation:
            return None
        if len(ready.tensors) != len(batched):
            return None
        if all(a is b for a, b in zip(ready.tensors, batched, strict=True)):
            self.used += 1
            return ready
        if self.scheme == "device" and row_keys(self.fp, batched) == ready.keys:  # copied to the device
            self.used += 1
            return ready
        return None

    def close(self) -> None:
        self.pending = {}
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def next_batch(trainer: Any) -> Any:
    """The batch Lightning has fetched for the next step, if it has (iterable datasets), else None.

    Reads ``trainer.fit_loop._data_fetcher.batches`` (Lightning 2.x's prefetching fetcher): there is no public
    way to see it; anything unexpected gives None and the cache reads at the step.
    """
    try:
        fetched = trainer.fit_loop._data_fetcher.batches
    except AttributeError:
        return None
    if not isinstance(fetched, list) or not fetched:
        return None
    item = fetched[0]
    # the fetcher holds (batch, batch_idx, dataloader_idx) from the combined loader
    return item[0] if isinstance(item, tuple) and len(item) == 3 and isinstance(item[1], int) else item
