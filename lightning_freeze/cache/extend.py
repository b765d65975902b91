"""Carry the stored rows over to a grown cut (FreezeOut froze the next block) instead of refilling.

When the new cut's slots can be computed from the old cut's slots alone (the newly skipped blocks take
nothing but stored rows and constants, as the stages of a ResNet or the children of an ``nn.Sequential``
do), every stored row is pushed through the new blocks once, in batches. Otherwise (a block that also
takes an attention mask computed from the inputs) the rows are dropped and the cache fills again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lightning_freeze.cache.cut import CallPlan, Cut, extension
from lightning_freeze.cache.store import RowStore
from lightning_freeze.cache.trace import plain_path


def carry_over(
    old: Cut, store: RowStore, new: Cut, sig: Any, batch_rows: int, min_rows: int, device: torch.device
) -> tuple[RowStore | None, str]:
    """The rows of ``store`` (``old``'s) as rows of ``new``, and what was done ("kept", "extended" or why
    they were dropped); None when they were dropped."""
    if sig not in store.tables:
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
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and x[0] in ("value", "const"),
        )
        out = step.module(*args, **kwargs)
        for path, leaf in pytree.tree_flatten_with_path(out)[0]:
            env[step.value_key(plain_path(path))] = leaf
    return [env[key] for key in new.slots]
