"""DDP shard samplers and a train loader that resumes mid-epoch.

- :class:`TrainShardSampler`: disjoint shards of a part, reshuffled every epoch from ``(seed, epoch)``, every
  rank the same number of samples (hence batches). The remainder of ``len(part) % world_size`` samples is
  **dropped** by default (a different few every epoch, because the shuffle comes first); ``remainder="pad"``
  repeats the first few of the permutation instead, like ``DistributedSampler``.
- :class:`EvalShardSampler`: rank r gets ``part[r::world_size]``: every sample is evaluated exactly once
  across ranks, never padded. Shards differ by at most one sample. Reduce metrics with torchmetrics (or sums
  and counts); ``self.log(..., sync_dist=True)`` of a per-rank mean is not the global mean on uneven shards.
- :class:`ResumableDataLoader`: a ``DataLoader`` with ``state_dict``/``load_state_dict``, which Lightning
  saves in checkpoints. After a restore it skips the batches already consumed in the saved epoch (without
  loading them) and keeps that epoch's shuffle, so a resumed run sees exactly the batches of an
  uninterrupted one.

Both samplers subclass ``torch.utils.data.DistributedSampler``, so Lightning keeps them as they are under any
``use_distributed_sampler`` setting. Rank and world size are read from ``torch.distributed`` at iteration time
unless given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["EvalShardSampler", "ResumableDataLoader", "ShardSampler", "TrainShardSampler"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ShardSampler(DistributedSampler):
    """Base of the shard samplers: an index list (a split part) shared by all ranks, and this rank's view.

    ``__init__`` deliberately does not call ``DistributedSampler.__init__``: the subclassing only tells
    Lightning (and other tools) that the sampler already shards, so it is never replaced.

    Args:
        indices: the part's dataset indices (or an int n for ``range(n)``), shared by every rank.
        num_replicas: the world size (default: read from ``torch.distributed`` when iterating).
        rank: this rank (default: read from ``torch.distributed`` when iterating).
        seed: the seed of the shuffles.

    >>> sampler = EvalShardSampler([4, 8, 15], num_replicas=2, rank=1)
    >>> isinstance(sampler, DistributedSampler), sampler.num_replicas, sampler.rank
    (True, 2, 1)
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray | int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(indices, (int, np.integer)):
            indices = np.arange(int(indices), dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError("indices must be a 1-d sequence of dataset indices")
        self._num_replicas = num_replicas
        self._rank = rank
        self.seed = int(seed)
        self.epoch = 0
        self.dataset = self.indices  # DistributedSampler has `.dataset`; some tools read its length

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return self._num_replicas if self._num_replicas is not None else _world()[0]

    @num_replicas.setter
    def num_replicas(self, value: int) -> None:
        self._num_replicas = value

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self._rank if self._rank is not None else _world()[1]

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = value

    def _check(self) -> tuple[int, int]:
        world, rank = self.num_replicas, self.rank
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        return world, rank

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order next (Lightning calls this at every epoch start).

        Args:
            epoch: the epoch about to run.
        """
        self.epoch = int(epoch)


class TrainShardSampler(ShardSampler):
    """Equal-length, disjoint, per-epoch reshuffled shards of ``indices`` (see the module docstring).

    ``fixed_shards=True`` deals the samples to ranks once (from ``seed``) and then only shuffles each
    rank's own shard every epoch: a rank sees the same samples every epoch, which is what lets a
    per-rank cache of them (FrozenPrefixCache) hold about ``1/world_size`` of the data.

    ``start`` (set by :class:`ResumableDataLoader` after a restore) skips that many samples of this rank's
    shard in the next iteration only.

    Args:
        indices: the train part's dataset indices (or an int n for ``range(n)``), shared by every rank.
        num_replicas: the world size (default: read from ``torch.distributed`` when iterating).
        rank: this rank (default: read from ``torch.distributed`` when iterating).
        shuffle: reshuffle every epoch from ``(seed, epoch)``; False keeps the index order.
        seed: the seed of the shuffles.
        remainder: ``"drop"`` the ``len(indices) % world_size`` leftover samples of each epoch, or ``"pad"``
            by repeating the first few of the permutation.
        fixed_shards: deal the samples to ranks once and only shuffle within each rank's shard per epoch.

    >>> shards = [list(TrainShardSampler(range(10, 17), num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    >>> [len(s) for s in shards], set(shards[0]) & set(shards[1])  # 7 samples: 3 each, one dropped, disjoint
    ([3, 3], set())
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray | int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        remainder: str = "drop",
        fixed_shards: bool = False,
    ) -> None:
        super().__init__(indices, num_replicas=num_replicas, rank=rank, seed=seed)
        if remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
        self.shuffle = bool(shuffle)
        self.fixed_shards = bool(fixed_shards)
        self.remainder = remainder
        self.drop_last = remainder == "drop"
        self._start = 0  # one-shot skip for the next __iter__
        self._start_epoch: int | None = None

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        world = self.num_replicas
        n = self.indices.size
        return n // world if self.remainder == "drop" else math.ceil(n / world)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of ``indices`` in ``epoch`` (same on every rank), before sharding.

        Args:
            epoch: the epoch (default: the current one).
        """
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, epoch])
        return self.indices[rng.permutation(self.indices.size)]

    def shard(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for ``epoch``: ``order[rank : total_size : world]``.

        Args:
            epoch: the epoch (default: the current one).
        """
        world, rank = self._check()
        epoch = self.epoch if epoch is None else epoch
        # Fixed shards: deal once (the order of epoch 0), then shuffle within the shard per epoch.
        order = self.epoch_order(0 if self.fixed_shards else epoch)
        total = self.total_size
        if total > order.size:  # pad by wrapping around
            order = np.resize(order, total)
        shard = order[rank:total:world]
        if self.fixed_shards and self.shuffle and epoch > 0:
            shard = shard[np.random.default_rng([self.seed, epoch, rank]).permutation(shard.size)]
        return shard

    def skip_next(self, samples: int, epoch: int) -> None:
        """Skip ``samples`` of this rank's shard the next time ``epoch`` is iterated.

        Args:
            samples: how many samples of the shard were already consumed.
            epoch: the epoch they were consumed in.
        """
        self._start, self._start_epoch = int(samples), int(epoch)

    def __iter__(self) -> Iterator[int]:
        shard = self.shard()
        start, self._start = (self._start if self._start_epoch == self.epoch else 0), 0
        self._start_epoch = None
        return iter(shard[start:].tolist())


class EvalShardSampler(ShardSampler):
    """Every index of ``indices`` exactly once across ranks, in order: rank r gets ``indices[r::world]``.

    Args:
        indices: the val/test part's dataset indices, shared by every rank.
        num_replicas: the world size (default: read from ``torch.distributed`` when iterating).
        rank: this rank (default: read from ``torch.distributed`` when iterating).
        seed: unused (evaluation never shuffles); kept for the shared signature.

    >>> [list(EvalShardSampler([3, 5, 7, 9, 11], num_replicas=2, rank=r)) for r in (0, 1)]
    [[3, 7, 11], [5, 9]]
    """

    shuffle = False
    drop_last = False

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        world, rank = self._check()
        return len(range(rank, self.indices.size, world))

    @property
    def total_size(self) -> int:
        return self.indices.size

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        world, rank = self._check()
        return iter(self.indices[rank::world].tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position survives a checkpoint; built for a :class:`TrainShardSampler`.

    Lightning calls ``state_dict()`` when it saves a checkpoint and ``load_state_dict()`` before iterating on
    resume. The state is ``(epoch, batches consumed in that epoch)``, identical on every rank; on restore the
    sampler skips the consumed samples of that epoch (no data loading), and the epoch's permutation is
    rebuilt from ``(seed, epoch)``.

    Pass ``sampler=TrainShardSampler(...)`` for control over the shard, or let the loader build one over the
    whole dataset from ``shuffle``/``seed``/``remainder``. Other keyword arguments go to ``DataLoader``
    (``batch_sampler`` is not supported: batches are cut from the sampler by ``batch_size``). Another
    sampler (e.g. the ``SequentialSampler`` Lightning puts in for ``overfit_batches``) is accepted: the
    consumed batches are then loaded and dropped after a restore, which replays exactly only if that
    sampler's order is deterministic.

    Unless you pass a ``generator``, the workers' base seed comes from a generator keyed by ``(seed,
    epoch)``: iterating never moves torch's global generator, and workers draw the same augmentations
    after a resume. Add :class:`~lightning_freeze.ExactResume` to the Trainer: it applies the loader
    state when Lightning skipped it (a ``configure_optimizers`` that reads
    ``trainer.estimated_stepping_batches``) and restores the random generators
    (:class:`~lightning_freeze.splitrun.SplitRunDataModule` adds it by itself).

    Args:
        dataset: the map-style dataset.
        batch_size: samples per batch.
        shuffle: without a ``sampler``: shuffle every epoch from ``(seed, epoch)``.
        sampler: the sampler (a :class:`TrainShardSampler` for exact resume), or None to build one.
        seed: the seed of the built sampler's shuffles and of the workers' base seed.
        remainder: the built sampler's ``remainder`` (``"drop"`` or ``"pad"``).
        **kwargs: further ``DataLoader`` options (``num_workers``, ``collate_fn`` ...), by keyword.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> loader = ResumableDataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True, seed=0)
    >>> batches = iter(loader)
    >>> first = next(batches)
    >>> state = loader.state_dict()  # what a checkpoint taken now holds
    >>> state["epoch"], state["batches_consumed"]
    (0, 1)
    >>> rest = [b[0].tolist() for b in batches]
    >>> resumed = ResumableDataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True, seed=0)
    >>> resumed.load_state_dict(state)
    >>> [b[0].tolist() for b in resumed] == rest  # the rest of the epoch, exactly
    True
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool | None = None,
        sampler: Sampler | None = None,
        *args: Any,
        seed: int = 0,
        remainder: str = "drop",
        **kwargs: Any,
    ) -> None:
        if args:
            raise TypeError("ResumableDataLoader takes DataLoader options after `sampler` as keywords only")
        if kwargs.pop("batch_sampler", None) is not None:
            raise ValueError(
                "ResumableDataLoader cuts batches from its sampler: pass batch_size, not batch_sampler"
            )
        if sampler is None:
            sampler = TrainShardSampler(len(dataset), shuffle=bool(shuffle), seed=seed, remainder=remainder)  # type: ignore[arg-type]
        self.seed = seed
        self.remainder = remainder
        self._own_generator = kwargs.get("generator") is None
        super().__init__(dataset, batch_size=batch_size, shuffle=None, sampler=sampler, **kwargs)
        self._batches_yielded = 0
        self._iter_epoch = 0
        self._skip_batches = 0  # pending skip for a sampler that is not a TrainShardSampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        skip = 0
        if isinstance(sampler, TrainShardSampler):
            start = sampler._start if sampler._start_epoch == sampler.epoch else 0
            self._batches_yielded = start // self.batch_size if self.batch_size else 0
        else:  # no sample-level skip: drop whole batches, unless the saved epoch was already complete
            skip = self._skip_batches if self._skip_batches < len(self) else 0
            self._batches_yielded = skip
        self._skip_batches = 0
        self._iter_epoch = int(getattr(sampler, "epoch", 0))
        if self._own_generator:  # the workers' base seed: a function of (seed, epoch), not of global state
            self.generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([int(self.seed), self._iter_epoch]).generate_state(1)[0])
            )
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator, None)
        for batch in iterator:
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``(epoch, batches consumed)`` and what they depend on; Lightning stores it in checkpoints."""
        sampler = self.sampler
        return {
            "epoch": self._iter_epoch,
            "batches_consumed": self._batches_yielded,
            "batch_size": self.batch_size,
            "seed": getattr(sampler, "seed", None),
            "num_replicas": getattr(sampler, "num_replicas", 1),
            "num_samples": len(sampler),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches ``state`` says were consumed, in that epoch's order.

        Args:
            state: what :meth:`state_dict` returned when the checkpoint was taken.
        """
        sampler = self.sampler
        consumed = int(state.get("batches_consumed", 0))
        epoch = int(state.get("epoch", 0))
        now = {
            "num_replicas": getattr(sampler, "num_replicas", 1),
            "batch_size": self.batch_size,
            "seed": getattr(sampler, "seed", None),
        }
        if consumed and any(state.get(k) != v for k, v in now.items()):
            warnings.warn(
                "resuming mid-epoch with a different world size, batch size or seed than the checkpoint "
                f"({ {k: state.get(k) for k in now} } -> {now}): the rest of this epoch cannot replay the "
                "original batches; it restarts at the same batch offset instead",
                stacklevel=2,
            )
        self._iter_epoch = epoch
        self._batches_yielded = consumed
        if isinstance(sampler, TrainShardSampler):
            sampler.set_epoch(epoch)
            sampler.skip_next(consumed * (self.batch_size or 1), epoch)
        else:
            self._skip_batches = consumed
