"""AdaptiveFreeze: freeze the front layers that have stopped learning, decided from the training gradients.

The decision rule is pure logic in :mod:`lightning_freeze.rules.adaptive`; this module measures the signals
and applies the decisions:

- after every backward pass that ends in an optimizer step (``on_before_optimizer_step``: gradients are
  accumulated, all-reduced under DDP, unscaled under AMP, not yet clipped) it adds each training layer's
  gradient norm to the interval's sums, on the device, without a host sync;
- every ``check_every_n_steps`` optimizer steps (default: half an epoch; from ``min_steps`` on, and not while ``monitor`` is getting
  worse) rank 0 decides and broadcasts the decision, so every rank freezes the same layers at the same step;
  the shared engine then freezes them, and under DDP they leave the all-reduce;
- the sums, the previous interval, the history and the guard's state live in the callback state, so a run
  stopped between checks and resumed decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_freeze.callbacks.base import FreezingCallback, LayerSpec, NormMode
from lightning_freeze.callbacks.records import SignalHistory
from lightning_freeze.engine.adapters import trainable_report
from lightning_freeze.engine.freezing import untrainable_layers
from lightning_freeze.engine.layers import Layer
from lightning_freeze.engine.sharding import is_sharded, layer_norms
from lightning_freeze.rules import adaptive
from lightning_freeze.validation import check_choice, check_int, check_str


class AdaptiveFreeze(FreezingCallback):
    """Freeze, from the front, the layers whose gradients say they have stopped learning.

    Every ``check_every_n_steps`` optimizer steps each layer still training gets a score from its gradients
    (``criterion``: ``grad_norm_change``, AutoFreeze's relative change of the gradient norm between two
    intervals, candidates at or below the ``percentile``-th percentile of the layers still training; or
    ``grad_norm``, the gradient norm per element at or below ``threshold``). The longest run of candidates
    at the front freezes. Guards: nothing freezes before ``min_steps`` (an int: optimizer steps; a float:
    that fraction of training), at most ``max_frozen`` layers freeze (default: every layer but the head: the
    trainable parameters outside ``layers``, else the last layer),
    and with ``monitor`` nothing more freezes after a validation that was worse than the one before.

    The defaults are the setting the benchmark measured (``benchmarks/comparisons/adaptive.py``): a check
    every half epoch, the 30th percentile, nothing frozen in the first 20% of training.

    Args:
        layers: the layers in forward order, the head last: a glob on module names, ``"re:<regex>"``,
            ``"auto"`` (the model's blocks), or a list of them. Only a front prefix ever freezes.
        check_every_n_steps: optimizer steps per check; the gradient norms are summed over this interval
            (None: half an epoch's optimizer steps, at least 1).
        criterion: ``"grad_norm_change"`` (AutoFreeze: the relative change of a layer's gradient norm between
            two intervals) or ``"grad_norm"`` (the gradient norm per parameter element).
        percentile: with ``grad_norm_change``, the candidates are the layers at or below this percentile of
            the changes of the layers still training, in (0, 100).
        threshold: with ``grad_norm`` (and only then), the candidates are the layers at or below this norm.
        min_steps: no freezing before this many optimizer steps (an int) or this fraction of training (a
            float in [0, 1)).
        max_frozen: at most this many layers freeze (None: every layer but the head).
        monitor: an optional validation metric: no further freezing after a validation that was worse than
            the one before (needs a validation loop).
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        norm: ``"eval"`` keeps the frozen layers' norm statistics and affine weights fixed; ``"train"`` lets
            norm layers train.
        plot: write the freeze timeline (JSON and PNG, with each layer's score and the threshold) to each
            logger's folder at the end of fit and log it to loggers that take images.

    A run over the digits model (14 steps per epoch, a check every 4 steps from step 8 on); the layers
    freeze front to back, at check steps:

    >>> import torch
    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> adaptive = AdaptiveFreeze(check_every_n_steps=4, min_steps=8)
    >>> _ = torch.manual_seed(0)
    >>> model = DigitsClassifier(pretrained=False)
    >>> example_trainer(max_epochs=2, callbacks=[adaptive]).fit(model, example_loader(n=896, batch_size=64))
    >>> [layer.name for layer in adaptive.layers]
    ['backbone.0', 'backbone.1', 'backbone.2', 'head']
    >>> frozen = [e["layer"] for e in adaptive.events]
    >>> frozen == [layer.name for layer in adaptive.layers[: len(frozen)]] and "head" not in frozen
    True
    >>> all(e["step"] >= 8 and e["step"] % 4 == 0 for e in adaptive.events)
    True
    """

    ordered_layers = True
    monitor_purpose = "guards freezing with validation results"

    def __init__(
        self,
        layers: LayerSpec = "auto",
        check_every_n_steps: int | None = None,
        criterion: adaptive.Criterion = "grad_norm_change",
        percentile: float = 30.0,
        threshold: float | None = None,
        min_steps: int | float = 0.2,
        max_frozen: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        norm: NormMode = "eval",
        plot: bool = False,
    ) -> None:
        super().__init__(layers=layers, norm=norm, plot=plot)
        where = "AdaptiveFreeze"
        self.check_every_n_steps = check_int(
            check_every_n_steps, "check_every_n_steps", minimum=1, allow_none=True, where=where
        )
        self.criterion = check_choice(criterion, "criterion", adaptive.CRITERIA, where=where)
        self.percentile = adaptive.check_percentile(percentile)
        self.threshold = adaptive.check_threshold(threshold, self.criterion)
        self.min_steps = adaptive.check_min_steps(min_steps)
        self.max_frozen = check_int(max_frozen, "max_frozen", minimum=1, allow_none=True, where=where)
        self.monitor = check_str(monitor, "monitor", allow_none=True, where=where)
        self.mode = check_choice(mode, "mode", ("min", "max"), where=where)
        self._check_every = self.check_every_n_steps or 1  # the interval in use, known at train start
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._sums: torch.Tensor | None = None  # per layer: gradient norms summed over the interval
        self._steps_in_interval = 0
        self._previous: dict[str, float] = {}  # the last interval's sums of the layers still training
        self._paused = False  # the monitor guard
        self._last_metric: float | None = None
        self._start_step = 0
        self.signals = SignalHistory()
        self._tracked_for: frozenset[str] | None = None
        self._tracked_params: list[tuple[torch.nn.Parameter, int]] = []

    # ------------------------------------------------------------------ FreezingCallback interface
    @override
    def prepare(self, trainer: pl.Trainer, layers: list[Layer]) -> None:
        # The head is what trains outside the managed layers (layers="backbone.*"), else the last managed layer.
        managed = {id(p) for layer in layers for p in layer.params}
        head_outside = any(
            p.requires_grad and id(p) not in managed for p in trainer.lightning_module.parameters()
        )
        # Layers with nothing trainable (peft's base model around blocks without an adapter) are frozen from the
        # start: never a decision, and the head is the last layer that trains.
        idle = set(untrainable_layers(layers))
        self._decidable = [layer.name for layer in layers if layer.name not in idle]
        most = len(self._decidable) if head_outside else len(self._decidable) - 1
        limit = most if self.max_frozen is None else self.max_frozen
        if limit > most or most < 1:
            raise ValueError(
                f"AdaptiveFreeze: max_frozen={self.max_frozen} with the layers {[layer.name for layer in layers]}"
                + ("" if head_outside else ", the last of which is the head and never freezes")
                + f": at most {most} can freeze; lower max_frozen or use a finer layer spec"
                + (f" (at the start, {trainable_report(trainer.lightning_module, layers)})" if idle else "")
            )
        self._max_frozen = limit
        self._reset_run_state()
        self._elements = [max(1, sum(p.numel() for p in layer.params if p.requires_grad)) for layer in layers]
        self._position = {layer.name: i for i, layer in enumerate(layers)}

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "adaptive": {
                "sums": None if self._sums is None else self._sums.detach().cpu(),
                "steps_in_interval": self._steps_in_interval,
                "previous": dict(self._previous),
                "paused": self._paused,
                "last_metric": self._last_metric,
                "signals": self.signals.to_state(),
            }
        }

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("adaptive")
        if saved is None:
            raise ValueError("AdaptiveFreeze: the checkpoint holds no adaptive-freezing state")
        self._sums = saved["sums"]
        self._steps_in_interval = int(saved["steps_in_interval"])
        self._previous = dict(saved["previous"])
        self._paused = bool(saved["paused"])
        self._last_metric = saved["last_metric"]
        self.signals = SignalHistory.from_state(saved["signals"])

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = adaptive.warmup_steps(self.min_steps, trainer.estimated_stepping_batches)
        self._check_every = self.check_every_n_steps or self._half_epoch(trainer)

    @staticmethod
    def _half_epoch(trainer: pl.Trainer) -> int:
        """Half an epoch's optimizer steps (at least 1): the default check interval."""
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "AdaptiveFreeze: check_every_n_steps=None checks every half epoch, but this fit's epochs have no "
                "known length (an iterable dataset without __len__). Set check_every_n_steps."
            )
        return max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)) // 2)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # One fused norm over every gradient, then a segment sum per layer: a few ops per step, not a few per layer.
        # Under sharding each rank holds slices of the gradients: the squares are summed over ranks, and every
        # rank takes part in that at every step, gradients or not.
        grads, owners = [], []
        for p, index in self._tracked():
            if p.grad is not None:
                grads.append(p.grad)
                owners.append(index)
        sharded = is_sharded(trainer.strategy)
        if not grads and not sharded:
            return
        step = layer_norms(grads, owners, len(self.layers), pl_module.device, sharded=sharded)
        self._sums = step if self._sums is None else self._sums.to(step.device) + step
        self._steps_in_interval += 1

    def _tracked(self) -> list[tuple[torch.nn.Parameter, int]]:
        """(parameter, layer position) of the layers still training; rebuilt when the frozen set changes."""
        engine = self._require_engine()
        key = frozenset(engine.frozen)
        if self._tracked_for != key:
            seen: set[int] = set()
            self._tracked_params = []
            for i, layer in enumerate(self.layers):
                if layer.name in key:
                    continue
                for p in layer.params:
                    if id(p) not in seen:  # a tied tensor counts once, for its first layer
                        seen.add(id(p))
                        self._tracked_params.append((p, i))
            self._tracked_for = key
        return self._tracked_params

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        step = trainer.global_step
        if self._steps_in_interval >= self._check_every and step % self._check_every == 0:
            self._check(trainer, pl_module, step)

    @override
    def on_monitored_value(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> None:
        self._paused = adaptive.metric_worsened(self._last_metric, value, self.mode)
        self._last_metric = value

    # ------------------------------------------------------------------ the check
    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        engine = self._require_engine()
        assert self._sums is not None
        sums = self._sums.tolist()
        n = self._steps_in_interval
        self._sums, self._steps_in_interval = None, 0
        decidable = self._decidable
        n_frozen = next((i for i, name in enumerate(decidable) if not engine.is_frozen(name)), len(decidable))
        training = decidable[n_frozen:]
        current = {name: sums[self._position[name]] for name in training}
        per_element = {name: current[name] / n / self._elements[self._position[name]] for name in training}
        signals = adaptive.Signals(dict(self._previous), current, per_element)
        self._previous = current
        decision = adaptive.decide(
            decidable,
            n_frozen,
            signals,
            criterion=self.criterion,
            percentile=self.percentile,
            threshold=self.threshold,
            max_frozen=self._max_frozen,
        )
        self._remember(step, decision)
        freeze = list(decision.freeze) if step >= self._start_step and not self._paused else []
        # Rank 0's decision for every rank: float sums of all-reduced gradients may differ in the last bit.
        freeze = trainer.strategy.broadcast(freeze, src=0)
        if freeze:
            self.transition(trainer, freeze=freeze, reason=decision.reason)
        pl_module.log_dict(
            {
                f"adaptive/score/{name}": value
                for name, value in decision.scores.items()
                if math.isfinite(value)
            }
            | ({"adaptive/threshold": decision.threshold} if decision.threshold is not None else {}),
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )

    def _remember(self, step: int, decision: adaptive.Decision) -> None:
        scores = {
            layer.name: value if value is not None and math.isfinite(value) else None
            for layer in self.layers
            for value in [decision.scores.get(layer.name)]
        }
        self.signals.record(step, scores, decision.threshold)

    @override
    def timeline(self, end_step: int) -> dict[str, Any]:
        data = super().timeline(end_step)
        data.update(
            signals=self.signals.score,
            signal_steps=self.signals.step,
            threshold=self.signals.threshold,
            signal_name="gradient-norm change"
            if self.criterion == "grad_norm_change"
            else "gradient norm / element",
        )
        return data
