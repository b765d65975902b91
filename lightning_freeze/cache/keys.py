"""Cache keys of a call: one per sample, from every tensor argument, positional or keyword.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lightning_freeze.cache.fingerprint import Fingerprinter

_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)


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
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            flat: list[tuple[Any, Any]] = list(enumerate(args))  # the common call f(x): no tree to walk
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
