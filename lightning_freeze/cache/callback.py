"""FrozenPrefixCache: serve the frozen prefix's output from a cache instead of recomputing it.

A frozen prefix in eval mode is a pure function of its input: the same sample gives the same output
every epoch. This callback memoises that function per sample. Add it next to a freezing callback and
change nothing else::

    trainer = Trainer(callbacks=[LayerFreeze("backbone.*"), FrozenPrefixCache()])

How it works (details and limits: docs/cache.md):

- **What is cached.** ``module="auto"`` takes the longest frozen prefix the freezing callback reports
  (``engine.frozen_prefix()`` of the freezing callback on the Trainer) and finds a place in the model that computes exactly it:
  one module whose parameters are exactly the prefix's (``backbone``), or a run of consecutive children
  of a plain ``nn.Sequential`` (``backbone.0..k`` while FreezeOut freezes them one by one). A named
  ``module`` caches exactly that module. When no such place exists, or a module on the way could
  behave differently in training (dropout or batch norm outside the frozen layers), it warns once and
  caches the longest part that is safe, or nothing; never a wrong result.
- **How a hit skips compute.** The chosen module's ``forward`` is replaced on the instance (restored at
  the end of fit). Per batch it fingerprints every sample's exact bytes (128 bits, see
  :mod:`lightning_freeze.cache.fingerprint`), serves the rows it has, computes the rest, and stores each
  sample's output row on the CPU (pinned, copied asynchronously when the model is on CUDA).
- **Validity.** Rows are served only while every parameter of the cached part is frozen and
  unchanged, its buffers are unchanged, and every module in it runs in eval mode. A thaw, a weight
  change (checked by tensor version counters and, when those move, by content), or a moved FreezeOut
  boundary drops or rebuilds the cache. When the boundary moves deeper, the stored rows are pushed
  through the newly frozen layers once instead of being thrown away.
- **Switching itself off.** Inputs that change every epoch (random augmentation) show up as a low hit
  rate after the first repeated epoch: caching then stops with one warning and frees its memory.
- **Memory.** ``max_bytes`` bounds the cache (default: a quarter of the RAM available at fit start,
  shared by the processes on the machine). Past the budget it caches only the samples it already
  has (no spilling, no eviction), so it never runs out of memory and part of each epoch still hits.
- Nothing is saved in checkpoints; after a resume the cache fills again.
"""

from __future__ import annotations

import collections
import statistics
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_freeze.cache.fingerprint import Fingerprinter, signature
from lightning_freeze.cache.store import (
    RowStore,
    Unsupported,
    bit_equal,
    memory_format,
    parse_bytes,
    should_switch_off,
)
from lightning_freeze.rules.checks import check_bool, check_int, check_number

__all__ = ["FrozenPrefixCache", "Plan", "find_plan"]

DEFAULT_RAM_FRACTION = 0.25

# Modules whose forward does not depend on ``training`` (exact types: a subclass may change that).
# fmt: off
_MODE_FREE: frozenset[type] = frozenset(
    t
    for t in (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
        nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten, nn.Embedding, nn.EmbeddingBag,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Softplus, nn.Softsign, nn.Hardswish,
        nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink, nn.Threshold, nn.GLU,
        nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
        nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
        nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.LayerNorm, nn.GroupNorm,
        getattr(nn, "RMSNorm", nn.LayerNorm),
    )
)
# fmt: on
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# ---------------------------------------------------------------------------------------------- planning
@dataclass(eq=False)
class Plan:
    """Where the cache sits: a whole module, or children ``start..stop`` of a plain ``nn.Sequential``."""

    kind: str  # "module" | "segment"
    target: nn.Module
    target_name: str
    start: int = 0
    stop: int = 0
    steps: tuple[nn.Module, ...] = ()
    layer_names: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "module":
            return f"module {self.target_name or '<root>'!r}"
        return f"children {self.start}..{self.stop} of {self.target_name or '<root>'!r}"

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, id(self.target), self.start, self.stop)


def _plain_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and "forward" not in module.__dict__
    )


