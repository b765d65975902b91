"""LayerSampling (LISA): every few optimizer steps, a new random handful of middle layers trains.

The sampling rule is pure logic in :mod:`lightning_freeze.rules.layer_sampling`; this module applies it
through the shared engine, so a layer that waits is frozen exactly like any frozen layer (bit-identical, out
of the optimizer and of DDP's all-reduce, eval mode) and a layer that enters is back in the optimizer, in its
own param group with the LR the scheduler gives that group now. That is where LISA implementations go wrong:
a layer frozen before the optimizer is built never enters it, and "receives gradients without updating".
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_freeze.callbacks.base import FreezingCallback, LayerSpec
from lightning_freeze.engine.freezing import untrainable_layers
from lightning_freeze.engine.layers import Layer, layers_within
from lightning_freeze.rules.layer_sampling import SamplingPlan, check_n_layers
from lightning_freeze.validation import check_bool, check_int, check_layer_spec

_WHERE = "LayerSampling"


class LayerSampling(FreezingCallback):
    """Train a seeded random choice of ``n_layers`` middle layers per ``interval`` optimizer steps (LISA).

    The layers in ``always`` train throughout (default: the first and the last of ``layers``, with ``auto``
    the embeddings and the head); the *middle* layers are the others that have something to train (on a
    peft model, the blocks that carry an adapter). At optimizer steps ``0, interval, 2 * interval, ...`` a new
    choice of ``n_layers`` middle layers trains and the rest are frozen with the engine's semantics.

    Args:
        layers: the layers to manage: ``"auto"`` (the model's blocks in forward order), a glob, a regex
            ``re:...``, or a list of them.
        n_layers: how many middle layers train at a time.
        interval: optimizer steps between two choices.
        always: layer specs that train throughout (each covers whole managed layers); ``None``: the first
            and the last managed layer; ``[]``: none.
        seed: the sampling seed. ``None``: rank 0 draws one at fit start (without touching the global random
            generators) and shares it with every rank; it is saved in checkpoints, so a resumed run continues
            the same sequence of choices.
        keep_state: keep a leaving layer's optimizer state (momentum, Adam moments) and give it back when the
            layer is chosen again; ``False`` frees it, so a returning layer starts with fresh state (as LISA does).
        norm: ``"eval"`` keeps waiting layers' norm statistics fixed; ``"train"`` lets their norm layers train.
        plot: write ``freeze_timeline.json``/``.png`` (one row per layer, a bar while it waits) at train end.

    Four digits-model layers, the first and the last always trained, one of the two middle ones per 5 steps:

    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> sampling = LayerSampling(n_layers=1, interval=5, seed=0)
    >>> example_trainer(max_steps=20, callbacks=[sampling]).fit(DigitsClassifier(pretrained=False), example_loader())
    >>> sampling.middle
    ['backbone.1', 'backbone.2']
    >>> [(c["step"], len(c["layers"])) for c in sampling.choices]
    [(0, 1), (5, 1), (10, 1), (15, 1)]
    """

    def __init__(
        self,
        layers: LayerSpec = "auto",
        n_layers: int = 2,
        interval: int = 20,
        always: LayerSpec | None = None,
        seed: int | None = None,
        keep_state: bool = False,
        norm: str = "eval",
        plot: bool = False,
    ) -> None:
        super().__init__(layers=layers, norm=norm, plot=plot)
        self.n_layers = check_int(n_layers, "n_layers", minimum=1, where=_WHERE)
        self.interval = check_int(interval, "interval", minimum=1, where=_WHERE)
        self.always_spec = None if always is None else _check_always(always)
        self.seed = check_int(seed, "seed", minimum=0, allow_none=True, where=_WHERE)
        self.keep_state = check_bool(keep_state, "keep_state", where=_WHERE)
        self.plan: SamplingPlan | None = None
        self.always: list[str] = []
        self.middle: list[str] = []
        self.choices: list[dict[str, Any]] = []  # {"step", "interval", "layers"} per choice made
        self._run_seed: int | None = None
        self._interval_index: int | None = None
        self._kept: dict[str, dict[str, Any]] = {}  # parameter name -> optimizer state kept while it waits

    # ------------------------------------------------------------------ FreezingCallback interface
    @override
    def prepare(self, trainer: pl.Trainer, layers: list[Layer]) -> None:
        names = [layer.name for layer in layers]
        if self.always_spec is None:
            self.always = [names[0], names[-1]] if len(names) > 1 else names[:1]
        elif not self.always_spec:
            self.always = []
        else:
            self.always = layers_within(trainer.lightning_module, self.always_spec, layers, "always")
        idle = set(untrainable_layers(layers))
        self.middle = [n for n in names if n not in self.always and n not in idle]
        check_n_layers(self.n_layers, self.middle)
        self._run_seed = self.seed if self.seed is not None else _agreed_seed(trainer)
        self.plan = SamplingPlan(self.middle, self.n_layers, self.interval, self._run_seed)
        self.choices, self._kept, self._interval_index = [], {}, 0
        self.choices.append({"step": 0, "interval": 0, "layers": list(self.plan.chosen(0))})

    @override
    def initially_frozen(self, layers: list[Layer]) -> list[str]:
        return list(self._require_plan().waiting(0))

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "layer_sampling": {
                "seed": self._run_seed,
                "n_layers": self.n_layers,
                "interval": self.interval,
                "middle": list(self.middle),
                "interval_index": self._interval_index,
                "choices": list(self.choices),
                "kept_state": self._kept,
            }
        }

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("layer_sampling")
        if saved is None:
            raise ValueError(f"{_WHERE}: the checkpoint holds no layer-sampling state")
        settings = {"n_layers": self.n_layers, "interval": self.interval, "middle": self.middle}
        changed = {k: (saved[k], v) for k, v in settings.items() if saved[k] != v}
        if changed:
            raise ValueError(
                f"{_WHERE}: the checkpoint was saved with other sampling settings (checkpoint, now): {changed}. "
                "Resume with the same n_layers, interval, layers and always."
            )
        if self.seed is not None and saved["seed"] != self.seed:
            raise ValueError(
                f"{_WHERE}: the checkpoint was saved with seed={saved['seed']}, this run has seed={self.seed}; "
                "resume with the same seed (or seed=None, which continues the checkpoint's)"
            )
        self._run_seed = int(saved["seed"])
        self.plan = SamplingPlan(self.middle, self.n_layers, self.interval, self._run_seed)
        self._interval_index = saved["interval_index"]
        self.choices = list(saved["choices"])
        self._kept = dict(saved["kept_state"])

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        plan = self._require_plan()
        k = plan.interval_of(trainer.global_step)
        # Only at the first batch of an optimizer step's accumulation window: global_step moved on there.
        if k == self._interval_index:
            return
        self._interval_index = k
        engine = self._require_engine()
        chosen = plan.chosen(k)
        leaving = [n for n in self.middle if n not in chosen and not engine.is_frozen(n)]
        entering = [n for n in chosen if engine.is_frozen(n)]
        self.choices.append({"step": trainer.global_step, "interval": k, "layers": list(chosen)})
        if self.keep_state:
            self._keep(leaving)
        self.transition(
            trainer, freeze=leaving, thaw=entering, reason=f"interval {k}: sampled {list(chosen)}"
        )
        if self.keep_state:
            self._give_back(entering)
        pl_module.log("layer_sampling/interval", float(k), on_step=True, on_epoch=False, rank_zero_only=True)

    @override
    def timeline(self, end_step: int) -> dict[str, Any]:
        return {**super().timeline(end_step), "choices": list(self.choices)}

    # ------------------------------------------------------------------ optimizer state of waiting layers
    def _names(self) -> dict[int, str]:
        engine = self._require_engine()
        return {id(p): n for n, p in engine.model.named_parameters()}

    def _keep(self, leaving: Sequence[str]) -> None:
        engine = self._require_engine()
        if engine.optimizer is None:
            return
        names = self._names()
        for layer in leaving:
            for p in engine.by_name[layer].params:
                state = engine.optimizer.state.get(p)
                if state:
                    self._kept[names[id(p)]] = {
                        k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
                    }

    def _give_back(self, entering: Sequence[str]) -> None:
        engine = self._require_engine()
        if engine.optimizer is None:
            return
        names = self._names()
        for layer in entering:
            for p in engine.by_name[layer].params:
                state = self._kept.pop(names[id(p)], None)
                if state is not None and p.requires_grad:
                    engine.optimizer.state[p] = {
                        k: v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                        for k, v in state.items()
                    }

    def _require_plan(self) -> SamplingPlan:
        if self.plan is None:
            raise RuntimeError(f"{_WHERE} is used before Trainer.fit set it up")
        return self.plan


def _check_always(always: Any) -> list[str]:
    if isinstance(always, (list, tuple)) and not always:
        return []
    spec = check_layer_spec(always, option="always", where=_WHERE)
    return [spec] if isinstance(spec, str) else list(spec)


def _agreed_seed(trainer: pl.Trainer) -> int:
    """A fresh seed drawn on rank 0 and shared with every rank (the global generators are left alone)."""
    mine = random.SystemRandom().getrandbits(62)
    return int(trainer.strategy.broadcast(mine, src=0))
