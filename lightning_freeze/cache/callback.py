"""FrozenPrefixCache: serve the frozen prefix's output from a cache instead of recomputing it.

A frozen prefix in eval mode is a pure function of its input: the same sample gives the same output
every epoch. This callback memoises that function per sample. Add it next to a freezing callback and
change nothing else::

    trainer = Trainer(callbacks=[LayerFreeze("backbone.*"), FrozenPrefixCache()])

The pieces (details and limits: docs/cache.md):

- :mod:`~lightning_freeze.cache.cut`: where to cut, from the freezing engine's frozen prefix; the
  dataflow of the module that holds the prefix is recorded once (:mod:`~lightning_freeze.cache.trace`),
  so the cut can end anywhere, not only at module boundaries;
- :mod:`~lightning_freeze.cache.serving`: keys, lookups, serving and computing per call, through the entry
  points of :mod:`~lightning_freeze.cache.patch`;
- :mod:`~lightning_freeze.cache.store` and :mod:`~lightning_freeze.cache.disk`: rows in RAM, then on disk;
- :mod:`~lightning_freeze.cache.guard`: when stored rows stop being valid.

This class decides *when*: it re-plans the cut when the frozen prefix changes, looks up only in training
steps (validation and test batches are never stored), keeps the statistics, and switches itself off
when the inputs change every epoch (random augmentation). Nothing is saved in checkpoints; after a
resume the cache fills again.
"""

from __future__ import annotations

import difflib
import functools
import os
import time
import warnings
from collections import deque
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_freeze.cache import budget
from lightning_freeze.cache.cut import Cut, fallback_cut, named_cut, plan_cut, usable_prefix
from lightning_freeze.cache.disk import DiskTier, free_bytes
from lightning_freeze.cache.fingerprint import Fingerprinter
from lightning_freeze.cache.keys import SampleIds, SampleIdSource, check_sample_ids, ids_of_batch
from lightning_freeze.cache.serving import MIN_ROWS, VERIFY_PER_FIT, Server, Settings
from lightning_freeze.cache.shards import fix_shards, reshuffles_across_ranks, train_samplers
from lightning_freeze.cache.stats import EpochStats
from lightning_freeze.cache.store import RowStore
from lightning_freeze.engine.layers import named_modules
from lightning_freeze.engine.sharding import check_supported_strategy, lasting_params, strategy_kind
from lightning_freeze.validation import check_bool, check_choice, check_number

__all__ = ["FrozenPrefixCache"]
_WHERE = "FrozenPrefixCache"
# FSDP2 skips a unit whose call the cache answers (its hooks are the call's); FSDP1 does not (see docs/sharded.md)
_FSDP1 = (
    "FSDP1 gathers a unit in its wrapper's forward, around the frozen block the cache would skip, so the frozen "
    "prefix would still be all-gathered every step, and with use_orig_params=True a frozen block that shares a "
    "unit with trained parameters returns outputs that require grad, which cannot be served"
)
OnMismatch = Literal["warn", "off"]


