"""Fixed per-rank shards under DDP: each rank sees the same samples every epoch, in a new order each epoch.

``torch.utils.data.DistributedSampler(shuffle=True)`` (which Lightning puts into a plain ``DataLoader`` under DDP)
permutes the whole data set every epoch and then deals it out to the ranks, so each rank sees a different
subset each epoch and a per-rank cache finds about ``1 / world_size`` of its samples. :func:`fix_shards` keeps
each rank's subset as the first epoch dealt it and shuffles only its order, with the sampler's seed and epoch
(so runs stay reproducible and ranks stay in step). It changes the sampler object in place (its class becomes a
subclass of its own class), so it works on the sampler Lightning injected and on a user's own
``DistributedSampler`` alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

# Keeps the per-epoch order permutations apart from the permutation that deals the shards (seed + 0).
_ORDER_STREAM = 0x5EED


def reshuffles_across_ranks(sampler: Any) -> bool:
    """Whether ``sampler`` deals each rank a different subset every epoch (``fixed_shards``: SplitRun's
    TrainShardSampler that keeps them fixed already)."""
    return (
        isinstance(sampler, DistributedSampler)
        and sampler.shuffle
        and not getattr(sampler, "_fixed_shards", False)
        and getattr(sampler, "fixed_shards", False) is not True
    )


def fix_shards(sampler: DistributedSampler) -> None:
    """Make ``sampler`` keep each rank's samples fixed across epochs while shuffling their order: its class
    becomes a subclass of its own class (same object layout, so the object can change class in place)."""
    if getattr(sampler, "_fixed_shards", False):
        return
    cls = type(sampler)

    def __iter__(self: DistributedSampler) -> Iterator[Any]:  # noqa: N807 - the method it overrides
        epoch, self.epoch = self.epoch, 0
        try:
            shard = list(cls.__iter__(self))  # the subset epoch 0 deals this rank, in that epoch's order
        finally:
            self.epoch = epoch
        if not self.shuffle:
            return iter(shard)
        g = torch.Generator().manual_seed(self.seed + _ORDER_STREAM + epoch)
        return iter([shard[i] for i in torch.randperm(len(shard), generator=g).tolist()])

    namespace = {"__iter__": __iter__, "_fixed_shards": True, "__module__": cls.__module__}
    sampler.__class__ = type(f"FixedShard{cls.__name__}", (cls,), namespace)


def train_samplers(loaders: Any) -> list[Any]:
    """The samplers of the training loader(s) as ``trainer.train_dataloader`` gives them."""
    found = []
    for loader in (
        loaders.values()
        if isinstance(loaders, dict)
        else loaders
        if isinstance(loaders, (list, tuple))
        else [loaders]
    ):
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
        if sampler is not None:
            found.append(sampler)
    return found
