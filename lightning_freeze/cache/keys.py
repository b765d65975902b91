"""Cache keys of a call: one per sample, from every tensor argument, positional or keyword, or from the sample
ids the loader gives (:class:`SampleIds`).

The batch size is the first dimension of the first tensor argument. Every tensor argument with that
first dimension is per-sample: each sample's key fingerprints its row of every such tensor (see
:mod:`lightning_freeze.cache.fingerprint`). Everything else goes into the call's *table key*, which keys
the rows too: other tensors by a fingerprint of their whole content, the per-sample shapes and dtypes,
plain constants (``None``, numbers, strings) by value, other objects by type, and the device and
autocast state.

>>> fp = Fingerprinter(seed=0)
>>> ids, mask = torch.tensor([[1, 2], [1, 2], [3, 4]]), torch.tensor([[1, 1], [1, 0], [1, 1]])
>>> call = CallKeys.of(fp, (), {"input_ids": ids, "attention_mask": mask})
>>> call.batch, len(call.keys[0]), call.keys[0] == call.keys[1]   # rows 0 and 1 differ in their mask only
(3, 16, False)
>>> call.table_key == CallKeys.of(fp, (ids,), {"attention_mask": mask}).table_key   # positional is not keyword
False
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from lightning_freeze.cache.fingerprint import Fingerprinter

_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
_LEAVES = (torch.Tensor, *_PLAIN)  # what torch's pytree never descends into
_INTEGER_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8})


def _constant(x: Any) -> Any:
    return x if isinstance(x, _PLAIN) else f"<{type(x).__module__}.{type(x).__qualname__}>"


def _autocast_state(device: torch.device) -> tuple[Any, ...]:
    kind = device.type
    if kind not in ("cuda", "cpu", "xpu", "mps"):
        return (kind,)
    try:
        on = torch.is_autocast_enabled(kind)
        return (kind, on, str(torch.get_autocast_dtype(kind)) if on else None)
    except (RuntimeError, TypeError):  # pragma: no cover - a backend without autocast queries
        return (kind,)


@dataclass
class CallKeys:
    """The table key and per-sample keys of one call ``f(*args, **kwargs)``."""

    table_key: tuple[Any, ...]
    keys: list[bytes]
    batch: int
    batched: list[torch.Tensor]  # the per-sample tensor arguments, in argument order

    @staticmethod
    def split(args: tuple, kwargs: dict) -> tuple[int, list[tuple[Any, Any]]]:
        """The batch size and the (position, leaf) pairs of all arguments (0 when no tensor has a batch dim)."""
        if all(isinstance(a, _LEAVES) for a in args) and all(isinstance(v, _LEAVES) for v in kwargs.values()):
            flat: list[tuple[Any, Any]] = [
                *enumerate(args),
                *kwargs.items(),
            ]  # no containers: no tree to walk
        else:
            flat = [(pytree.keystr(p), x) for p, x in pytree.tree_flatten_with_path((args, kwargs))[0]]
        batch = next((int(x.shape[0]) for _, x in flat if isinstance(x, torch.Tensor) and x.dim() > 0), 0)
        return batch, flat

    @staticmethod
    def table_key_of(
        args: tuple, kwargs: dict, fp: Fingerprinter
    ) -> tuple[tuple[Any, ...], int, list[torch.Tensor]]:
        """The table key alone (cheap: per-sample tensors contribute only their shape and dtype)."""
        batch, flat = CallKeys.split(args, kwargs)
        parts: list[Any] = []
        batched: list[torch.Tensor] = []
        device = None
        for where, x in flat:
            if isinstance(x, torch.Tensor):
                device = device or x.device
                if batch and x.dim() > 0 and x.shape[0] == batch:
                    batched.append(x)
                    parts.append((where, x.dtype, x.shape[1:]))
                else:
                    parts.append((where, "whole", fp.tensor(x)))
            else:
                parts.append((where, _constant(x)))
        state = _autocast_state(device) if device is not None else ()
        return (tuple(parts), device, state), batch, batched

    @staticmethod
    def of(fp: Fingerprinter, args: tuple, kwargs: dict) -> CallKeys:
        table_key, batch, batched = CallKeys.table_key_of(args, kwargs, fp)
        return CallKeys(table_key, row_keys(fp, batched), batch, batched)


def row_keys(fp: Fingerprinter, batched: Sequence[torch.Tensor], scheme: str | None = None) -> list[bytes]:
    """One 16-byte key per sample over its rows of all ``batched`` tensors (``scheme``: see
    :meth:`Fingerprinter.rows`)."""
    if not batched:
        return []
    if len(batched) == 1:
        return fp.rows(batched[0], scheme)
    per_tensor = [fp.rows(t, scheme) for t in batched]
    return [
        hashlib.blake2b(b"".join(parts), digest_size=16).digest() for parts in zip(*per_tensor, strict=True)
    ]


def select_rows(args: tuple, kwargs: dict, batch: int, rows: torch.Tensor) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with every per-sample tensor cut down to ``rows``."""

    def pick(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return x.index_select(0, rows.to(x.device))
        return x

    return pytree.tree_map(pick, (args, kwargs))


# ---------------------------------------------------------------------------------------------- sample ids
SampleIdSource = str | int | Callable[[Any], Any] | None
"""Where a training batch carries one id per sample: ``"auto"``, a tuple position, a dict key, a callable."""


def check_sample_ids(value: Any, where: str) -> SampleIdSource:
    """``sample_ids``: ``"auto"``, None, a position in a tuple/list batch, a key of a dict batch, or a callable."""
    if value is None or callable(value) or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(
        f"{where}: sample_ids must be 'auto', None (hash the inputs), a position in a tuple batch (e.g. -1 for "
        f"SplitRun's (x, y, index)), a key of a dict batch, or a callable batch -> ids; got {value!r}"
    )


def ids_of_batch(batch: Any, source: SampleIdSource, where: str) -> list[int]:
    """The ids ``source`` names in ``batch``: one integer per sample (a clear error naming ``sample_ids`` else)."""
    try:
        if callable(source):
            ids = source(batch)
        elif isinstance(source, str):
            ids = batch[source] if isinstance(batch, Mapping) else None
        else:
            ids = batch[source] if isinstance(batch, (tuple, list)) else None
    except (IndexError, KeyError) as err:
        raise ValueError(
            f"{where}: sample_ids={source!r} finds nothing in the training batch ({err!r})"
        ) from None
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids) if ids.dtype.kind in "iu" else ids
    if isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.dtype in _INTEGER_DTYPES:
        return ids.tolist()
    if isinstance(ids, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return list(ids)
    got = (
        f"a {type(ids).__name__}"
        if not isinstance(ids, torch.Tensor)
        else f"a {ids.dtype} tensor of {tuple(ids.shape)}"
    )
    raise ValueError(
        f"{where}: sample_ids={source!r} must give one integer id per sample of the training batch (a 1-D integer "
        f"tensor or a list of ints), got {got}"
    )


class SampleIds:
    """Keys by the sample ids the loader gives (dataset indices) instead of hashing every input row.

    Per table key, each id maps to the fingerprint its input had when first seen, which stays the row's key in
    the store. A call is hashed in full until every one of its ids has been seen twice: the fingerprints of a
    revisit are compared with the stored ones, so an input that changed for its id (random augmentation, ids
    that do not follow the rows) is found before any row is served by id. Once all its ids are checked, a call
    takes the stored fingerprints as its keys and hashes only one of its rows (a different position each call) to
    compare it with its id's. After a difference, ``mismatch`` says which id and the caller goes back to hashing.

    >>> fp, ids = Fingerprinter(seed=0), SampleIds()
    >>> x = torch.arange(8.0).reshape(4, 2)
    >>> first, hashed = ids.keys(fp, "t", [7, 8, 9, 10], [x])    # the ids are new: every row is hashed
    >>> ids.keys(fp, "t", [7, 8, 9, 10], [x]) == (first, 4)        # the first revisit: hashed again, compared
    True
    >>> ids.keys(fp, "t", [9, 7, 8, 10], [x[[2, 0, 1, 3]]]) == ([first[2], first[0], first[1], first[3]], 1)
    True
    >>> _ = ids.keys(fp, "t", [7, 8, 9, 10], [x + 1]); ids.mismatch   # a changed input is found
    'the input of sample id 7 changed since it was first seen'
    """

    def __init__(self) -> None:
        self.known: dict[Hashable, dict[int, bytes]] = {}
        self.checked: dict[Hashable, set[int]] = {}
        self.calls = 0
        self.mismatch: str | None = None

    def keys(
        self, fp: Fingerprinter, table_key: Hashable, ids: list[int], batched: Sequence[torch.Tensor]
    ) -> tuple[list[bytes], int]:
        """The keys of a call's rows and how many rows were hashed: the fingerprints stored for ``ids`` where they
        are all checked (one row compared), else the rows' own fingerprints (remembered and compared)."""
        known = self.known.setdefault(table_key, {})
        checked = self.checked.setdefault(table_key, set())
        stored = [known.get(i) for i in ids]
        if None not in stored and checked.issuperset(ids):
            self.calls += 1
            at = self.calls % len(ids)
            if row_keys(fp, [t[at : at + 1] for t in batched])[0] == stored[at]:
                return stored, 1  # type: ignore[return-value]
        fresh = row_keys(fp, batched)
        for i, key, old in zip(ids, fresh, stored, strict=True):
            if old is None:
                known[i] = key
            elif old == key:
                checked.add(i)
            elif self.mismatch is None:
                self.mismatch = f"the input of sample id {i} changed since it was first seen"
        return fresh, len(fresh)