class FrozenPrefixCache(Callback):
    """Serve the frozen prefix's output from a per-sample cache; losses and weights stay as without it.

    Args:
        module: ``"auto"`` (the frozen prefix that the freezing callback reports, cut wherever it ends) or
            the qualified name of one module to cache (served while it is frozen and in eval mode).
        max_bytes: RAM for the cache: bytes, a string such as ``"2GB"``, or a fraction of the RAM available at
            fit start, divided by the processes on this machine. Default: ``0.25`` of it.
        max_disk_bytes: disk for rows past ``max_bytes`` (memory-mapped files in ``disk_dir``): bytes, a
            string, or a fraction of the free space, divided by the processes on this machine; ``0`` turns the
            disk tier off. Default: ``0.25`` of it; the file system always keeps at least max(1 GiB, 5%) free.
            Past both, only the samples already cached are served.
        disk_dir: where the disk tier's files go (deleted at the end of fit). Default: a
            ``frozen_prefix_cache`` folder in the trainer's default_root_dir.
        min_hit_rate: after an epoch that starts with cached rows, if fewer than this fraction of
            them were reused (random augmentation), caching switches off and frees its memory.
        on_mismatch: what to do when stored rows, compared bit for bit with the same samples computed in
            another batch (once per cut), differ only by rounding: ``"warn"`` (keep serving; training is as
            correct as with nondeterministic kernels) or ``"off"`` (switch the cache off). Rows that differ by
            more always switch it off.
        sample_ids: where a training batch carries each sample's id (its dataset index), so that rows are keyed by
            it instead of by hashing the inputs (the costliest part of a served step): ``"auto"`` (SplitRun's
            ``return_indices``: the last element of the batch; else hashing), ``None`` (always hash), a position in
            a tuple/list batch (``-1``), a key of a dict batch (``"index"``), or a callable ``batch -> ids``. The
            inputs are still hashed until every id has come back once with the same input (so random
            augmentation is caught before a row is served by id), then one row per batch, a different one each step;
            an input that changes for its id turns ids off for the rest of the fit (see docs/cache.md).
        fixed_shards: under DDP, keep each rank's training samples fixed across epochs and shuffle only their
            order (the DistributedSampler Lightning adds, or your own). Without it a shuffling
            DistributedSampler deals each rank a different subset every epoch, so a per-rank cache finds
            about ``1 / world_size`` of its samples (one warning says so). This changes which samples each
            rank trains on, so results differ from a run without it.
        log_stats: log ``cache/hit_rate`` (epochs with lookups only), ``cache/bytes``, ``cache/entries`` and
            ``cache/time_saved_s`` every epoch.

    Besides its options, it exposes :attr:`history` (one record per epoch), :attr:`events` (recordings of a
    cut, rows carried over or dropped, switching off) and :attr:`cut` (what it serves now).

    From the second epoch on every training batch is served from the cache:

    >>> from lightning_freeze import LayerFreeze
    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> cache = FrozenPrefixCache(max_bytes="64MB", max_disk_bytes=0)
    >>> callbacks = [LayerFreeze("backbone"), cache]
    >>> example_trainer(max_epochs=2, callbacks=callbacks).fit(DigitsClassifier(pretrained=False), example_loader())
    >>> [(h["hits"], h["lookups"], h["cached"]) for h in cache.history]
    [(0, 32, "module 'backbone'"), (32, 32, "module 'backbone'")]
    """

    def __init__(
        self,
        module: str = "auto",
        max_bytes: int | float | str | None = None,
        max_disk_bytes: int | float | str | None = None,
        disk_dir: str | os.PathLike[str] | None = None,
        min_hit_rate: float = 0.25,
        on_mismatch: OnMismatch = "warn",
        sample_ids: SampleIdSource = "auto",
        fixed_shards: bool = False,
        log_stats: bool = True,
    ) -> None:
        super().__init__()
        self.module = _check_module(module)
        self.max_bytes = budget.check_size(max_bytes, "max_bytes")
        self.max_disk_bytes = budget.check_size(max_disk_bytes, "max_disk_bytes")
        self.disk_dir = _check_dir(disk_dir)
        self.min_hit_rate = check_number(min_hit_rate, "min_hit_rate", low=0, high=1, where=_WHERE)
        self.on_mismatch = check_choice(on_mismatch, "on_mismatch", ("warn", "off"), where=_WHERE)
        self.sample_ids = check_sample_ids(sample_ids, _WHERE)
        self.fixed_shards = check_bool(fixed_shards, "fixed_shards", where=_WHERE)
        self.log_stats = check_bool(log_stats, "log_stats", where=_WHERE)
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._server: Server | None = None
        self._disk: DiskTier | None = None
        self._reset()

    def _reset(self) -> None:
        self._shutdown()
        self._trainer: pl.Trainer | None = None
        self._fingerprinter = Fingerprinter()
        self._off: str | None = None
        self._ram_budget = self._disk_budget = 0
        self._warned: set[str] = set()
        self._cut_key: Any = None
        self._seen_transitions: int | None = None
        self._freezer: Any = None  # the freezing engine, found once at train start
        self._stale = False
        self._generation = 0
        self._per_row: deque[float] = deque(maxlen=64)
        self._epoch = EpochStats(per_row=self._per_row)
        self._use_fallback = False
        self._named: dict[str, Any] = {}
        self._settings = Settings(MIN_ROWS, VERIFY_PER_FIT, self.on_mismatch == "off")
        self._id_source: SampleIdSource = None  # where this fit's batches carry sample ids (None: hash)

    @property
    def cut(self) -> Cut | None:
        """Where the cache cuts the network now (None: nothing is cached); ``str(cut)`` also says why it ends
        before the frozen prefix does."""
        return self._server.cut if self._server is not None else None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_strategy(trainer.strategy, _WHERE, fsdp1_refused=_FSDP1)
        self._reset()
        if strategy_kind(trainer.strategy) == "fsdp2":
            self._settings.lasting = functools.partial(lasting_params, pl_module)
        self.history, self.events = [], []
        self._trainer = trainer
        processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))
        self._ram_budget = budget.share(
            self.max_bytes, budget.available_ram(), processes, budget.DEFAULT_RAM_FRACTION
        )
        folder = os.fspath(self.disk_dir or os.path.join(trainer.default_root_dir, "frozen_prefix_cache"))
        self._disk_budget = budget.share(
            self.max_disk_bytes, free_bytes(folder), processes, budget.DEFAULT_DISK_FRACTION
        )
        self._disk = DiskTier(folder, self._disk_budget) if self._disk_budget > 0 else None
        # under FSDP2 modules may come into being in configure_model: found at train start
        if strategy_kind(trainer.strategy) != "fsdp2":
            self._find_modules(pl_module)

    def _find_modules(self, pl_module: pl.LightningModule) -> None:
        self._named = named_modules(pl_module)  # names as users write them (no torch.compile _orig_mod)
        if self.module != "auto" and self.module not in self._named:
            close = difflib.get_close_matches(self.module, [n for n in self._named if n], n=5, cutoff=0.3)
            raise ValueError(
                f"{_WHERE}: module={self.module!r} names no module of the model; closest: {close}"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._named:
            self._find_modules(pl_module)
        self._freezer = self._engine()
        if self.module == "auto" and self._freezer is None:
            self._warn_once(
                "no-engine",
                f"{_WHERE}(module='auto') found no freezing callback (LayerFreeze, FreezeOut, ProgressiveUnfreezing) "
                "on the Trainer, so there is no frozen prefix to cache. Add one, or name the frozen module: "
                "FrozenPrefixCache(module='backbone').",
            )
        self._id_source = self._where_ids_are(trainer)
        batches = trainer.num_training_batches
        self._settings.batches_per_epoch = int(batches) if batches != float("inf") else 0
        if trainer.world_size > 1:
            self._check_shards(trainer)

    def _where_ids_are(self, trainer: pl.Trainer) -> SampleIdSource:
        if self.sample_ids != "auto":
            return self.sample_ids
        from lightning_freeze.splitrun.datamodule import SplitRunDataModule

        datamodule = trainer.datamodule
        returns = isinstance(datamodule, SplitRunDataModule) and datamodule.return_indices
        return -1 if returns else None  # SplitRun appends the index: (x, y, index)

    def _check_shards(self, trainer: pl.Trainer) -> None:
        samplers = [s for s in train_samplers(trainer.train_dataloader) if reshuffles_across_ranks(s)]
        if self.fixed_shards:
            for sampler in samplers:
                fix_shards(sampler)
        elif samplers:
            self._warn_once(
                "reshuffling",
                f"{_WHERE}: the training DistributedSampler deals each of the {trainer.world_size} ranks a different "
                f"subset every epoch, so each rank's cache finds about 1/{trainer.world_size} of its samples. Pass "
                "FrozenPrefixCache(fixed_shards=True) to keep each rank's samples fixed and shuffle only their order "
                "(with SplitRun: fixed_shards=True).",
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entries = self._server.store.entries if self._server is not None else 0
        self._epoch = EpochStats(entries_at_start=entries, generation=self._generation, per_row=self._per_row)
        if self._server is not None:
            self._server.stats = self._epoch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._off is not None:
            return
        if self._changed():
            self._refresh(pl_module)
        if self._server is not None:
            start = time.perf_counter()
            ids = ids_of_batch(batch, self._id_source, _WHERE) if self._id_source is not None else None
            self._server.begin_step(ids)
            self._epoch.overhead_seconds += time.perf_counter() - start

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        server = self._server
        if server is None:
            return
        start = time.perf_counter()
        called = server.end_step()
        self._epoch.overhead_seconds += time.perf_counter() - start
        if not called and server.cut.kind == "graph" and not server.cut.recorded and not self._use_fallback:
            # the root never ran in a training step: try a module the step does call
            self._use_fallback, self._cut_key = True, None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = self._epoch
        cut = self.cut
        store = self._server.store if self._server is not None else None
        stats = {
            "epoch": trainer.current_epoch,
            **e.summary(self._per_row),
            **(store.sizes() if store is not None else RowStore.empty_sizes()),
            "budget": self._ram_budget,
            "disk_budget": self._disk_budget,
            "cached": cut.describe() if cut is not None and cut.recorded else None,
            "off": self._off,
            "generation": self._generation,
        }
        self.history.append(stats)
        if self.log_stats and self._off is None:
            logged = {"cache/bytes": float(stats["bytes"]), "cache/entries": float(stats["entries"])}
            logged["cache/time_saved_s"] = float(stats["time_saved_s"])
            if stats["hit_rate"] is not None:  # no lookups, no rate
                logged["cache/hit_rate"] = float(stats["hit_rate"])
            pl_module.log_dict(logged, on_step=False, on_epoch=True, rank_zero_only=True)
        if cut is not None and e.lookups == 0 and e.bypassed == 0 and self._off is None:
            self._warn_once(
                "never-called",
                f"{_WHERE}: {cut.root_name or 'the model'!r} was not called in any training step of epoch "
                f"{trainer.current_epoch}, so nothing was cached: training_step reaches the frozen layers some other "
                "way than through it. Name a module the step calls: FrozenPrefixCache(module=...). See docs/cache.md.",
            )
        if self._off is None and e.generation == self._generation and e.inputs_changed(self.min_hit_rate):
            rate = e.found / max(1, min(e.lookups, e.entries_at_start))
            self._switch_off(
                f"only {rate:.0%} of the samples cached in the previous epoch came back in epoch "
                f"{trainer.current_epoch} (min_hit_rate={self.min_hit_rate}); the inputs change between epochs "
                "(random augmentation, or a sampler that deals other samples each epoch), so the frozen prefix is "
                "computed as usual from now on"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._shutdown()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._shutdown()

    # ------------------------------------------------------------------ what the serving code reports
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _event(self, action: str, **info: Any) -> None:
        self.events.append({"action": action, **info})

    def _switch_off(self, reason: str) -> None:
        if self._off is not None:
            return
        self._off = reason
        self._shutdown()
        self._event("off", why=reason)
        warnings.warn(f"{_WHERE} switched off: {reason}. Its memory is released.", stacklevel=3)

    def _invalidate(self, reason: str) -> None:
        """The stored rows no longer hold (a thaw, a weight change): drop them and plan again next batch."""
        self._drop(reason)
        self._event("invalidate", why=reason)
        self._stale = True

    def _stop_ids(self, reason: str) -> None:
        """An input changed for its sample id: key by hashing the inputs for the rest of the fit."""
        self._id_source = None
        self._event("ids_off", why=reason)
        self._warn_once(
            "ids-off",
            f"{_WHERE}: {reason} (random augmentation, or ids that do not follow the samples?); the rows are keyed "
            "by hashing the inputs from now on",
        )

    def _no_cut(self, reason: str) -> None:
        """The recorded forward showed that nothing can be served."""
        self._warn_once(f"no-cut:{reason}", f"{_WHERE}: nothing of the frozen prefix is cached: {reason}.")
        if self._server is not None:
            self._server.uninstall()
        self._server = None

    # ------------------------------------------------------------------ planning
    def _engine(self) -> Any:
        from lightning_freeze.callbacks.base import FreezingCallback

        trainer = self._trainer
        owner = (
            next((cb for cb in trainer.callbacks if isinstance(cb, FreezingCallback)), None)
            if trainer
            else None
        )
        return owner.engine if owner is not None else None

    def _changed(self) -> bool:
        """Whether the frozen prefix may have changed since the last plan: the engine counts its freezes and
        thaws, so a step where nothing changed costs one comparison (without an engine, a named module's
        parameters are checked)."""
        if self._stale or self._cut_key is None:
            return True
        transitions = getattr(self._freezer, "transitions", None)
        return transitions is None or transitions != self._seen_transitions

    def _refresh(self, pl_module: pl.LightningModule) -> None:
        """Plan the cut again when the frozen prefix changed (names, or a tie that trains or stopped training)."""
        layers: list[Any] = []
        reason = None
        engine = self._freezer if self._freezer is not None else self._engine()
        self._seen_transitions = getattr(engine, "transitions", None)
        if self.module == "auto":
            prefix = engine.frozen_prefix() if engine is not None else []
            trains = tuple(p.requires_grad for layer in prefix for p in layer.params)
            key: Any = (tuple(layer.name for layer in prefix), trains, self._use_fallback)
        else:
            module = self._named[self.module]
            key = not any(p.requires_grad for p in module.parameters())
        if key == self._cut_key and not self._stale:
            return
        self._cut_key, self._stale = key, False
        if self.module == "auto":
            layers, reason = usable_prefix(prefix, pl_module)
        old = self._server
        if old is not None:
            old.uninstall()
        cut = self._plan(pl_module, layers, reason)
        inherited = None
        if cut is not None and old is not None and old.cut.recorded and old.store.entries:
            inherited = (old.cut, old.store)
        else:
            self._drop("the frozen prefix changed" if cut is None else f"now caching {cut.describe()}")
        self._server = None
        if cut is None:
            return
        self._generation += 1
        store = RowStore(self._ram_budget, self._disk, pin=pl_module.device.type == "cuda")
        ids = None
        if self._id_source is not None:
            ids = (
                old.ids if inherited is not None and old is not None and old.ids is not None else SampleIds()
            )
        self._server = Server(
            cut, store, self._fingerprinter, self._settings, self._epoch, _Reports(self), inherited, ids
        )
        self._server.install()

    def _plan(self, pl_module: pl.LightningModule, layers: list[Any], reason: str | None) -> Cut | None:
        if self.module != "auto":
            if not self._cut_key:
                self._warn_once(
                    "not-frozen",
                    f"{_WHERE}: module {self.module!r} has trainable parameters; it is computed as usual until it is frozen",
                )
                return None
            return named_cut(pl_module, self.module)
        if reason is not None and layers:
            self._warn_once(f"partial:{reason}", f"{_WHERE}: caching the frozen prefix up to where {reason}.")
        if not layers:
            if reason is not None:
                self._warn_once(
                    f"none:{reason}", f"{_WHERE}: nothing of the frozen prefix is cached: {reason}."
                )
            return None
        if self._use_fallback:
            cut = fallback_cut(pl_module, layers)
            graph = plan_cut(pl_module, layers)
            where = graph.root_name if graph is not None else "the model"
            self._warn_once(
                "fallback",
                f"{_WHERE}: {where!r}, which holds the frozen layers {[x.name for x in layers]}, was not called in a "
                "training step (training_step calls the layers itself?); "
                + (f"caching {cut.describe()} instead." if cut is not None else "nothing is cached."),
            )
            return cut
        return plan_cut(pl_module, layers)

    def _drop(self, why: str) -> None:
        if self._server is not None:
            if self._server.store.entries:
                self._event("drop", entries=self._server.store.entries, why=why)
            self._server.store.clear()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.uninstall()
            self._drop("fit ended")
            self._server = None
        if self._disk is not None:
            self._disk.release()
            self._disk = None


class _Reports:
    """How the serving code reports back to the callback (the callback's reporting stays private)."""

    def __init__(self, cache: FrozenPrefixCache) -> None:
        self._cache = cache

    def warn_once(self, key: str, message: str) -> None:
        self._cache._warn_once(key, message)

    def event(self, action: str, **info: Any) -> None:
        self._cache._event(action, **info)

    def switch_off(self, reason: str) -> None:
        self._cache._switch_off(reason)

    def invalidate(self, reason: str) -> None:
        self._cache._invalidate(reason)

    def no_cut(self, reason: str) -> None:
        self._cache._no_cut(reason)

    def stop_ids(self, reason: str) -> None:
        self._cache._stop_ids(reason)


def _check_module(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_WHERE}: module must be 'auto' or a module name, got {value!r}")
    return value


def _check_dir(value: Any) -> str | os.PathLike[str] | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{_WHERE}: disk_dir must be a path or None, got {value!r}")
    return value