def expand(module: nn.Module) -> list[nn.Module]:
    """The module as the chain of modules it applies (plain Sequentials opened up)."""
    if _plain_sequential(module):
        return [m for child in module for m in expand(child)]
    return [module]


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def mode_sensitive(module: nn.Module) -> list[nn.Module]:
    """Submodules whose output may depend on ``training`` (dropout with p > 0, batch norm, unknown types)."""
    out = []
    for m in module.modules():
        if type(m) in _MODE_FREE:
            continue
        if isinstance(m, _DROPOUTS) and m.p == 0:
            continue
        out.append(m)
    return out


def _statically_safe(module: nn.Module, managed: set[int]) -> bool:
    return all(id(m) in managed for m in mode_sensitive(module))


def find_plan(model: nn.Module, layers: Sequence[Any], managed: set[int]) -> Plan | None:
    """A place in ``model`` that computes exactly the frozen ``layers`` (in order), or None.

    ``managed`` holds the ids of the modules a freezing engine keeps in eval mode.
    """
    want = {id(p) for layer in layers for p in layer.params}
    if not want:
        return None
    names = tuple(layer.name for layer in layers)
    named = [(n, m) for n, m in model.named_modules() if n]
    for name, module in sorted(named, key=lambda nm: nm[0].count(".")):
        if (
            _param_ids(module) == want
            and _statically_safe(module, managed)
            and "forward" not in module.__dict__
        ):
            return Plan("module", module, name, steps=tuple(expand(module)), layer_names=names)
    for name, container in [("", model), *named]:
        if not _plain_sequential(container):
            continue
        kids = list(container)
        ids = [_param_ids(k) for k in kids]
        touched = [i for i, s in enumerate(ids) if s & want]
        if not touched:
            continue
        i, j = touched[0], touched[-1]
        if set().union(*ids[i : j + 1]) != want:
            continue
        if not all(_statically_safe(k, managed) for k in kids[i : j + 1]):
            continue
        while j + 1 < len(kids) and not ids[j + 1] and _statically_safe(kids[j + 1], managed):
            j += 1
        while i > 0 and not ids[i - 1] and _statically_safe(kids[i - 1], managed):
            i -= 1
        steps = tuple(m for k in kids[i : j + 1] for m in expand(k))
        if i == 0 and j == len(kids) - 1 and name:
            return Plan("module", container, name, steps=steps, layer_names=names)
        return Plan("segment", container, name, i, j, steps=steps, layer_names=names)
    return None


def _managed_modules(engine: Any) -> set[int]:
    return set() if engine is None else {id(m) for m in engine.eval_modules()}


# ---------------------------------------------------------------------------------------------- validity
class _Guard:
    """Tells whether the cached part still computes what it computed when the rows were stored."""

    def __init__(self, modules: Sequence[nn.Module], fingerprinter: Fingerprinter) -> None:
        params: dict[int, torch.Tensor] = {}
        buffers: dict[int, torch.Tensor] = {}
        for top in modules:
            for p in top.parameters():
                params.setdefault(id(p), p)
            for b in top.buffers():
                buffers.setdefault(id(b), b)
        self.params = list(params.values())
        self.tensors = self.params + list(buffers.values())
        self.fp = fingerprinter
        self.versions = [t._version for t in self.tensors]
        self.prints = [fingerprinter.tensor(t) for t in self.tensors]

    def problem(self) -> str | None:
        for p in self.params:
            if p.requires_grad:
                return "a parameter of the cached part requires grad (it was thawed)"
        for i, t in enumerate(self.tensors):
            if t._version != self.versions[i]:
                # Version counters move on any in-place write, also one that writes the same values
                # (DDP broadcasting buffers from rank 0); only a change of content invalidates.
                if self.fp.tensor(t) != self.prints[i]:
                    return "a parameter or buffer of the cached part changed"
                self.versions[i] = t._version
        return None


# ---------------------------------------------------------------------------------------------- the callback
@dataclass
class _EpochStats:
    hits: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    found: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    lookups: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    entries_at_start: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    bypassed: int = 0
    miss_rows: int = 0
    miss_seconds: float = 0.0
    overhead_seconds: float = 0.0
    generation: int = 0


