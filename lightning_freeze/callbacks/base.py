"""Shared base of the freezing callbacks: layers + engine, resume, DDP sync, logging, timeline.

A subclass decides *when* layers freeze or thaw and calls :meth:`FreezingCallback.transition`; this
class does the rest in the same way for every callback:

- ``setup``: resolve the layers (``auto`` runs the model once on the first samples of the training
  data, see :func:`example_batch`) and freeze the ones the subclass starts frozen, before DDP wraps the
  model, so DDP never registers them and needs no ``find_unused_parameters``;
- ``load_state_dict`` (resume): put every layer back in the state it had when the checkpoint was saved,
  also before DDP wraps the model;
- ``on_fit_start``: split the user's optimizer into per-layer named groups and adapt its schedulers,
  before Lightning restores the optimizer and scheduler state, so the saved groups line up;
- ``on_train_start``: keep frozen layers in eval mode from here on (after Lightning's check for modules
  left in eval mode);
- on every transition under DDP: wrap the model in a fresh ``DistributedDataParallel``, so newly thawed
  parameters are all-reduced and frozen ones cost no communication;
- ``teardown`` and ``on_exception``: hand the model back as it was given (``requires_grad``, modes), so
  a second fit with a new Trainer, or a retry after a failure, starts clean.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_freeze.callbacks.resume import ensure_exact_resume
from lightning_freeze.engine import optim
from lightning_freeze.engine.adapters import trainable_report
from lightning_freeze.engine.freezing import NORM_MODES, FreezeEngine, trainable_counts
from lightning_freeze.engine.layers import Layer, check_forward_order, preserved_rng, select_layers
from lightning_freeze.validation import check_bool, check_choice, check_layer_spec

LayerSpec = str | Sequence[str]
_MAX_HISTORY_POINTS = 1000
_EXAMPLE_SAMPLES = 2
_STATE_KIND = "lightning_freeze.FreezingCallback"


class FreezingCallback(Callback):
    """Base class: owns the layers, the engine and everything shared by the freezing callbacks."""

    #: whether the order of the managed layers means something (the head last, freeze order): checked
    #: against the forward order when an example batch is at hand.
    ordered_layers = False

    def __init__(self, layers: LayerSpec = "auto", norm: str = "eval", plot: bool = True) -> None:
        super().__init__()
        where = type(self).__name__
        self.layer_spec = check_layer_spec(layers, where=where)
        self.norm = check_choice(
            norm,
            "norm",
            NORM_MODES,
            where=where,
            hint="'eval' keeps frozen norm layers fixed; 'train' lets them train, like fastai's train_bn",
        )
        self.plot = check_bool(plot, "plot", where=where)
        self.engine: FreezeEngine | None = None
        self.layers: list[Layer] = []
        self.events: list[dict[str, Any]] = []
        self.history: dict[str, Any] = {"step": [], "lr": {}}
        self._frozen_at_start: list[str] = []
        self._record_every = 1

    # ------------------------------------------------------------------ what subclasses decide
    def prepare(self, trainer: pl.Trainer, layers: list[Layer]) -> None:
        """Build what the subclass needs from the resolved layers, and raise a clear error for settings
        that cannot work with them (called at setup, before anything is frozen)."""

    def initially_frozen(self, layers: list[Layer]) -> list[str]:
        """Names of the layers frozen before the first step."""
        return []

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def on_optimizer_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at fit start once the optimizer is split into per-layer groups."""

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if isinstance(cb, FreezingCallback) and cb is not self
        ]
        if others:
            raise ValueError(
                f"{name} and {others} would manage the same model; use one freezing callback per Trainer"
            )
        self._release()  # a previous fit of this callback object that never reached teardown
        ensure_exact_resume(trainer)  # freeze state alone does not replay a run: RNG and loader position too
        example = self._example(trainer, pl_module)
        self.layers = select_layers(pl_module, self.layer_spec, example_input=example)
        if self.ordered_layers and example is not None:
            check_forward_order(pl_module, self.layers, example, self.layer_spec, name)
        self.prepare(trainer, self.layers)
        self.engine = FreezeEngine(pl_module, self.layers, norm=self.norm, owner=name)
        self.events, self.history = [], {"step": [], "lr": {}}
        self.engine.freeze(self.initially_frozen(self.layers))
        self._frozen_at_start = sorted(self.engine.frozen, key=[layer.name for layer in self.layers].index)
        if self.engine.frozen and trainable_counts(pl_module)[0] == 0:
            self._release()
            raise ValueError(
                f"{name}: with layers={self.layer_spec!r} every parameter of the model is frozen at the start, so "
                "nothing would train (autograd fails on the first backward). Leave the head out of `layers` "
                f"(e.g. layers='backbone.*'). At the start, {trainable_report(pl_module, self.layers)}."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._require_engine()
        name = type(self).__name__
        if len(trainer.optimizers) != 1 or not trainer.optimizers[0].param_groups:
            raise ValueError(
                f"{name} needs configure_optimizers to return exactly one optimizer (with the model's "
                f"parameters), got {len(trainer.optimizers)} optimizer(s)"
                + (
                    " and no param groups"
                    if trainer.optimizers and not trainer.optimizers[0].param_groups
                    else ""
                )
            )
        engine.attach(trainer.optimizers[0], self._schedulers(trainer))
        self.on_optimizer_attached(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning hands us our state only from the entry under our own state key; a checkpoint of another
        # freezing setup would fail later, in torch, on param groups that do not line up. Say so now.
        saved = checkpoint.get("callbacks", {})
        others = sorted(
            v["callback"]
            for k, v in saved.items()
            if k != self.state_key and isinstance(v, dict) and v.get("kind") == _STATE_KIND
        )
        if self.state_key in saved or not (others or checkpoint.get("optimizer_states")):
            return
        name = type(self).__name__
        what = f"with {others}, not with {name}" if others else f"without {name} (no state of it)"
        raise ValueError(
            f"{name}: the checkpoint was saved {what}, so its optimizer holds other param groups. Resume with the "
            "freezing callback it was saved with, or start a new fit from its weights: "
            "model.load_state_dict(torch.load(path)['state_dict'])"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in on_fit_start: asking for the step count there loads the train dataloader before Lightning
        # restores its state from the checkpoint, and a resumable loader would then restart its epoch.
        total = trainer.estimated_stepping_batches
        self._record_every = max(1, math.ceil(total / _MAX_HISTORY_POINTS)) if math.isfinite(total) else 1
        self._require_engine().activate_modes()
        self._record(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self._record_every == 0 and (not self.history["step"] or self.history["step"][-1] != step):
            self._record(step)
        if step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log_dict(self._stats(pl_module), on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer.global_step)
        # ``log_dir`` is a collective under DDP: every rank asks, rank 0 writes.
        out_dir = trainer.log_dir or trainer.default_root_dir
        if self.plot:
            self._write_timeline(out_dir, trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def _release(self) -> None:
        """Hand the model back as it was given; the layers, events and history stay readable."""
        if self.engine is not None:
            self.engine.release()

    def state_dict(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:  # a checkpoint saved outside fit (trainer.validate/test) has nothing of ours
            return {}
        return {
            "kind": _STATE_KIND,
            "callback": type(self).__name__,
            "layers": [layer.name for layer in self.layers],
            "frozen": [layer.name for layer in self.layers if engine.is_frozen(layer.name)],
            "events": list(self.events),
            "history": self.history,
            "frozen_at_start": list(self._frozen_at_start),
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        engine = self._require_engine()
        saved = list(state_dict["layers"])
        names = [layer.name for layer in self.layers]
        if saved != names:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was saved with layers {saved}, but this run selects "
                f"{names}. Resume with the same `layers` setting and model."
            )
        frozen = set(state_dict["frozen"])
        engine.thaw([n for n in names if n not in frozen])
        engine.freeze([n for n in names if n in frozen])
        self.events = list(state_dict.get("events", []))
        self._frozen_at_start = list(state_dict.get("frozen_at_start", self._frozen_at_start))
        self.history = state_dict.get("history", {"step": [], "lr": {}})
        self.load_extra_state(state_dict)

    # ------------------------------------------------------------------ for subclasses
    def transition(
        self,
        trainer: pl.Trainer,
        freeze: Iterable[str] = (),
        thaw: Iterable[str] = (),
        lr: float | dict[str, float] | None = None,
        reason: str = "",
    ) -> list[str]:
        """Freeze and thaw layers now, on every rank alike; ``lr`` sets the thawed groups' base LR.

        Returns the names whose state changed.
        """
        engine = self._require_engine()
        frozen_now = engine.freeze(freeze)
        thawed_now = engine.thaw(thaw)
        if lr is not None and engine.optimizer is not None:
            schedulers = self._schedulers(trainer)
            for name in thawed_now:
                value = lr[name] if isinstance(lr, dict) else lr
                for index in engine.group_indices(name):
                    optim.set_base_lr(engine.optimizer, schedulers, index, value)
        changed = frozen_now + thawed_now
        if changed:
            _rewrap_ddp(trainer)
            step, epoch = trainer.global_step, trainer.current_epoch
            for name, action in [(n, "freeze") for n in frozen_now] + [(n, "thaw") for n in thawed_now]:
                self.events.append(
                    {"step": step, "epoch": epoch, "layer": name, "action": action, "reason": reason}
                )
            self._record(step)
            parts = [
                f"froze {frozen_now}" if frozen_now else "",
                f"thawed {thawed_now}" if thawed_now else "",
            ]
            why = f" ({reason})" if reason else ""
            rank_zero_info(
                f"{type(self).__name__}: {' and '.join(p for p in parts if p)} at step {step}, epoch {epoch}{why}"
            )
        return changed

    def effective_lr(self, name: str, step: int) -> float:
        """The LR layer ``name`` trains with at optimizer step ``step`` (what the timeline records)."""
        return self.group_lr(name)

    def group_lr(self, name: str) -> float:
        """The LR of layer ``name``'s (first) param group."""
        engine = self._require_engine()
        assert engine.optimizer is not None
        return optim.current_lr(engine.optimizer, engine.group_indices(name)[0])

    # ------------------------------------------------------------------ internals
    def _warn_if_after_the_fit(
        self, trainer: pl.Trainer, epoch: int | None, step: int | None, what: str
    ) -> None:
        """One warning when ``what`` is set for an epoch or a step that this fit never reaches."""
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        total = trainer.estimated_stepping_batches
        late = []
        if epoch is not None and max_epochs is not None and epoch >= max_epochs:
            late.append(f"epoch {epoch} (the fit ends after epoch {max_epochs - 1}: max_epochs={max_epochs})")
        if step is not None and math.isfinite(total) and step >= total:
            late.append(f"step {step} (the fit takes {int(total)} optimizer steps)")
        if late:
            rank_zero_warn(
                f"{type(self).__name__}: {what} at {' and '.join(late)}, so it never happens in this fit. Lower it, "
                "or train longer."
            )

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """What ``auto`` and the order check run the model on: ``example_input_array``, else a batch of the
        first samples of the training data (None if neither is at hand)."""
        specs = [self.layer_spec] if isinstance(self.layer_spec, str) else self.layer_spec
        wanted = self.ordered_layers or any(s.strip().startswith("auto") for s in specs)
        if not wanted:
            return None
        if getattr(pl_module, "example_input_array", None) is not None:
            return pl_module.example_input_array
        return example_batch(trainer)

    def _require_engine(self) -> FreezeEngine:
        if self.engine is None:
            raise RuntimeError(f"{type(self).__name__} is used before Trainer.fit set it up")
        return self.engine

    @staticmethod
    def _schedulers(trainer: pl.Trainer) -> list[object]:
        return [config.scheduler for config in trainer.lr_scheduler_configs]

    def _stats(self, pl_module: pl.LightningModule) -> dict[str, float]:
        trainable, total = trainable_counts(pl_module)
        engine = self._require_engine()
        return {
            "freeze/trainable_fraction": trainable / max(total, 1),
            "freeze/frozen_layers": float(len(engine.frozen)),
        }

    def _record(self, step: int) -> None:
        engine = self._require_engine()
        if engine.optimizer is None:
            return
        if self.history["step"] and self.history["step"][-1] == step:
            for series in self.history["lr"].values():
                series.pop()
            self.history["step"].pop()
        self.history["step"].append(step)
        for layer in self.layers:
            lr = None if engine.is_frozen(layer.name) else self.effective_lr(layer.name, step)
            self.history["lr"].setdefault(layer.name, []).append(lr)

    def timeline(self, end_step: int) -> dict[str, Any]:
        """What the freeze-timeline plot shows: layers, frozen spans (as events), LR history."""
        return {
            "callback": type(self).__name__,
            "layers": [layer.name for layer in self.layers],
            "initially_frozen": list(self._frozen_at_start),
            "end_step": end_step,
            "history": self.history,
            "events": self.events,
        }

    @rank_zero_only
    def _write_timeline(self, out_dir: str, end_step: int) -> None:
        from lightning_freeze.callbacks.timeline import plot_timeline

        os.makedirs(out_dir, exist_ok=True)
        data = self.timeline(end_step)
        with open(os.path.join(out_dir, "freeze_timeline.json"), "w") as fh:
            json.dump(data, fh)
        path = plot_timeline(data, os.path.join(out_dir, "freeze_timeline.png"))
        if path:
            rank_zero_info(f"{type(self).__name__}: freeze timeline written to {path}")


def example_batch(trainer: pl.Trainer) -> Any:
    """A batch of the first samples of the training data, or None.

    Built from the train loader's dataset and ``collate_fn`` by index, never by iterating the loader: no
    sampler, generator or worker is touched, and the random generators are restored afterwards (a
    dataset that augments draws from them), so the data order and an exact resume are as without it.
    An ``IterableDataset`` has no first samples to read this way: None.
    """
    loader = _first_loader(_train_loaders(trainer))
    dataset = getattr(loader, "dataset", None)
    if loader is None or dataset is None or isinstance(dataset, IterableDataset):
        return None
    try:
        size = min(len(dataset), _EXAMPLE_SAMPLES)
    except TypeError:
        return None
    if size == 0:
        return None
    with preserved_rng():
        if getattr(loader, "batch_size", None) is None and getattr(loader, "batch_sampler", None) is None:
            return loader.collate_fn(dataset[0])  # automatic batching off: items are batches
        return loader.collate_fn([dataset[i] for i in range(size)])


def _train_loaders(trainer: pl.Trainer) -> Any:
    # Where Lightning keeps what fit() was given: a loader, or the datamodule / model with a train_dataloader
    # hook. Before the fit loop sets up its data (it has not at setup) this is the only handle on it.
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    instance = getattr(source, "instance", None)
    if instance is None:
        instance = trainer.datamodule
    if isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
        try:
            return instance.train_dataloader()
        except Exception:  # noqa: BLE001 - no loader yet (or not implemented): no example
            return None
    return instance


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, DataLoader):
        return loaders
    for attr in ("iterables", "flattened"):  # CombinedLoader
        if hasattr(loaders, attr):
            return _first_loader(getattr(loaders, attr))
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = _first_loader(item)
            if found is not None:
                return found
    return None


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the model in a new DistributedDataParallel that covers exactly the trainable parameters."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return
    old = strategy.model
    if not isinstance(old, torch.nn.parallel.DistributedDataParallel):
        return
    # The old reducer's autograd hooks would otherwise still fire and wait for buckets that never fill.
    del old.reducer
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()
