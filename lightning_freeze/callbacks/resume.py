"""ExactResume: what a bit-exact resume needs beyond Lightning's own checkpoint.

Lightning restores weights, optimizer, schedulers and loop counters, and a resumable train loader's
position, but two things slip through:

1. **The train loader's position.** Lightning applies a checkpoint's loader state only inside
   ``FitLoop.setup_data``. When something reads ``trainer.estimated_stepping_batches`` before the
   checkpoint is restored (a ``configure_optimizers`` that sizes a ``OneCycleLR``), the loader is set up
   early, the saved state is never applied and the resumed epoch silently starts over. ``on_train_start``
   applies it and restarts the iterator, before the first batch.
2. **The random streams.** Dropout and random augmentation draw from torch's, numpy's and Python's global
   generators, which no checkpoint holds. Every rank's generator states are saved with the callback's
   state (gathered to rank 0, which writes the file) and put back in ``on_train_start``, the last moment
   before the first resumed batch. They are stored as plain tensors, ints and strings, so the checkpoint
   still loads with ``torch.load(..., weights_only=True)``.

:class:`~lightning_freeze.splitrun.SplitRunDataModule` and every freezing callback add this callback to the
Trainer by themselves, and the ``lightning-freeze`` app always does. With a bare :class:`~lightning_freeze.splitrun.ResumableDataLoader`,
add it yourself: ``Trainer(callbacks=[ExactResume()])``.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from typing_extensions import override

__all__ = ["ExactResume", "ensure_exact_resume"]


def _rng_state() -> dict[str, Any]:
    """This process's global generator states, as weights-only-loadable values."""
    bit_generator, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ExactResume(pl.Callback):
    """Apply the train loader state Lightning skipped, and save/restore every rank's random generators.

    It takes no arguments. Add it once per Trainer (:func:`ensure_exact_resume` does that). Under DDP, ``state_dict`` gathers
    the generator states of all ranks, so every rank must save checkpoints together, as Lightning's own
    ``ModelCheckpoint`` and ``Trainer.save_checkpoint`` do.

    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(callbacks=[ExactResume()], logger=False, enable_progress_bar=False)
    >>> [type(c).__name__ for c in trainer.callbacks if isinstance(c, ExactResume)]
    ['ExactResume']
    """

    def __init__(self) -> None:
        self._pending_rng: list[dict[str, Any]] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        world, _ = _world()
        mine = _rng_state()
        if world == 1:
            return {"rng": [mine]}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        return {"rng": gathered}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        # Lightning's private loop state (2.4-2.6), read defensively: another version only skips the repair
        pending = getattr(loop, "_combined_loader_states_to_load", None)
        fetcher = getattr(loop, "_data_fetcher", None)
        if (
            pending
            and loop.restarting
            and getattr(loop, "_combined_loader", None) is not None
            and fetcher is not None
        ):
            loop._load_combined_loader_states()
            iter(fetcher)
        states, self._pending_rng = self._pending_rng, None
        if not states:
            return
        world, rank = _world()
        if len(states) != world:
            warnings.warn(
                f"the checkpoint holds the random generator states of {len(states)} rank(s), this run has "
                f"{world}: dropout and augmentation will not replay the interrupted run exactly",
                stacklevel=2,
            )
            return
        _set_rng_state(states[rank])


def ensure_exact_resume(trainer: pl.Trainer) -> None:
    """Add an :class:`ExactResume` to ``trainer.callbacks`` unless one is there already."""
    if not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
        trainer.callbacks.append(ExactResume())
