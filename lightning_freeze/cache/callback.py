"""FrozenPrefixCache: serve the frozen prefix's output from a cache instead of recomputing it.

A frozen prefix in eval mode is a pure function of its input: the same sample gives the same output
every epoch. This callback memoises that function per sample. Add it next to a freezing callback and
change nothing else::

    trainer = Trainer(callbacks=[LayerFreeze("backbone.*"), FrozenPrefixCache()])

The pieces (details and limits: docs/cache.md):

- :mod:`~lightning_freeze.cache.cut`: where to cut, from the freezing engine's frozen prefix; the
  dataflow of the module that holds the prefix is recorded once (:mod:`~lightning_freeze.cache.trace`),
  so the cut can end anywhere, not only at module boundaries;
- :mod:`~lightning_freeze.cache.patch`: the entry points on the model's instances, restored after fit;
- :mod:`~lightning_freeze.cache.serving`: keys, lookups, serving and computing per call;
- :mod:`~lightning_freeze.cache.store` and :mod:`~lightning_freeze.cache.disk`: rows in RAM, then on disk;
- :mod:`~lightning_freeze.cache.guard`: when stored rows stop being valid.

This class decides *when*: it re-plans the cut when the frozen prefix changes, looks up only in training
steps (validation and test batches are never stored), keeps the statistics, and switches itself off
when the inputs change every epoch (random augmentation). Nothing is saved in checkpoints; after a
resume the cache fills again.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils import _pytree as pytree

from lightning_freeze.cache import budget
from lightning_freeze.cache.cut import Cut, fallback_cut, named_cut, plan_cut, usable_prefix
from lightning_freeze.cache.disk import DiskTier, free_bytes
from lightning_freeze.cache.fingerprint import Fingerprinter
from lightning_freeze.cache.readahead import Readahead, next_batch
from lightning_freeze.cache.serving import Server, Settings
from lightning_freeze.cache.stats import EpochStats
from lightning_freeze.cache.store import RowStore
from lightning_freeze.engine.layers import named_modules
from lightning_freeze.validation import check_bool, check_int, check_number

__all__ = ["FrozenPrefixCache"]
_WHERE = "FrozenPrefixCache"


class FrozenPrefixCache(Callback):
    """Serve the frozen prefix's output from a per-sample cache; losses and weights stay as without it.

    Args:
        module: ``"auto"`` (the frozen prefix that the freezing callback reports, cut wherever it ends) or
            the qualified name of one module to cache (served while it is frozen and in eval mode).
        max_bytes: RAM for the cache: bytes, a string such as ``"2GB"``, or a fraction of the available
            RAM. Default: ``0.25`` of the RAM available at fit start, divided by the processes on this machine.
        max_disk_bytes: disk for rows past ``max_bytes`` (memory-mapped files in ``disk_dir``): bytes, a
            string, or a fraction of the free space; ``0`` turns the disk tier off. Default: ``0.25`` of the
            free space at fit start, divided by the processes on this machine; the file system always keeps
            at least max(1 GiB, 5%) free. Past both, only the samples already cached are served.
        disk_dir: where the disk tier's files go (deleted at the end of fit). Default: a
            ``frozen_prefix_cache`` folder in the trainer's ``default_root_dir``.
        min_hit_rate: after an epoch that starts with cached rows, if fewer than this fraction of
            them were reused (random augmentation), caching switches off and frees its memory.
        verify: how many times per cut stored rows are compared with ``torch.equal`` against the same
            samples computed in another batch composition (0: never). A difference warns; a difference
            beyond rounding switches the cache off.
        min_rows: batches (and sub-batches of misses) with fewer rows are computed and never stored:
            CPU kernels take other code paths for tiny batches, whose last bits can differ.
        strict: switch off, rather than warn, when ``verify`` finds rows that are only equal up to rounding.
        read_ahead: read the next batch's rows in a background thread while the current step runs, when
            Lightning has fetched that batch already (iterable datasets; see :mod:`~lightning_freeze.cache.readahead`).
        log_stats: log ``cache/hit_rate`` (epochs with lookups only), ``cache/bytes``, ``cache/entries`` and
            ``cache/time_saved_s`` every epoch.

    From the second epoch on every training batch is served from the cache:

    >>> from lightning_freeze import LayerFreeze
    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> cache = FrozenPrefixCache(max_bytes="64MB", max_disk_bytes=0)
    >>> callbacks = [LayerFreeze("backbone", plot=False), cache]
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
        verify: int = 1,
        min_rows: int = 4,
        strict: bool = False,
        log_stats: bool = True,
        read_ahead: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(module, str) or not module:
            raise ValueError(f"{_WHERE}: module must be 'auto' or a module name, got {module!r}")
        budget.parse_bytes(max_bytes, available=1)  # validate early
        budget.parse_bytes(max_disk_bytes, available=1, option="max_disk_bytes")
        if disk_dir is not None and not isinstance(disk_dir, (str, os.PathLike)):
            raise ValueError(f"{_WHERE}: disk_dir must be a path or None, got {disk_dir!r}")
        self.module, self.max_bytes, self.max_disk_bytes, self.disk_dir = (
            module,
            max_bytes,
            max_disk_bytes,
            disk_dir,
        )
        self.min_hit_rate = check_number(min_hit_rate, "min_hit_rate", low=0, high=1, where=_WHERE)
        self.verify = check_int(verify, "verify", minimum=0, where=_WHERE)
        self.min_rows = check_int(min_rows, "min_rows", minimum=1, where=_WHERE)
        self.strict = check_bool(strict, "strict", where=_WHERE)
        self.log_stats = check_bool(log_stats, "log_stats", where=_WHERE)
        self.read_ahead = check_bool(read_ahead, "read_ahead", where=_WHERE)
        self.fingerprinter = Fingerprinter()
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.server: Server | None = None
        self.disk: DiskTier | None = None
        self._reset()

    def _reset(self) -> None:
        self._shutdown()
        self._trainer: pl.Trainer | None = None
        self.off_reason: str | None = None
        self.ram_budget = self.disk_budget = 0
        self._warned: set[str] = set()
        self._cut_key: Any = None
        self._stale = False
        self._generation = 0
        self._per_row: deque[float] = deque(maxlen=64)
        self._epoch = EpochStats(per_row=self._per_row)
        self._use_fallback = False
        self._named: dict[str, Any] = {}
        self.readahead = Readahead(self.fingerprinter) if self.read_ahead else None
        self._settings = Settings(self.min_rows, self.verify, self.strict)

    # ------------------------------------------------------------------ what it holds
    @property
    def cut(self) -> Cut | None:
        """Where the cache cuts the network now (None: nothing is cached)."""
        return self.server.cut if self.server is not None else None

    @property
    def store(self) -> RowStore | None:
        return self.server.store if self.server is not None else None

    @property
    def entries(self) -> int:
        return self.store.entries if self.store is not None else 0

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self.history, self.events = [], []
        self._trainer = trainer
        processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))
        self.ram_budget = budget.ram_budget(self.max_bytes, processes)
        folder = os.fspath(self.disk_dir or os.path.join(trainer.default_root_dir, "frozen_prefix_cache"))
        self.disk_budget = budget.disk_budget(self.max_disk_bytes, free_bytes(folder), processes)
        self.disk = DiskTier(folder, self.disk_budget) if self.disk_budget > 0 else None
        self._named = named_modules(pl_module)  # names as users write them (no torch.compile _orig_mod)
        if self.module != "auto" and self.module not in self._named:
            close = difflib.get_close_matches(self.module, [n for n in self._named if n], n=5, cutoff=0.3)
            raise ValueError(
                f"{_WHERE}: module={self.module!r} names no module of the model; closest: {close}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.module == "auto" and self._engine() is None:
            self.warn_once(
                "no-engine",
                f"{_WHERE}(module='auto') found no freezing callback (LayerFreeze, FreezeOut, ProgressiveUnfreezing) "
                "on the Trainer, so there is no frozen prefix to cache. Add one, or name the frozen module: "
                "FrozenPrefixCache(module='backbone').",
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = EpochStats(
            entries_at_start=self.entries, generation=self._generation, per_row=self._per_row
        )
        if self.server is not None:
            self.server.stats = self._epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.off_reason is not None:
            return
        self._refresh(pl_module)
        server = self.server
        if server is None:
            return
        server.active, server.calls = True, 0
        server.batch_leaves = pytree.tree_leaves(batch)
        if server.cut.recorded and self.readahead is not None:
            server.readahead = self.readahead
            self.readahead.start(next_batch(trainer), server.store, pin=server.store.pin)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        server = self.server
        if server is None:
            return
        server.active = False
        unused = server.cut.kind == "graph" and not server.cut.recorded and server.calls == 0
        if unused and not self._use_fallback:
            # the root never ran in a training step: try a module the step does call
            self._use_fallback, self._cut_key = True, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = self._epoch
        cut, store = self.cut, self.store
        stats = {
            "epoch": trainer.current_epoch,
            **e.summary(self._per_row),
            "entries": self.entries,
            "ram_bytes": store.ram_bytes if store is not None else 0,
            "disk_bytes": store.disk_bytes if store is not None else 0,
            "disk_entries": store.disk_entries if store is not None else 0,
            "used_bytes": store.used_bytes if store is not None else 0,
            "budget": self.ram_budget,
            "disk_budget": self.disk_budget,
            "full": bool(store.full) if store is not None else False,
            "rows": store.describe_rows() if store is not None else [],
            "cached": cut.describe() if cut is not None and cut.recorded else None,
            "off": self.off_reason,
            "generation": self._generation,
        }
        stats["bytes"] = stats["ram_bytes"] + stats["disk_bytes"]
        self.history.append(stats)
        if self.log_stats and self.off_reason is None:
            logged = {"cache/bytes": float(stats["bytes"]), "cache/entries": float(stats["entries"])}
            logged["cache/time_saved_s"] = float(stats["time_saved_s"])
            if stats["hit_rate"] is not None:  # no lookups, no rate
                logged["cache/hit_rate"] = float(stats["hit_rate"])
            pl_module.log_dict(logged, on_step=False, on_epoch=True, rank_zero_only=True)
        if cut is not None and e.lookups == 0 and e.bypassed == 0 and self.off_reason is None:
            self.warn_once(
                "never-called",
                f"{_WHERE}: {cut.root_name or 'the model'!r} was not called in any training step of epoch "
                f"{trainer.current_epoch}, so nothing was cached: training_step reaches the frozen layers some other "
                "way than through it. Name a module the step calls: FrozenPrefixCache(module=...). See docs/cache.md.",
            )
        if (
            self.off_reason is None
            and e.generation == self._generation
            and e.inputs_changed(self.min_hit_rate)
        ):
            rate = e.found / max(1, min(e.lookups, e.entries_at_start))
            self.switch_off(
                f"only {rate:.0%} of the samples cached in the previous epoch came back in epoch "
                f"{trainer.current_epoch} (min_hit_rate={self.min_hit_rate}); the inputs change between epochs "
                "(random augmentation?), so the frozen prefix is computed as usual from now on"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._shutdown()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._shutdown()

    # ------------------------------------------------------------------ what the serving code reports
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def event(self, action: str, **info: Any) -> None:
        self.events.append({"action": action, **info})

    def switch_off(self, reason: str) -> None:
        if self.off_reason is not None:
            return
        self.off_reason = reason
        self._shutdown()
        self.event("off", why=reason)
        warnings.warn(f"{_WHERE} switched off: {reason}. Its memory is released.", stacklevel=3)

    def invalidate(self, reason: str) -> None:
        """The stored rows no longer hold (a thaw, a weight change): drop them and plan again next batch."""
        self._drop(reason)
        self.event("invalidate", why=reason)
        self._stale = True

    def no_cut(self, reason: str) -> None:
        """The recorded forward showed that nothing can be served."""
        self.warn_once(f"no-cut:{reason}", f"{_WHERE}: nothing of the frozen prefix is cached: {reason}.")
        self._uninstall()
        self.server = None

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

    def _refresh(self, pl_module: pl.LightningModule) -> None:
        """Plan the cut again when the frozen prefix changed (names, or a tie that trains or stopped training)."""
        layers: list[Any] = []
        reason = None
        if self.module == "auto":
            engine = self._engine()
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
        old = self.server
        self._uninstall()
        cut = self._plan(pl_module, layers, reason)
        inherited = None
        if cut is not None and old is not None and old.cut.recorded and old.store.entries:
            inherited = (old.cut, old.store)
        else:
            self._drop("the frozen prefix changed" if cut is None else f"now caching {cut.describe()}")
        self.server = None
        if cut is None:
            return
        self._generation += 1
        store = RowStore(self.ram_budget, self.disk, pin=pl_module.device.type == "cuda")
        self.server = Server(cut, store, self.fingerprinter, self._settings, self._epoch, self, inherited)
        self._install(self.server, prune=False)

    def _plan(self, pl_module: pl.LightningModule, layers: list[Any], reason: str | None) -> Cut | None:
        if self.module != "auto":
            if not self._cut_key:
                self.warn_once(
                    "not-frozen",
                    f"{_WHERE}: module {self.module!r} has trainable parameters; it is computed as usual until it is frozen",
                )
                return None
            return named_cut(pl_module, self.module)
        if reason is not None and layers:
            self.warn_once(f"partial:{reason}", f"{_WHERE}: caching the frozen prefix up to where {reason}.")
        if not layers:
            if reason is not None:
                self.warn_once(
                    f"none:{reason}", f"{_WHERE}: nothing of the frozen prefix is cached: {reason}."
                )
            return None
        if self._use_fallback:
            cut = fallback_cut(pl_module, layers)
            graph = plan_cut(pl_module, layers)
            where = graph.root_name if graph is not None else "the model"
            self.warn_once(
                "fallback",
                f"{_WHERE}: {where!r}, which holds the frozen layers {[x.name for x in layers]}, was not called in a "
                "training step (training_step calls the layers itself?); "
                + (f"caching {cut.describe()} instead." if cut is not None else "nothing is cached."),
            )
            return cut
        return plan_cut(pl_module, layers)

    def _install(self, server: Server, prune: bool) -> None:
        self._uninstall()
        server.install(prune)

    def _uninstall(self) -> None:
        if self.server is not None:
            self.server.uninstall()

    def _drop(self, why: str) -> None:
        if self.server is not None:
            if self.server.store.entries:
                self.event("drop", entries=self.server.store.entries, why=why)
            self.server.store.clear()

    def _shutdown(self) -> None:
        if getattr(self, "readahead", None) is not None:
            self.readahead.close()
        self._uninstall()
        if self.server is not None:
            self._drop("fit ended")
            self.server = None
        if self.disk is not None:
            self.disk.release()
            self.disk = None
