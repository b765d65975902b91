"""ProgressiveUnfreezing: ULMFiT's gradual unfreezing with discriminative learning rates.

The schedule itself (which layers thaw when, the LR of each) is pure logic in
:mod:`lightning_freeze.rules.thawing`; this module applies it from Lightning hooks:

- time-triggered thaws (``every_n_epochs``, ``every_n_steps``, phases with ``at_epoch`` / ``at_step``) are
  applied at the first ``on_train_batch_start`` / ``on_train_epoch_start`` at or after their time, so a
  resumed run applies exactly the thaws an uninterrupted one would;
- metric-driven thaws are *decided* in ``on_validation_end`` (on rank 0's value of the metric, broadcast
  to every rank, so all ranks decide alike) and *applied* at the next training batch, when the model is
  back in training mode (thawing in the middle of Lightning's eval/train toggling would leave the
  thawed modules in eval mode);
- a thawed layer's warm-up multiplier is applied only around ``optimizer.step()`` (``optim.StepScale``),
  so chainable schedulers that read ``group["lr"]`` never see it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_freeze.callbacks.base import FreezingCallback, LayerSpec, NormMode
from lightning_freeze.engine import optim
from lightning_freeze.engine.adapters import trainable_report
from lightning_freeze.engine.freezing import FreezeEngine, untrainable_layers
from lightning_freeze.engine.layers import Layer, LayerSpecError, layers_within
from lightning_freeze.rules import thawing
from lightning_freeze.rules.thawing import Phase, PhaseError, PlateauTracker, ThawSchedule
from lightning_freeze.validation import check_bool, check_int, check_number, check_str


class ProgressiveUnfreezing(FreezingCallback):
    """Train the head first, then thaw the layers below it from the top down, each at a smaller LR.

    At fit start every managed layer but the last one (the head) is frozen. Then one layer (or
    ``groups_per_step``) thaws every ``every_n_epochs`` epochs, or every ``every_n_steps`` steps, or
    whenever ``monitor`` has not improved for ``patience`` validations, or as an explicit list of
    ``phases`` (``[{layers: "backbone.2", at_epoch: 1, lr: 1e-3}, ...]``; keys ``layers``, ``at_epoch`` |
    ``at_step`` (none with ``monitor``), ``lr`` | ``lr_ratio``; layers no phase names train from the start).

    Learning rates can be discriminative: the layer ``k`` places below the head gets base LR
    ``head_lr / lr_decay**k`` (``head_lr``: the head group's LR from ``configure_optimizers`` unless given);
    any LR scheduler keeps applying its current factor to it. The default ``lr_decay=1`` gives every thawed
    layer the head's LR: on the transfer benchmark (``benchmarks/comparisons/transfer.py``, 7 seeds) it ended
    7 points (1-D ResNet) and 10 points (BERT) above ULMFiT's ``lr_decay=2.6`` at about the same time. Pass
    ``lr_decay=2.6`` (or ``freeze=ulmfit`` in the app) for ULMFiT's discriminative fine-tuning. A thawed
    layer can warm up linearly over ``warmup_steps`` optimizer steps, or ramp by ``lr_growth`` per epoch up
    to its target (Lightning's ``BackboneFinetuning``). With ``restore_best=True`` (needs ``monitor``), the weights of
    the best validation of the finished phase are loaded before the next phase thaws (weights and
    buffers only: the optimizer state carries on).

    Args:
        layers: the managed layers in forward order, the head last: a glob on module names,
            ``"re:<regex>"``, ``"auto"`` (the model's blocks), or a list of them.
        every_n_epochs: thaw the next ``groups_per_step`` layers every this many epochs (the default trigger).
        lr_decay: each layer below the head trains at ``1 / lr_decay`` of the LR of the layer above it (1: every
            layer at the head's LR; ULMFiT uses 2.6).
        every_n_steps: thaw every this many optimizer steps instead of by epoch.
        groups_per_step: how many layers thaw at each automatic thaw.
        phases: an explicit schedule instead of the automatic one: a list of mappings with ``layers`` (a
            layer spec), ``at_epoch`` or ``at_step`` (neither with ``monitor``), and ``lr`` or ``lr_ratio``.
        monitor: a validation metric; the next phase thaws when it has not improved for ``patience``
            validations (needs a validation loop).
        patience: validations without improvement of ``monitor`` before the next thaw.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is an improvement.
        min_delta: the smallest change of ``monitor`` that counts as an improvement.
        restore_best: before each metric-driven thaw, load the weights of the finished phase's best validation.
        warmup_steps: a thawed layer's LR ramps linearly from ``1/warmup_steps`` of its target over this many
            optimizer steps (0: none).
        lr_growth: a thawed layer's LR is multiplied by this every epoch until it reaches its target (None:
            none), as in ``BackboneFinetuning``.
        head_lr: the head's base LR that the discriminative LRs are derived from (None: the head group's LR
            in your optimizer).
        norm: ``"eval"`` keeps the frozen layers' norm statistics and affine weights fixed; ``"train"`` lets
            norm layers train.
        plot: write the freeze timeline (JSON and PNG) to each logger's folder at the end of fit and log it
            to loggers that take images.

    The head trains alone in epoch 0; one backbone block thaws per epoch from the top, here with ULMFiT's
    discriminative LRs, each block at 1/2.6 of the LR of the block above it:

    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> unfreeze = ProgressiveUnfreezing(["backbone.*", "head"], every_n_epochs=1, lr_decay=2.6)
    >>> example_trainer(max_epochs=3, callbacks=[unfreeze]).fit(DigitsClassifier(pretrained=False), example_loader())
    >>> [(e["layer"], e["epoch"]) for e in unfreeze.events]
    [('backbone.2', 1), ('backbone.1', 2)]
    >>> lr = {name: series[-1] for name, series in unfreeze.history.lr.items()}
    >>> round(lr["backbone.2"] / lr["head"], 3), round(lr["backbone.1"] / lr["head"], 3), lr["backbone.0"]
    (0.385, 0.148, None)

    Metric-driven instead, restoring the phase's best weights before each thaw::

        ProgressiveUnfreezing(["backbone.*", "head"], monitor="val/loss", patience=2, restore_best=True)
    """

    ordered_layers = True
    monitor_purpose = "thaws at validation plateaus"
    monitor_alternative = "thaw on a schedule: every_n_epochs / every_n_steps / phases"

    def __init__(
        self,
        layers: LayerSpec = "auto",
        every_n_epochs: int | None = 1,
        lr_decay: float = 1.0,
        *,
        every_n_steps: int | None = None,
        groups_per_step: int = 1,
        phases: Any = None,
        monitor: str | None = None,
        patience: int = 1,
        mode: str = "min",
        min_delta: float = 0.0,
        restore_best: bool = False,
        warmup_steps: int = 0,
        lr_growth: float | None = None,
        head_lr: float | None = None,
        norm: NormMode = "eval",
        plot: bool = False,
    ) -> None:
        super().__init__(layers=layers, norm=norm, plot=plot)
        where = type(self).__name__
        self.lr_decay = check_number(
            lr_decay, "lr_decay", low=0, low_open=True, where=where, hint="ULMFiT uses 2.6"
        )
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0, where=where)
        self.lr_growth = check_number(
            lr_growth, "lr_growth", low=0, low_open=True, allow_none=True, where=where
        )
        self.head_lr = check_number(head_lr, "head_lr", low=0, low_open=True, allow_none=True, where=where)
        self.monitor = check_str(monitor, "monitor", allow_none=True, where=where)
        self.restore_best = check_bool(restore_best, "restore_best", where=where)
        if self.restore_best and self.monitor is None:
            raise ValueError(f"{where}: restore_best=True needs monitor=... (the metric that defines 'best')")
        self.every_n_epochs = check_int(
            every_n_epochs, "every_n_epochs", minimum=1, allow_none=True, where=where, error=PhaseError
        )
        self.every_n_steps = check_int(
            every_n_steps, "every_n_steps", minimum=1, allow_none=True, where=where, error=PhaseError
        )
        self.groups_per_step = check_int(
            groups_per_step, "groups_per_step", minimum=1, where=where, error=PhaseError
        )
        try:
            self.phases = None if phases is None else thawing.parse_phases(phases, self.monitor)
            thawing.check_triggers(
                every_n_epochs=self.every_n_epochs,
                every_n_steps=self.every_n_steps,
                groups_per_step=self.groups_per_step,
                phases=self.phases,
                monitor=self.monitor,
            )
            self.tracker = PlateauTracker(mode=mode, patience=patience, min_delta=min_delta)
        except PhaseError as err:
            raise PhaseError(f"{where}: {err}") from None
        self.thaw_schedule: ThawSchedule | None = None
        self._step_scale: optim.StepScale | None = None
        self._reset_run_state()

    # ------------------------------------------------------------------ run state
    def _reset_run_state(self) -> None:
        self._done: set[int] = set()
        self._pending: list[int] = []
        self._thawed_at: dict[str, tuple[int, int]] = {}  # layer -> (global step, epoch) of its thaw
        self._start_lr: dict[str, float] = {}
        self._cap_lr: dict[str, float] = {}
        self._head_lr_value: float | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._next_epoch: int | None = (
            None  # the earliest epoch / step at which a time-triggered phase is due
        )
        self._next_step: int | None = None
        self._warm_until = 0  # the step from which no thawed layer warms up any more
        self.tracker.reset()

    # ------------------------------------------------------------------ FreezingCallback interface
    @override
    def prepare(self, trainer: pl.Trainer, layers: list[Layer]) -> None:
        names = [layer.name for layer in layers]
        where = type(self).__name__
        if self.phases is None:
            # Layers below the head with nothing trainable (peft's base model around blocks without an adapter)
            # stay frozen and take no place in the schedule: every step of it thaws something.
            idle = set(untrainable_layers(layers[:-1]))
            names = [name for name in names if name not in idle]
        try:
            phases = None
            if self.phases is not None:
                phases = [
                    dataclasses.replace(
                        phase,
                        layers=tuple(
                            layers_within(trainer.lightning_module, list(phase.spec), layers, f"phase {i}")
                        ),
                    )
                    for i, phase in enumerate(self.phases)
                ]
            self.thaw_schedule = thawing.build_thaw_schedule(
                names,
                every_n_epochs=self.every_n_epochs,
                every_n_steps=self.every_n_steps,
                groups_per_step=self.groups_per_step,
                phases=phases,
                monitor=self.monitor,
            )
        except (PhaseError, LayerSpecError) as err:
            raise PhaseError(f"{where}: {err}") from None
        self._reset_run_state()
        managed = {id(p) for layer in layers for p in layer.params}
        initial = set(self.thaw_schedule.initial)
        trains = any(
            p.requires_grad for layer in layers if layer.name in initial for p in layer.params
        ) or any(p.requires_grad and id(p) not in managed for p in trainer.lightning_module.parameters())
        if not trains:
            raise PhaseError(
                f"{where}: nothing would train before the first thaw ({self.thaw_schedule.describe()}); "
                "leave at least one layer (usually the head) out of the phases, or give it at_epoch: 0. "
                f"At the start, {trainable_report(trainer.lightning_module, layers)}."
            )

    @override
    def initially_frozen(self, layers: list[Layer]) -> list[str]:
        return self._require_schedule().initially_frozen

    @override
    def on_optimizer_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._require_engine()
        schedule = self._require_schedule()
        optimizer = engine.optimizer
        assert optimizer is not None
        schedulers = self._schedulers(trainer)
        if self._head_lr_value is None:  # not restored from a checkpoint
            head = schedule.layers[-1]
            self._head_lr_value = self.head_lr or optim.base_lr(
                optimizer, schedulers, engine.group_indices(head)[0]
            )
        for name in schedule.initial:
            lr = self._target(name, schedule.phase_of(name))
            for index in engine.group_indices(name):
                optim.set_base_lr(optimizer, schedulers, index, lr)
        self._remove_step_scale()
        if self.warmup_steps > 0:
            self._step_scale = optim.StepScale(optimizer)

    @override
    def lr_moves(self, trainer: pl.Trainer) -> bool:
        # A warm-up moves the effective LR every step, a growth every epoch.
        return super().lr_moves(trainer) or self.warmup_steps > 0 or self.lr_growth is not None

    @override
    def extra_state(self) -> dict[str, Any]:
        schedule = self._require_schedule()
        return {
            "unfreezing": {
                "plan": schedule.describe(),
                "done": sorted(self._done),
                "pending": list(self._pending),
                "thawed_at": {k: list(v) for k, v in self._thawed_at.items()},
                "start_lr": dict(self._start_lr),
                "cap_lr": dict(self._cap_lr),
                "head_lr": self._head_lr_value,
                "tracker": self.tracker.state_dict(),
                "best_weights": self._best_weights,
            }
        }

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        schedule = self._require_schedule()
        saved = state.get("unfreezing")
        if saved is None:
            raise ValueError(f"{type(self).__name__}: the checkpoint holds no progressive-unfreezing state")
        if saved["plan"] != schedule.describe():
            raise PhaseError(
                f"{type(self).__name__}: the checkpoint was saved with the thaw schedule {saved['plan']}, but this "
                f"run plans {schedule.describe()}. Resume with the same settings."
            )
        self._done = set(saved["done"])
        self._pending = list(saved["pending"])
        self._thawed_at = {k: (int(v[0]), int(v[1])) for k, v in saved["thawed_at"].items()}
        self._start_lr = dict(saved["start_lr"])
        self._cap_lr = dict(saved["cap_lr"])
        self._head_lr_value = saved["head_lr"]
        self.tracker.load_state_dict(saved["tracker"])
        self._best_weights = saved["best_weights"]

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        schedule = self._require_schedule()
        self._find_next_due()
        for phase in schedule.phases:
            if phase.trigger != "monitor" and phase.is_due(trainer.current_epoch, trainer.global_step):
                continue  # already thawed (a resumed run) or thawing now
            self._warn_if_after_the_fit(trainer, phase.at_epoch, phase.at_step, f"{list(phase.layers)} thaw")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_due(trainer, pl_module)
        self._apply_growth(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Between thaws this is three comparisons: the next due epoch and step are known in advance.
        if (
            self._pending
            or (self._next_step is not None and trainer.global_step >= self._next_step)
            or (self._next_epoch is not None and trainer.current_epoch >= self._next_epoch)
        ):
            self._apply_due(trainer, pl_module)
        if self._step_scale is not None and (
            self._step_scale.factors or trainer.global_step < self._warm_until
        ):
            self._set_warmup(trainer)

    @override
    def needs_monitored_value(self) -> bool:
        # Every phase has thawed or is about to: nothing left to decide.
        schedule = self.thaw_schedule
        return (
            schedule is not None and schedule.next_monitor_phase(self._done | set(self._pending)) is not None
        )

    @override
    def on_monitored_value(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> None:
        schedule = self._require_schedule()
        waiting = self._done | set(self._pending)
        improved, plateaued = self.tracker.update(value)
        if improved and self.restore_best:
            self._best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
            }
        if plateaued:
            nxt = schedule.next_monitor_phase(waiting)
            if nxt is not None:
                self._pending.append(nxt)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove_step_scale()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ transitions
    def _apply_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule = self._require_schedule()
        due = schedule.due(trainer.current_epoch, trainer.global_step, self._done) + self._pending
        for index in sorted(set(due)):
            self._thaw_phase(trainer, pl_module, index)
        self._pending = []
        self._find_next_due()

    def _find_next_due(self) -> None:
        """The earliest epoch and step at which a time-triggered phase not applied yet is due."""
        waiting = [p for i, p in enumerate(self._require_schedule().phases) if i not in self._done]
        self._next_epoch = min((p.at_epoch for p in waiting if p.at_epoch is not None), default=None)
        self._next_step = min((p.at_step for p in waiting if p.at_step is not None), default=None)
        self._warm_until = max((step + self.warmup_steps for step, _ in self._thawed_at.values()), default=0)

    def _thaw_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        phase = self._require_schedule().phases[index]
        reason = {
            "epoch": f"at_epoch={phase.at_epoch}",
            "step": f"at_step={phase.at_step}",
            "monitor": f"{self.monitor} plateaued for {self.tracker.patience} validation(s)",
        }[phase.trigger]
        if phase.trigger == "monitor" and self.restore_best and self._best_weights is not None:
            pl_module.load_state_dict(self._best_weights)
            reason += f", restored the phase's best weights ({self.monitor}={self.tracker.best:.6g})"
        lrs = {}
        for name in phase.layers:
            cap = self._target(name, None)
            start = self._target(name, phase)  # the phase's lr / lr_ratio, else the discriminative LR
            self._start_lr[name], self._cap_lr[name] = start, max(cap, start)
            lrs[name] = start
        thawed = self.transition(trainer, thaw=phase.layers, lr=lrs, reason=reason)
        for name in thawed:
            self._thawed_at[name] = (trainer.global_step, trainer.current_epoch)
        if thawed and self.warmup_steps:
            self._record(trainer.global_step)  # again, now that the warm-up of the thawed layers is known
        self._done.add(index)
        if phase.trigger == "monitor":
            self.tracker.reset()
            self._best_weights = None

    def _target(self, name: str, phase: Phase | None) -> float:
        assert self._head_lr_value is not None
        return thawing.target_lr(self._require_schedule(), name, self._head_lr_value, self.lr_decay, phase)

    def _apply_growth(self, trainer: pl.Trainer) -> None:
        if self.lr_growth is None or not self._thawed_at:
            return
        engine = self._require_engine()
        if engine.optimizer is None:
            return
        schedulers = self._schedulers(trainer)
        for name, (_, epoch) in self._thawed_at.items():
            lr = thawing.growth_factor(
                trainer.current_epoch - epoch, self.lr_growth, self._start_lr[name], self._cap_lr[name]
            )
            for index in engine.group_indices(name):
                optim.set_base_lr(engine.optimizer, schedulers, index, lr)

    # ------------------------------------------------------------------ warm-up around optimizer.step()
    def _set_warmup(self, trainer: pl.Trainer) -> None:
        if self._step_scale is None:
            return
        engine = self._require_engine()
        factors = {}
        for name, (step, _) in self._thawed_at.items():
            factor = thawing.warmup_factor(trainer.global_step - step, self.warmup_steps)
            if factor < 1.0:
                factors.update(dict.fromkeys(engine.group_indices(name), factor))
        self._step_scale.factors = factors

    @override
    def effective_lr(self, name: str, step: int) -> float:
        return self.group_lr(name) * self.warmup_factor(name, step)

    def warmup_factor(self, name: str, global_step: int) -> float:
        """The multiplier the layer's LR gets at the optimizer step ``global_step`` (1 outside its warm-up)."""
        if name not in self._thawed_at:
            return 1.0
        return thawing.warmup_factor(global_step - self._thawed_at[name][0], self.warmup_steps)

    def _remove_step_scale(self) -> None:
        if self._step_scale is not None:
            self._step_scale.remove()
            self._step_scale = None

    # ------------------------------------------------------------------ logging
    @override
    def _extra_stats(self, engine: FreezeEngine) -> dict[str, float]:
        return {"freeze/thawed_groups": float(len(engine.layers) - len(engine.frozen))}

    def _require_schedule(self) -> ThawSchedule:
        if self.thaw_schedule is None:
            raise RuntimeError(f"{type(self).__name__} is used before Trainer.fit set it up")
        return self.thaw_schedule


__all__ = ["PhaseError", "ProgressiveUnfreezing"]
