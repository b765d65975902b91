"""Shared base of the freezing callbacks: layers + engine, resume, DDP sync, logging, timeline.

A subclass decides *when* layers freeze or thaw and calls :meth:`FreezingCallback.transition`; this
class does the rest in the same way for every callback:

- ``setup``: resolve the layers (``auto`` runs the model once on the first samples of the training
  data, see :mod:`lightning_freeze.engine.example`) and freeze the ones the subclass starts frozen, before DDP wraps the
  model, so DDP never registers them and needs no ``find_unused_parameters``;
- ``load_state_dict`` (resume): put every layer back in the state it had when the checkpoint was saved,
  also before DDP wraps the model;
- ``on_fit_start``: split the user's optimizer into per-layer named groups and adapt its schedulers,
  before Lightning restores the optimizer and scheduler state, so the saved groups line up;
- ``on_train_start``: keep frozen layers in eval mode from here on (after Lightning's check for modules
  left in eval mode);
- on every transition under DDP: wrap the model in a fresh ``DistributedDataParallel``, so newly thawed
  parameters are all-reduced and frozen ones cost no communication;
- ``on_validation_end``: with a ``monitor``, the monitored value (rank 0's, broadcast, so every rank decides
  alike) goes to :meth:`FreezingCallback.on_monitored_value`;
- ``on_train_end``: with ``plot=True``, the timeline goes to every logger's folder and every logger that
  takes images;
- ``teardown`` and ``on_exception``: hand the model back as it was given (``requires_grad``, modes), so
  a second fit with a new Trainer, or a retry after a failure, starts clean.

A step where nothing changes costs a few counter checks here: the LR history is recorded at transitions, and
sampled (at most ``_MAX_HISTORY_POINTS`` points per fit) only while something moves the LRs (a scheduler,
FreezeOut); the logged trainable counts change only at a transition, so they are computed there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_freeze.callbacks.records import Action, Event, LrHistory
from lightning_freeze.callbacks.resume import ensure_exact_resume
from lightning_freeze.engine import optim
from lightning_freeze.engine.adapters import trainable_report
from lightning_freeze.engine.example import example_input
from lightning_freeze.engine.freezing import NORM_MODES, FreezeEngine, trainable_counts
from lightning_freeze.engine.layers import Layer, check_forward_order, resolve_layers
from lightning_freeze.engine.sharding import (
    before_checkpoint_load,
    check_supported_strategy,
    is_sharded,
    layers_on_flat_params,
    saved_callback_state,
    strategy_kind,
)
from lightning_freeze.validation import FreezeWarning, check_bool, check_choice, check_layer_spec

LayerSpec = str | Sequence[str]
NormMode = Literal["eval", "train"]
_MAX_HISTORY_POINTS = 200
_STATE_KIND = "lightning_freeze.FreezingCallback"


class FreezingCallback(Callback):
    """Base class of the freezing callbacks: owns the layers, the engine and everything they share.

    A subclass decides *when* layers change and calls :meth:`transition`; it may override :meth:`prepare`,
    :meth:`initially_frozen`, :meth:`on_optimizer_attached`, :meth:`extra_state` / :meth:`load_extra_state`
    and, with a ``monitor``, :meth:`needs_monitored_value` / :meth:`on_monitored_value`.

    Args:
        layers: the layers to manage: a glob on module names (``"backbone.*"``), a regex written
            ``"re:..."``, ``"auto"`` (the parameter-owning blocks in forward order, sliceable: ``"auto[:-1]"``),
            or a list of them.
        norm: ``"eval"`` keeps the norm layers of frozen layers fixed (statistics and affine weights);
            ``"train"`` lets them train, like fastai's ``train_bn``.
        plot: write ``freeze_timeline.json`` and ``freeze_timeline.png`` (frozen spans, LR per group) to every
            logger's folder at the end of fit, and log the image to every logger that takes images.
    """

    #: whether the order of the managed layers means something (the head last, freeze order): checked
    #: against the forward order when an example batch is at hand.
    ordered_layers: ClassVar[bool] = False
    #: for the error when a ``monitor`` is set and the fit runs no validation: what the value is used for,
    #: and what to do instead.
    monitor_purpose: ClassVar[str] = "is read after each validation"
    monitor_alternative: ClassVar[str] = "set monitor=None"

    def __init__(self, layers: LayerSpec = "auto", norm: NormMode = "eval", plot: bool = False) -> None:
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
        self.monitor: str | None = None
        self.engine: FreezeEngine | None = None
        self.layers: list[Layer] = []
        self.events: list[Event] = []
        self.history = LrHistory()
        self._frozen_at_start: list[str] = []
        self._state_key: str | None = None
        self._record_every = 0  # sample the LR history every this many steps (0: only at transitions)
        self._log_every = 1
        self._other_groups: list[
            tuple[int, str]
        ] = []  # param groups outside the managed layers: (index, name)
        self._logged_stats: dict[str, float] = {}
        self._resolve_at_fit_start = False
        self._flat_params = False
        self._undo_load_hook: Callable[[], None] = lambda: None

    @property
    @override
    def state_key(self) -> str:
        # Keyed by the layer spec, so that two callbacks of one kind reach our own message in setup instead of
        # Lightning's generic "more than one stateful callback" error. Built once: Lightning reads it around
        # every hook call.
        if self._state_key is None:
            self._state_key = self._generate_state_key(layers=self.layer_spec)
        return self._state_key

    # ------------------------------------------------------------------ what subclasses decide
    def prepare(self, trainer: pl.Trainer, layers: list[Layer]) -> None:
        """Build what the subclass needs from the resolved layers, and raise a clear error for settings
        that cannot work with them (called at setup, before anything is frozen)."""

    def initially_frozen(self, layers: list[Layer]) -> list[str]:
        """Names of the layers frozen before the first step."""
        return []

    def extra_state(self) -> dict[str, Any]:
        """The subclass's own checkpoint state (plain containers and tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved (``state`` is the whole callback state)."""

    def on_optimizer_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at fit start once the optimizer is split into per-layer groups."""

    def lr_moves(self, trainer: pl.Trainer) -> bool:
        """Whether a group's LR may change between transitions (then the LR history is sampled every few
        steps; else it is recorded at the start, at each transition and at the end only)."""
        return bool(self._schedulers(trainer))

    def needs_monitored_value(self) -> bool:
        """Whether the value of ``monitor`` is still needed after this validation (False: not even read)."""
        return True

    def on_monitored_value(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> None:
        """Act on ``monitor``'s value after a validation of the fit (rank 0's value, the same on every rank)."""

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        self._refuse_other_freezing_callbacks(trainer)
        self._release()  # a previous fit of this callback object that never reached teardown
        ensure_exact_resume(trainer)  # freeze state alone does not replay a run: RNG and loader position too
        check_supported_strategy(trainer.strategy, name)
        # FSDP2 replaces every parameter in configure_model (after this hook), and modules may only exist from
        # there on: its layers are resolved at fit start, on the sharded model.
        kind = strategy_kind(trainer.strategy)
        self._resolve_at_fit_start = kind == "fsdp2"
        # FSDP1 with flat parameters (use_orig_params=False) flattens at its wrap, after this hook, and needs one
        # requires_grad per flat parameter: the layers are read now, frozen once the units are known (fit start).
        self._flat_params = kind == "fsdp1" and not getattr(trainer.strategy, "kwargs", {}).get(
            "use_orig_params", True
        )
        if not self._resolve_at_fit_start:
            self._resolve_layers(trainer, pl_module, start_engine=not self._flat_params)

    def _resolve_layers(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, start_engine: bool = True
    ) -> None:
        """Resolve the layers on the model as it is now, and (``start_engine``) freeze the ones the subclass starts
        frozen."""
        name = type(self).__name__
        specs = [self.layer_spec] if isinstance(self.layer_spec, str) else self.layer_spec
        wants_example = self.ordered_layers or any(s.strip().startswith("auto") for s in specs)
        example = example_input(trainer, pl_module) if wants_example else None
        self.layers = resolve_layers(pl_module, self.layer_spec, example_input=example)
        if self.ordered_layers and example is not None:
            check_forward_order(pl_module, self.layers, example, self.layer_spec, name)
        self.prepare(trainer, self.layers)
        if start_engine:
            self._start_engine(trainer, pl_module)

    def _start_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        self.engine = FreezeEngine(
            pl_module,
            self.layers,
            norm=self.norm,
            owner=name,
            keep_frozen_in_groups=is_sharded(trainer.strategy),
        )
        self.events, self.history = [], LrHistory()
        self.engine.freeze(self.initially_frozen(self.layers))
        self._frozen_at_start = sorted(self.engine.frozen, key=[layer.name for layer in self.layers].index)
        self._update_stats()
        if self.engine.frozen and self._logged_stats["freeze/trainable_fraction"] == 0:
            self._release()
            raise ValueError(
                f"{name}: with layers={self.layer_spec!r} every parameter of the model is frozen at the start, so "
                "nothing would train (autograd fails on the first backward). Leave the head out of `layers` "
                f"(e.g. layers='backbone.*'). At the start, {trainable_report(pl_module, self.layers)}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resolve_at_fit_start:
            self._resolve_layers(trainer, pl_module)
        elif self._flat_params:
            self.layers = layers_on_flat_params(trainer.strategy.model, self.layers, type(self).__name__)
            self._start_engine(trainer, pl_module)
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
        layout = engine.attach(trainer.optimizers[0], self._schedulers(trainer))
        managed = {index for indices in layout.layer_groups.values() for index in indices}
        self._other_groups = [
            (index, str(group.get("name", index)))
            for index, group in enumerate(trainer.optimizers[0].param_groups)
            if index not in managed
        ]
        self.on_optimizer_attached(trainer, pl_module)
        if is_sharded(trainer.strategy) and trainer.strategy.restore_checkpoint_after_setup:
            # The strategy loads the optimizer state inside load_checkpoint, before load_state_dict gives us our
            # state back: the saved frozen set must be in place first, so the saved state lands on the params
            # that trained when it was saved.
            self._undo_load_hook = before_checkpoint_load(
                trainer.strategy, lambda path: self._apply_saved_frozen_set(trainer.strategy, path)
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning hands us our state only from the entry under our own state key; a checkpoint of another
        # freezing setup would fail later, in torch, on param groups that do not line up. Say so now.
        saved = checkpoint.get("callbacks", {})
        others = {
            k: v
            for k, v in saved.items()
            if k != self.state_key and isinstance(v, dict) and v.get("kind") == _STATE_KIND
        }
        if self.state_key in saved or not (others or checkpoint.get("optimizer_states")):
            return
        name = type(self).__name__
        same_kind = [v for v in others.values() if v.get("callback") == name]
        if same_kind:
            raise ValueError(
                f"{name}: the checkpoint was saved with layers={same_kind[0].get('layer_spec')!r} (layers "
                f"{same_kind[0].get('layers')}), but this run has layers={self.layer_spec!r}. Resume with the same "
                "`layers` setting and model."
            )
        kinds = sorted(str(v.get("callback")) for v in others.values())
        what = f"with {kinds}, not with {name}" if kinds else f"without {name} (no state of it)"
        raise ValueError(
            f"{name}: the checkpoint was saved {what}, so its optimizer holds other param groups. Resume with the "
            "freezing callback it was saved with, or start a new fit from its weights: "
            "model.load_state_dict(torch.load(path)['state_dict'])"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and not _has_validation(trainer, pl_module):
            raise ValueError(
                f"{type(self).__name__}: monitor={self.monitor!r} {self.monitor_purpose}, but this fit runs no "
                "validation (no val dataloader, no validation_step, or limit_val_batches=0). Give the fit a "
                f"validation loop, or {self.monitor_alternative}."
            )
        # Not in on_fit_start: asking for the step count there loads the train dataloader before Lightning
        # restores its state from the checkpoint, and a resumable loader would then restart its epoch.
        total = trainer.estimated_stepping_batches
        self._record_every = 0
        if self.lr_moves(trainer):  # else the LRs change only at transitions, which record themselves
            self._record_every = max(1, math.ceil(total / _MAX_HISTORY_POINTS)) if math.isfinite(total) else 1
        self._log_every = max(1, trainer.log_every_n_steps)
        self._require_engine().activate_modes()
        self._record(trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._record_every and step % self._record_every == 0:
            self._record(step)
        if step % self._log_every == 0:
            pl_module.log_dict(self._logged_stats, on_step=True, on_epoch=False, rank_zero_only=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.monitor is None
            or trainer.sanity_checking
            or trainer.state.fn != "fit"
            or self.engine is None
        ):
            return
        if not self.needs_monitored_value():
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}: monitor={self.monitor!r} was not logged during validation; logged "
                f"metrics are {sorted(trainer.callback_metrics)}. Log it with self.log({self.monitor!r}, ...) in "
                "validation_step"
            )
        # Every rank takes rank 0's value, so every rank reaches the same decision.
        value = float(trainer.strategy.broadcast(float(value), src=0))
        self.on_monitored_value(trainer, pl_module, value)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer.global_step)
        if self.plot:
            self._publish_timeline(trainer, trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def _release(self) -> None:
        """Hand the model back as it was given; the layers, events and history stay readable."""
        self._undo_load_hook()
        if self.engine is not None:
            self.engine.release()

    @override
    def state_dict(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:  # a checkpoint saved outside fit (trainer.validate/test) has nothing of ours
            return {}
        return {
            "kind": _STATE_KIND,
            "callback": type(self).__name__,
            "layer_spec": self.layer_spec,
            "layers": [layer.name for layer in self.layers],
            "frozen": [layer.name for layer in self.layers if engine.is_frozen(layer.name)],
            "events": [dict(event) for event in self.events],
            "history": self.history.to_state(),
            "frozen_at_start": list(self._frozen_at_start),
            **self.extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._require_engine()
        saved = list(state_dict["layers"])
        names = [layer.name for layer in self.layers]
        if saved != names:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was saved with layers {saved}, but this run selects "
                f"{names}. Resume with the same `layers` setting and model."
            )
        self._apply_frozen_set(state_dict)
        self.events = [Event(**event) for event in state_dict.get("events", [])]
        self._frozen_at_start = list(state_dict.get("frozen_at_start", self._frozen_at_start))
        self.history = LrHistory.from_state(state_dict.get("history"))
        self.load_extra_state(state_dict)

    def _apply_saved_frozen_set(self, strategy: object, path: str) -> None:
        saved = saved_callback_state(strategy, path, self.state_key)
        if (
            saved is not None
            and saved.get("kind") == _STATE_KIND
            and saved["layers"] == [layer.name for layer in self.layers]
        ):
            self._apply_frozen_set(saved)

    def _apply_frozen_set(self, state_dict: dict[str, Any]) -> None:
        engine = self._require_engine()
        frozen = set(state_dict["frozen"])
        names = [layer.name for layer in self.layers]
        engine.thaw([n for n in names if n not in frozen])
        engine.freeze([n for n in names if n in frozen])
        self._update_stats()

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

        Args:
            trainer: the running Trainer.
            freeze: names of managed layers to freeze (already frozen ones are left alone).
            thaw: names of managed layers to thaw.
            lr: the base LR of the thawed layers' groups: one value, or one per layer name (None: unchanged).
            reason: why, for the events, the log line and the timeline.

        Returns:
            The names whose state changed.
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
            self._update_stats()
            step, epoch = trainer.global_step, trainer.current_epoch
            actions: list[tuple[str, Action]] = [(n, "freeze") for n in frozen_now]
            actions += [(n, "thaw") for n in thawed_now]
            for name, action in actions:
                self.events.append(Event(step=step, epoch=epoch, layer=name, action=action, reason=reason))
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

    def timeline(self, end_step: int) -> dict[str, Any]:
        """What the freeze-timeline plot shows: layers, frozen spans (as events), LR history."""
        return {
            "callback": type(self).__name__,
            "layers": [layer.name for layer in self.layers],
            "initially_frozen": list(self._frozen_at_start),
            "end_step": end_step,
            "history": self.history.to_state(),
            "events": [dict(event) for event in self.events],
        }

    # ------------------------------------------------------------------ internals
    def _refuse_other_freezing_callbacks(self, trainer: pl.Trainer) -> None:
        name = type(self).__name__
        others = [cb for cb in trainer.callbacks if isinstance(cb, FreezingCallback) and cb is not self]
        if not others:
            return
        same = [cb for cb in others if type(cb) is type(self)]
        if same:
            specs = [self.layer_spec, *(cb.layer_spec for cb in same)]
            merged = [s for spec in specs for s in ([spec] if isinstance(spec, str) else spec)]
            raise ValueError(
                f"{len(same) + 1} {name} callbacks in one Trainer (layers={' and '.join(repr(s) for s in specs)}) "
                f"would manage the same model. Merge them into one: {name}(layers={merged!r}, ...); to thaw "
                "parts at different times, use ProgressiveUnfreezing(phases=[...])."
            )
        raise ValueError(
            f"{name} and {[type(cb).__name__ for cb in others]} would manage the same model; use one freezing "
            "callback per Trainer"
        )

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
                "or train longer.",
                category=FreezeWarning,
            )

    def _require_engine(self) -> FreezeEngine:
        if self.engine is None:
            raise RuntimeError(f"{type(self).__name__} is used before Trainer.fit set it up")
        return self.engine

    @staticmethod
    def _schedulers(trainer: pl.Trainer) -> list[object]:
        return [config.scheduler for config in trainer.lr_scheduler_configs]

    def _update_stats(self) -> None:
        """The logged statistics; they change only at a transition, so they are computed there."""
        engine = self._require_engine()
        trainable, total = trainable_counts(engine.model)
        self._logged_stats = {
            "freeze/trainable_fraction": trainable / max(total, 1),
            "freeze/frozen_layers": float(len(engine.frozen)),
            **self._extra_stats(engine),
        }

    def _extra_stats(self, engine: FreezeEngine) -> dict[str, float]:
        return {}

    def _record(self, step: int) -> None:
        engine = self.engine
        if engine is None or engine.optimizer is None:
            return
        lrs: dict[str, float | None] = {
            layer.name: None if engine.is_frozen(layer.name) else self.effective_lr(layer.name, step)
            for layer in self.layers
        }
        for index, name in self._other_groups:
            lrs[name] = optim.current_lr(engine.optimizer, index)
        self.history.record(step, lrs)

    @rank_zero_only
    def _publish_timeline(self, trainer: pl.Trainer, end_step: int) -> None:
        """The timeline's JSON and PNG in every logger's folder (no logger: the root dir), and the image in every
        logger that takes images."""
        from lightning_freeze.callbacks.timeline import (
            TIMELINE_NAME,
            figure_image,
            log_timeline_image,
            save_figure,
            timeline_figure,
        )

        data = self.timeline(end_step)
        figure = timeline_figure(data)
        for out_dir in _log_dirs(trainer):
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"{TIMELINE_NAME}.json"), "w") as fh:
                json.dump(data, fh)
            if figure is not None:
                path = os.path.join(out_dir, f"{TIMELINE_NAME}.png")
                save_figure(figure, path)
                rank_zero_info(f"{type(self).__name__}: freeze timeline written to {path}")
        if figure is not None:
            log_timeline_image(trainer.loggers, figure_image(figure), end_step)


def _log_dirs(trainer: pl.Trainer) -> list[str]:
    """Each logger's folder, once each (Lightning's ``trainer.log_dir`` is the first logger's only)."""
    dirs: list[str] = []
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder and str(folder) not in dirs:
            dirs.append(str(folder))
    return dirs or [trainer.default_root_dir]


def _has_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
        return False
    return bool(trainer.val_dataloaders is not None and sum(trainer.num_val_batches) > 0)


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
