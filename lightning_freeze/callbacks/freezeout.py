"""FreezeOut (Brock et al. 2017): a per-layer cosine learning rate that reaches zero at the layer's own
freeze time ``t_i``, after which the layer is frozen and leaves the backward pass.

The schedule math lives in :mod:`lightning_freeze.rules.freezeout`; this module is the Lightning glue.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_freeze.callbacks.base import FreezingCallback, LayerSpec, NormMode
from lightning_freeze.engine import optim
from lightning_freeze.engine.adapters import trainable_report
from lightning_freeze.engine.freezing import untrainable_layers
from lightning_freeze.engine.layers import Layer
from lightning_freeze.rules.freezeout import (
    GroupSchedule,
    ScheduleName,
    check_schedule,
    check_t0,
    freeze_step,
    freezeout_schedule,
    lr_factors,
    progress,
)
from lightning_freeze.validation import FreezeWarning, check_bool


class FreezeOut(FreezingCallback):
    """Anneal each layer's LR to zero at its own time ``t_i``, then freeze it (FreezeOut).

    The managed layers (``layers``, default ``"auto"``: the parameter-owning blocks in forward order)
    are the groups ``i = 0..L`` of the schedule, and the last group is the head, with ``t_L = 1``:

    - ``tau_i = t0 + (1 - t0) * i / L``; ``t_i`` is ``tau_i``, ``tau_i**2`` or ``tau_i**3`` for
      ``schedule`` = ``linear``, ``squared`` or ``cubic`` (``t0=0.8``, cubic: first layer at 0.512);
    - every optimizer step, group ``i`` gets ``lr = 0.5 * lr0_i * (1 + cos(pi * t / t_i))`` with
      ``t = global_step / trainer.estimated_stepping_batches``; ``lr0_i = base_lr / t_i`` when
      ``scale_lr`` (``base_lr``: the group's LR in your optimizer);
    - from ``t >= t_i`` on the layer is frozen: ``requires_grad=False``, no ``.grad``, optimizer state
      freed, norm/dropout in eval mode, and under DDP it no longer takes part in the all-reduce. Layers
      freeze in order, so the frozen part is always a prefix and the backward pass stops before it.

    Which group is the head: if some trainable parameters lie outside ``layers`` (say
    ``layers="backbone.*"``), they are the head (``i = L``) and every managed layer freezes; otherwise
    the last managed layer is the head. The head follows the same cosine to zero at ``t = 1`` and is
    never frozen early. FreezeOut *is* the LR schedule: an ``lr_scheduler`` returned by
    ``configure_optimizers`` is rejected at fit start (two schedules would fight over ``group["lr"]``).
    Weight decay, momentum, betas and the base LR come from your optimizer.

    Args:
        layers: the layers to freeze one after the other, in forward order: a glob on module names,
            ``"re:<regex>"``, ``"auto"`` (the model's blocks; the last one is the head), or a list of them.
        t0: when the first layer freezes, as a fraction of training in (0, 1], before the schedule's power.
        schedule: how the freeze times grow with depth: ``"linear"``, ``"squared"`` or ``"cubic"``.
        scale_lr: start layer ``i`` at ``base_lr / t_i``, so the layers that freeze early take larger steps.
        norm: ``"eval"`` keeps a frozen layer's norm statistics and affine weights fixed; ``"train"`` lets
            norm layers keep training.
        plot: write the freeze timeline (JSON and PNG: frozen spans and every group's LR) to each logger's
            folder at the end of fit and log it to loggers that take images.

    Three backbone blocks and the head (outside ``layers``: the last group) over 8 steps, ``t0=0.5``
    linear: the blocks freeze at t = 1/2, 2/3 and 5/6, i.e. before optimizer steps 4, 6 and 7:

    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> freezeout = FreezeOut("backbone.*", t0=0.5, schedule="linear")
    >>> example_trainer(max_epochs=2, callbacks=[freezeout]).fit(DigitsClassifier(pretrained=False), example_loader())
    >>> {name: round(t, 3) for name, t in freezeout.layer_times().items()}
    {'backbone.0': 0.5, 'backbone.1': 0.667, 'backbone.2': 0.833}
    >>> [(e["layer"], e["step"]) for e in freezeout.events]
    [('backbone.0', 4), ('backbone.1', 6), ('backbone.2', 7)]
    """

    ordered_layers = True

    def __init__(
        self,
        layers: LayerSpec = "auto",
        t0: float = 0.8,
        schedule: ScheduleName = "cubic",
        scale_lr: bool = True,
        norm: NormMode = "eval",
        plot: bool = False,
    ) -> None:
        super().__init__(layers=layers, norm=norm, plot=plot)
        self.t0 = check_t0(t0)
        self.schedule = check_schedule(schedule)
        self.scale_lr = check_bool(scale_lr, "scale_lr", where="FreezeOut")
        self.total_steps: int | None = None
        self.layer_schedules: dict[str, GroupSchedule] = {}  # managed layer -> its schedule
        self._head_schedule: GroupSchedule | None = None  # the groups outside the managed layers
        self._group_indices: list[int] = []  # every param group, and its schedule in the same position
        self._group_schedules: list[GroupSchedule] = []
        self._next_freeze_step: int | None = None  # the first step at which a layer still training is due
        self._lrs_set_for: int | None = None  # the optimizer step the groups' LRs are set for
        self._checkpoint_settings: dict[str, Any] | None = None

    # ------------------------------------------------------------------ schedule
    def layer_times(self) -> dict[str, float]:
        """Freeze time ``t_i`` of each managed layer (1.0: the head, never frozen early)."""
        return {name: s.t for name, s in self.layer_schedules.items()}

    def freeze_steps(self) -> dict[str, int | None]:
        """The optimizer step at which each managed layer freezes (None: never), for this fit's length."""
        assert self.total_steps is not None, "known once the fit has started"
        return {name: freeze_step(s.t, self.total_steps) for name, s in self.layer_schedules.items()}

    # ------------------------------------------------------------------ FreezingCallback hooks
    @override
    def prepare(self, trainer: pl.Trainer, layers: list[Layer]) -> None:
        model = trainer.lightning_module
        managed = {id(p) for layer in layers for p in layer.params}
        head_outside = any(p.requires_grad and id(p) not in managed for p in model.parameters())
        # Layers with nothing trainable (peft's base model around blocks without an adapter) stay frozen and get
        # no place in the schedule: the head is the last layer that trains, so freezing never leaves nothing.
        idle = untrainable_layers(layers)
        scheduled = [layer for layer in layers if layer.name not in idle]
        n_groups = len(scheduled) + int(head_outside)
        if n_groups < 2:
            raise ValueError(
                f"FreezeOut needs at least 2 layers (layers to freeze, then the head that trains to the end), "
                f"but layers={self.layer_spec!r} gives {[layer.name for layer in layers]} and no other trainable "
                "parameters. Use a model with more blocks or a finer layer spec (e.g. 're:backbone\\.\\d+'). "
                f"At the start, {trainable_report(model, layers)}."
            )
        if idle and not head_outside and layers[-1].name in idle:
            rank_zero_warn(
                f"FreezeOut: nothing is trainable in {idle}, so they stay frozen and {scheduled[-1].name!r} is the "
                f"head that trains to the end ({trainable_report(model, layers)}). To train a head, make it "
                "trainable before fit, or set `layers` to the blocks you mean."
            )
        schedules = freezeout_schedule(n_groups, self.t0, self.schedule, self.scale_lr)
        self.layer_schedules = {layer.name: s for layer, s in zip(scheduled, schedules, strict=False)}
        self._head_schedule = schedules[-1]

    @override
    def on_optimizer_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = self._schedulers(trainer)
        if schedulers:
            raise ValueError(
                f"FreezeOut sets every param group's learning rate itself (a cosine per layer that reaches zero "
                f"at the layer's freeze time; the head's reaches zero at the end of training), but "
                f"configure_optimizers also returned {[type(s).__name__ for s in schedulers]}. Two schedules "
                "would overwrite each other's group['lr']: return only the optimizer. Its lr is the base LR."
            )
        engine = self._require_engine()
        assert engine.optimizer is not None and self._head_schedule is not None
        per_group = [self._head_schedule] * len(engine.optimizer.param_groups)
        for name, schedule in self.layer_schedules.items():
            for index in engine.group_indices(name):
                per_group[index] = schedule
        self._group_indices = list(range(len(per_group)))
        self._group_schedules = per_group
        self.total_steps = None  # known in on_train_start (asking earlier breaks mid-epoch resume)
        self._lrs_set_for = self._next_freeze_step = None

    @override
    def lr_moves(self, trainer: pl.Trainer) -> bool:
        return True  # the cosine changes every group's LR every step

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"freezeout": self._settings()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._checkpoint_settings = state.get("freezeout")

    def _settings(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "schedule": self.schedule,
            "scale_lr": self.scale_lr,
            "total_steps": self.total_steps,
        }

    def _warn_if_settings_changed(self, saved: dict[str, Any]) -> None:
        changed = {k: (saved.get(k), v) for k, v in self._settings().items() if saved.get(k) != v}
        if changed:
            rank_zero_warn(
                f"FreezeOut: resuming with different settings than the checkpoint (checkpoint, now): {changed}. "
                "The freeze times follow the new settings; layers already frozen stay frozen.",
                category=FreezeWarning,
            )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The step count is read here, not at fit start: asking earlier sets the train dataloader up before
        # Lightning restores the checkpoint, and a resumable loader would restart its epoch.
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"FreezeOut needs a finite training length to place the freeze times, but the trainer "
                f"estimates {total} optimizer steps: set max_epochs or max_steps."
            )
        self.total_steps = int(total)
        if self._checkpoint_settings is not None:
            self._warn_if_settings_changed(self._checkpoint_settings)
            self._checkpoint_settings = None
        # After a resume, catch up on the freezes and set this step's LRs (the optimizer holds the saved ones).
        self._freeze_due(trainer)
        self._set_lrs(trainer.global_step)
        self._record(trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._next_freeze_step is not None and trainer.global_step >= self._next_freeze_step:
            self._freeze_due(trainer)
        self._set_lrs(trainer.global_step)  # set already at the previous batch's end, unless resumed or first

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Set the next step's LRs now as well, so a LearningRateMonitor placed before us in the callback
        # list (it reads group["lr"] in on_train_batch_start) logs the LR that step will really use.
        self._set_lrs(trainer.global_step)
        super().on_train_batch_end(trainer, pl_module, *args)

    # ------------------------------------------------------------------ internals
    def _freeze_due(self, trainer: pl.Trainer) -> None:
        """Freeze, in layer order, the layers whose freeze time has come, and find the next freeze step."""
        engine = self._require_engine()
        if self.total_steps is None:
            return
        t = progress(trainer.global_step, self.total_steps)
        due = [
            layer.name
            for layer in self.layers
            if not engine.is_frozen(layer.name) and self.layer_schedules[layer.name].frozen_at(t)
        ]
        if due:
            times = ", ".join(f"{n}: t_i={self.layer_schedules[n].t:.4g}" for n in due)
            self.transition(trainer, freeze=due, reason=f"t={t:.4g} >= {times}")
        upcoming = [
            step
            for name, step in self.freeze_steps().items()
            if step is not None and not engine.is_frozen(name)
        ]
        self._next_freeze_step = min(upcoming, default=None)

    def _set_lrs(self, step: int) -> None:
        """Every group's LR for optimizer step ``step``: one pass over the groups (its base LR times its factor)."""
        engine = self._require_engine()
        if engine.optimizer is None or self.total_steps is None or self._lrs_set_for == step:
            return
        factors = lr_factors(progress(step, self.total_steps), self._group_schedules)
        optim.set_lr_factors(engine.optimizer, self._group_indices, factors)
        self._lrs_set_for = step