class FrozenPrefixCache(Callback):
    """Serve the frozen prefix's output from a per-sample cache; losses and weights stay as without it.

    Args:
        module: ``"auto"`` (the largest frozen prefix that the freezing callback reports) or the
            qualified name of one module to cache (it must be frozen and in eval mode to be served).
        max_bytes: bound on the cache's memory: bytes, a string such as ``"2GB"``, or a fraction of the
            available RAM. Default: ``0.25`` of the RAM available at fit start, divided by the processes
            on this machine. Past it, only the samples already cached are served.
        min_hit_rate: after an epoch that starts with cached rows, if fewer than this fraction of
            them were reused (random augmentation), caching switches off and frees its memory.
        verify: how many batches served from the cache per cache generation are recomputed and
            compared with ``torch.equal`` (0: never). A difference warns; a difference beyond rounding
            switches the cache off.
        min_rows: batches (and sub-batches of misses) with fewer rows are always computed and never
            stored: CPU kernels take other code paths for tiny batches, whose last bits can differ.
        strict: switch off, rather than warn, when ``verify`` finds rows that are only equal up to
            rounding.

    From the second epoch on every training batch is served from the cache:

    >>> import torch
    >>> from lightning.pytorch import Trainer
    >>> from lightning_freeze.tasks.digits import DigitsClassifier
    >>> images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    >>> quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> from lightning_freeze import LayerFreeze
    >>> cache = FrozenPrefixCache(max_bytes="64MB")
    >>> callbacks = [LayerFreeze("backbone", plot=False), cache]
    >>> Trainer(max_epochs=2, callbacks=callbacks, **quiet).fit(DigitsClassifier(pretrained=False), data)
    >>> [(h["train_hits"], h["train_lookups"]) for h in cache.history]
    [(0, 32), (32, 32)]
    """

    def __init__(
        self,
        module: str = "auto",
        max_bytes: int | float | str | None = None,
        min_hit_rate: float = 0.25,
        verify: int = 1,
        min_rows: int = 4,
        strict: bool = False,
        log_stats: bool = True,
    ) -> None:
        super().__init__()
        where = "FrozenPrefixCache"
        if not isinstance(module, str) or not module:
            raise ValueError(f"{where}: module must be 'auto' or a module name, got {module!r}")
        parse_bytes(max_bytes, available=1)  # validate early
        self.module = module
        self.max_bytes = max_bytes
        self.min_hit_rate = check_number(min_hit_rate, "min_hit_rate", low=0, high=1, where=where)
        self.verify = check_int(verify, "verify", minimum=0, where=where)
        self.min_rows = check_int(min_rows, "min_rows", minimum=1, where=where)
        self.strict = check_bool(strict, "strict", where=where)
        self.log_stats = check_bool(log_stats, "log_stats", where=where)
        self.fingerprinter = Fingerprinter()
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._active = False
        self._model: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None
        self.plan: Plan | None = None
        self.store: RowStore | None = None
        self._guard: _Guard | None = None
        self._installed: tuple[nn.Module, bool, Any] | None = None
        self.off_reason: str | None = None
        self._warned: set[str] = set()
        self._stage = "train"
        self._epoch = _EpochStats()
        self._generation = 0
        self._verify_left = 0
        self._stale = False
        self._sensitive: list[nn.Module] = []
        self._device = torch.device("cpu")
        self._batch_rows = 0
        self._entries_by_stage = {"train": 0, "val": 0}
        self._per_row: collections.deque[float] = collections.deque(maxlen=32)  # recent compute s/row
        self._plan_key: tuple[Any, ...] | None = None
        self.budget = 0

    @property
    def entries(self) -> int:
        return self.store.entries if self.store is not None else 0

    @property
    def nbytes(self) -> int:
        return self.store.allocated if self.store is not None else 0

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._shutdown()
        self._reset()
        self.history, self.events = [], []
        self._active = True
        self._model, self._trainer = pl_module, trainer
        self.budget = self._budget(trainer)
        if self.module != "auto":
            named = dict(pl_module.named_modules())
            if self.module not in named:
                import difflib

                close = difflib.get_close_matches(self.module, [n for n in named if n], n=5, cutoff=0.3)
                raise ValueError(f"FrozenPrefixCache: no module named {self.module!r}; closest: {close}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.module == "auto" and self._engine() is None:
            self._warn_once(
                "no-engine",
                "FrozenPrefixCache(module='auto') found no freezing callback (LayerFreeze, FreezeOut, "
                "ProgressiveUnfreezing) on this model, so there is no frozen prefix to cache. Add one, or "
                "name the frozen module: FrozenPrefixCache(module='backbone').",
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = _EpochStats(generation=self._generation)
        self._epoch.entries_at_start = dict(self._entries_by_stage)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stage = "train"
        self._refresh(pl_module)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._stage = "val"
        self._refresh(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage = "train"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        e = self._epoch
        lookups = sum(e.lookups.values())
        hits = sum(e.hits.values())
        per_row = statistics.median(self._per_row) if self._per_row else 0.0
        stats = {
            "epoch": trainer.current_epoch,
            "hits": hits,
            "lookups": lookups,
            "hit_rate": hits / lookups if lookups else 0.0,
            "train_hits": e.hits["train"],
            "train_lookups": e.lookups["train"],
            "entries": self.entries,
            "bytes": self.nbytes,
            "used_bytes": self.store.used_bytes if self.store is not None else 0,
            "budget": self.budget,
            "full": bool(self.store.full) if self.store is not None else False,
            "bypassed": e.bypassed,
            "time_saved_s": max(0.0, hits * per_row - e.overhead_seconds),
            "overhead_s": e.overhead_seconds,
            "cached": self.plan.describe() if self.plan is not None else None,
            "off": self.off_reason,
            "generation": self._generation,
        }
        self.history.append(stats)
        if self.log_stats and self.off_reason is None:
            pl_module.log_dict(
                {
                    "cache/hit_rate": float(stats["hit_rate"]),
                    "cache/bytes": float(stats["bytes"]),
                    "cache/entries": float(stats["entries"]),
                    "cache/time_saved_s": float(stats["time_saved_s"]),
                },
                on_step=False,
                on_epoch=True,
                rank_zero_only=True,
            )
        if self.plan is not None and lookups == 0 and e.bypassed == 0 and self.off_reason is None:
            self._warn_once(
                "never-called",
                f"FrozenPrefixCache: {self.plan.describe()} was not called with one tensor during a whole epoch, so "
                "nothing was cached (does the model call its children directly?). See docs/cache.md.",
            )
        if self.off_reason is None and e.generation == self._generation:
            for stage in ("train", "val"):
                if should_switch_off(
                    e.found[stage], e.lookups[stage], e.entries_at_start[stage], self.min_hit_rate
                ):
                    rate = e.found[stage] / max(1, min(e.lookups[stage], e.entries_at_start[stage]))
                    self._switch_off(
                        f"only {rate:.0%} of the {stage} samples cached in the previous epoch came back in epoch "
                        f"{trainer.current_epoch} (min_hit_rate={self.min_hit_rate}); the inputs change between "
                        "epochs (random augmentation?), so the frozen prefix is computed as usual from now on"
                    )
                    break

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._shutdown()
            self._active = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._shutdown()
        self._active = False

    def state_dict(self) -> dict[str, Any]:
        return {}  # the cache is never checkpointed; it refills after a resume

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ planning and installing
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
        if not self._active or self.off_reason is not None:
            return
        engine = self._engine()
        if self.module == "auto":
            names = tuple(layer.name for layer in engine.frozen_prefix()) if engine is not None else ()
            key: tuple[Any, ...] = (names,)
        else:
            module = dict(pl_module.named_modules())[self.module]
            frozen = not any(p.requires_grad for p in module.parameters())
            key = (id(module), frozen)
        if key == self._plan_key and not self._stale:
            return
        self._plan_key = key
        self._uninstall()  # plan on the model as the user built it, without our own forward override
        if self.module == "auto":
            plan = self._auto_plan(pl_module, engine) if names else None
        elif not frozen:
            self._warn_once(
                "not-frozen",
                f"FrozenPrefixCache: module {self.module!r} has trainable parameters; "
                "it is computed as usual until it is frozen",
            )
            plan = None
        elif "forward" in module.__dict__:
            self._switch_off(f"module {self.module!r} already has its own instance-level forward")
            return
        else:
            plan = Plan("module", module, self.module, steps=tuple(expand(module)))
        self._apply(plan)

    def _auto_plan(self, pl_module: nn.Module, engine: Any) -> Plan | None:
        prefix = engine.frozen_prefix()
        managed = _managed_modules(engine)
        for n in range(len(prefix), 0, -1):
            plan = find_plan(pl_module, prefix[:n], managed)
            if plan is not None:
                if n < len(prefix):
                    self._warn_once(
                        "partial",
                        f"FrozenPrefixCache: the frozen prefix {[p.name for p in prefix]} cannot be cached as one "
                        f"piece; caching {[p.name for p in prefix[:n]]} ({plan.describe()}). The cache needs the "
                        "frozen layers to be one module, or consecutive children of a plain nn.Sequential, with "
                        "no dropout or batch norm outside the frozen layers in between (docs/cache.md).",
                    )
                return plan
        self._warn_once(
            "none",
            f"FrozenPrefixCache: no part of the frozen prefix {[p.name for p in prefix]} can be cached (it is "
            "neither one module nor consecutive children of a plain nn.Sequential, or a dropout/batch-norm "
            "module outside the frozen layers sits in it); training goes on uncached.",
        )
        return None

    def _apply(self, plan: Plan | None) -> None:
        old, old_guard = self.plan, self._guard
        self._uninstall()
        self._stale = False
        if plan is None:
            self._drop("the frozen prefix changed")
            self.plan = None
            return
        usable = (
            old is not None
            and self.store is not None
            and old_guard is not None
            and len(plan.steps) >= len(old.steps)
            and all(a is b for a, b in zip(old.steps, plan.steps[: len(old.steps)], strict=False))
            and old_guard.problem() is None
        )
        if usable and len(plan.steps) == len(old.steps):
            # Same computation (e.g. FreezeOut froze a layer past the part that can be cached): keep it all.
            self.plan = plan
            self._install(plan)
            return
        extend = usable and self.store is not None and self.store.entries > 0
        self.plan = plan
        self._guard = _Guard(plan.steps, self.fingerprinter)
        self._sensitive = (
            [] if self.module == "auto" else [m for top in plan.steps for m in mode_sensitive(top)]
        )
        if extend:
            self._extend(plan.steps[len(old.steps) :])
        else:
            self._new_generation(f"now caching {plan.describe()}")
        self._install(plan)

    def _new_generation(self, why: str) -> None:
        self._drop(why)
        self.store = RowStore(self.budget, pin=False)
        self._generation += 1
        self._verify_left = self.verify

    def _drop(self, why: str) -> None:
        if self.store is not None and self.store.entries:
            self.events.append({"action": "drop", "entries": self.store.entries, "why": why})
        self.store = None
        self._entries_by_stage = {"train": 0, "val": 0}

    def _extend(self, extra: Sequence[nn.Module]) -> None:
        assert self.store is not None
        start = time.perf_counter()

        def through(rows: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for m in extra:
                    rows = m(rows)
            return rows

        before = self.store.entries
        try:
            self.store.transform(
                through, max(self.min_rows, self._batch_rows or 64), self.min_rows, self._device
            )
        except Exception as err:  # noqa: BLE001 - fall back to refilling
            self._new_generation(f"could not extend the cache: {err}")
            return
        if self.store.entries < before:  # the budget cut rows: scale the per-stage counts alike
            ratio = self.store.entries / max(1, before)
            self._entries_by_stage = {k: int(v * ratio) for k, v in self._entries_by_stage.items()}
        self._verify_left = self.verify
        self.events.append(
            {
                "action": "extend",
                "entries": self.store.entries,
                "seconds": time.perf_counter() - start,
                "through": len(extra),
            }
        )

    def _install(self, plan: Plan) -> None:
        target = plan.target
        had = "forward" in target.__dict__
        previous = target.__dict__.get("forward")
        cache = self
        if plan.kind == "module":
            original = previous if had else type(target).forward

            def forward(module_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
                call = (
                    (lambda *a, **k: original(*a, **k))
                    if had
                    else (lambda *a, **k: original(module_self, *a, **k))
                )
                if (
                    module_self is not target
                    or kwargs
                    or len(args) != 1
                    or not isinstance(args[0], torch.Tensor)
                ):
                    return call(*args, **kwargs)
                return cache._call(args[0], call)
        else:
            start, stop = plan.start, plan.stop

            def forward(module_self: nn.Module, input: Any) -> Any:  # noqa: A002 - nn.Sequential's name
                kids = list(module_self)
                if module_self is not target:  # a deep copy of the model: no cache
                    for m in kids:
                        input = m(input)
                    return input

                def segment(x: Any) -> Any:
                    for m in kids[start : stop + 1]:
                        x = m(x)
                    return x

                for m in kids[:start]:
                    input = m(input)
                input = cache._call(input, segment) if isinstance(input, torch.Tensor) else segment(input)
                for m in kids[stop + 1 :]:
                    input = m(input)
                return input

        target.forward = types.MethodType(forward, target)
        self._installed = (target, had, previous)

    def _uninstall(self) -> None:
        if self._installed is None:
            return
        target, had, previous = self._installed
        if had:
            target.forward = previous
        else:
            target.__dict__.pop("forward", None)
        self._installed = None

    def _shutdown(self) -> None:
        self._uninstall()
        self._drop("fit ended")
        self.plan = None
        self._guard = None

    def _switch_off(self, reason: str) -> None:
        if self.off_reason is not None:
            return
        self.off_reason = reason
        self._shutdown()
        self.events.append({"action": "off", "why": reason})
        warnings.warn(f"FrozenPrefixCache switched off: {reason}. Its memory is released.", stacklevel=2)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=2)

    def _budget(self, trainer: pl.Trainer) -> int:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - psutil missing or unsupported: assume 4 GB
            available = 4 << 30
        procs = max(1, int(getattr(trainer, "num_devices", 1) or 1))
        explicit = parse_bytes(self.max_bytes, available=available)
        if explicit is not None:
            return explicit
        return int(DEFAULT_RAM_FRACTION * available / procs)

    # ------------------------------------------------------------------ the cached call
    def _bypass(self, x: torch.Tensor) -> bool:
        if self.store is None or self._guard is None or self.off_reason is not None:
            return True
        if x.dim() == 0 or x.requires_grad or x.shape[0] < self.min_rows:
            return True
        problem = self._guard.problem()
        if problem is not None:
            self._stale = True  # re-planned at the next batch start
            self._drop(problem)
            self._guard = None
            self.events.append({"action": "invalidate", "why": problem})
            return True
        if self._sensitive:
            # auto plans were checked when planned: every such module is one the engine keeps in eval
            managed = None
            for m in self._sensitive:
                if m.training and id(m) not in (managed := managed or _managed_modules(self._engine())):
                    self._warn_once(
                        "train-mode",
                        f"FrozenPrefixCache: {type(m).__name__} inside {self.module!r} "
                        "is in training mode, so its output can change; not cached",
                    )
                    return True
        return False

    def _context(self, x: torch.Tensor) -> tuple[Any, ...]:
        kind = x.device.type
        autocast = torch.is_autocast_enabled(kind) if kind in ("cuda", "cpu") else False
        dtype = torch.get_autocast_dtype(kind) if autocast else None
        return (*signature(x), str(x.device), autocast, str(dtype))

    def _call(self, x: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        stage = self._stage
        if self._bypass(x):
            self._epoch.bypassed += 1
            return compute(x)
        store = self.store
        assert store is not None
        t0 = time.perf_counter()
        self._device = x.device
        self._batch_rows = max(self._batch_rows, x.shape[0])
        if x.device.type == "cuda" and not store.pin:
            store.pin = True
        sig = self._context(x)
        keys = self.fingerprinter.rows(x)
        slots = store.lookup(sig, keys)
        hit = [i for i, s in enumerate(slots) if s >= 0]
        b = len(keys)
        self._epoch.lookups[stage] += b
        self._epoch.found[stage] += len(hit)
        self._epoch.hits[stage] += len(hit)
        overhead = time.perf_counter() - t0
        try:
            if not hit:
                out = self._compute(x, compute, b)
                t1 = time.perf_counter()
                self._entries_by_stage[stage] += store.insert(sig, keys, out)
                self._epoch.overhead_seconds += overhead + time.perf_counter() - t1
                return out
            if len(hit) == b:
                out = store.gather(sig, slots, x.device)
                self._epoch.overhead_seconds += time.perf_counter() - t0
                return self._verified(x, out, compute)
            miss = [i for i, s in enumerate(slots) if s < 0]
            if len(miss) >= self.min_rows:
                miss_idx = torch.as_tensor(miss, device=x.device)
                sub = self._compute(x.index_select(0, miss_idx), compute, len(miss))
                t1 = time.perf_counter()
                rows = store.gather(sig, [slots[i] for i in hit], x.device)
                fmt = memory_format(sub)
                out = torch.empty((b, *sub.shape[1:]), dtype=sub.dtype, device=sub.device)
                out = out.contiguous(memory_format=fmt) if fmt is not None else out
                out[torch.as_tensor(hit, device=x.device)] = rows
                out[miss_idx] = sub
                self._entries_by_stage[stage] += store.insert(sig, [keys[i] for i in miss], sub)
                self._epoch.overhead_seconds += overhead + time.perf_counter() - t1
                return self._verified(x, out, compute)
            self._epoch.hits[stage] -= len(hit)  # too few misses for a sub-batch: computed anyway
            out = self._compute(x, compute, b)
            t1 = time.perf_counter()
            miss_keys = [keys[i] for i in range(b) if slots[i] < 0]
            rows = out.index_select(
                0, torch.as_tensor([i for i in range(b) if slots[i] < 0], device=out.device)
            )
            self._entries_by_stage[stage] += store.insert(sig, miss_keys, rows)
            self._epoch.overhead_seconds += overhead + time.perf_counter() - t1
            return out
        except Unsupported as err:
            self._switch_off(str(err))
            return compute(x)

    def _compute(self, x: torch.Tensor, compute: Callable[[torch.Tensor], Any], rows: int) -> torch.Tensor:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = compute(x)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise Unsupported(
                f"the cached part ({self.plan.describe() if self.plan else '?'}) must return one tensor with the "
                f"batch first; got {type(out).__name__}"
            )
        if out.requires_grad:
            raise Unsupported("the cached part's output requires grad, so part of it still trains")
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - t0
        self._epoch.miss_seconds += seconds
        self._epoch.miss_rows += rows
        self._per_row.append(seconds / max(1, rows))
        return out

    def _verified(
        self, x: torch.Tensor, out: torch.Tensor, compute: Callable[[torch.Tensor], Any]
    ) -> torch.Tensor:
        if self._verify_left <= 0:
            return out
        self._verify_left -= 1
        ref = compute(x)
        if bit_equal(out, ref):
            return out
        diff = (out.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        close = torch.allclose(out.float(), ref.float(), rtol=1e-4, atol=1e-5 * max(1.0, scale))
        if close and not self.strict:
            self._warn_once(
                "rounding",
                f"FrozenPrefixCache: rows served from the cache differ from a fresh computation by up to {diff:.3g} "
                "(rounding: the kernels here give the last bits differently for different batch compositions). "
                "Training is as correct as with nondeterministic kernels, but not bit-identical to an uncached "
                "run. Pass strict=True to switch the cache off in this case.",
            )
            return out
        self._switch_off(
            f"rows served from the cache differ from a fresh computation by up to {diff:.3g}; the cached part is "
            "not a pure function of its input here"
        )
        return ref
