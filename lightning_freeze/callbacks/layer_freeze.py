"""LayerFreeze: keep chosen layers frozen for the whole fit, or until an epoch or a step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_freeze.callbacks.base import FreezingCallback, LayerSpec, NormMode
from lightning_freeze.engine.layers import Layer
from lightning_freeze.validation import check_int, check_number


class LayerFreeze(FreezingCallback):
    """Freeze ``layers`` before training; thaw them at ``until_epoch`` or ``until_step`` if given.

    Frozen parameters stay bit-identical under any optimizer, norm layers keep their statistics
    (``norm="eval"``) and dropout inside frozen layers is off. On thaw the layers rejoin the optimizer,
    with base LR ``lr`` if given (the current scheduler factor still applies), and resume keeps the
    thaw. Your ``configure_optimizers`` can simply pass ``self.parameters()``.

    Args:
        layers: the layers to freeze: a glob on module names, ``"re:<regex>"``, ``"auto"`` (sliceable,
            e.g. ``"auto[:-1]"``: every block but the head), or a list of them.
        until_epoch: thaw at the start of this epoch (None: no thaw by epoch).
        until_step: thaw before this optimizer step (None: no thaw by step). Set at most one of the two.
        norm: ``"eval"`` keeps the frozen layers' norm statistics and affine weights fixed; ``"train"`` lets
            norm layers train (fastai's ``train_bn``).
        lr: base LR of the thawed layers' param groups (None: the optimizer's).
        plot: write the freeze timeline (JSON and PNG) to each logger's folder at the end of fit and log it
            to loggers that take images.

    The backbone is frozen in epoch 0 and thaws at epoch 1 with base LR 1e-4:

    >>> from lightning_freeze.tasks.digits import DigitsClassifier, example_loader, example_trainer
    >>> freeze = LayerFreeze("backbone.*", until_epoch=1, lr=1e-4)
    >>> example_trainer(max_epochs=2, callbacks=[freeze]).fit(DigitsClassifier(pretrained=False), example_loader())
    >>> [(e["layer"], e["action"], e["epoch"]) for e in freeze.events]
    [('backbone.0', 'thaw', 1), ('backbone.1', 'thaw', 1), ('backbone.2', 'thaw', 1)]
    """

    def __init__(
        self,
        layers: LayerSpec = "backbone.*",
        until_epoch: int | None = None,
        until_step: int | None = None,
        norm: NormMode = "eval",
        lr: float | None = None,
        plot: bool = False,
    ) -> None:
        super().__init__(layers=layers, norm=norm, plot=plot)
        self.until_epoch = check_int(
            until_epoch, "until_epoch", minimum=0, allow_none=True, where="LayerFreeze"
        )
        self.until_step = check_int(until_step, "until_step", minimum=0, allow_none=True, where="LayerFreeze")
        if self.until_epoch is not None and self.until_step is not None:
            raise ValueError("LayerFreeze: set until_epoch or until_step, not both")
        self.lr = check_number(lr, "lr", low=0, low_open=True, allow_none=True, where="LayerFreeze")
        self._thawed = False

    @override
    def initially_frozen(self, layers: list[Layer]) -> list[str]:
        self._thawed = False
        return [layer.name for layer in layers]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._warn_if_after_the_fit(trainer, self.until_epoch, self.until_step, "the layers thaw")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._thawed and self.until_epoch is not None and trainer.current_epoch >= self.until_epoch:
            self._thaw_all(trainer, f"until_epoch={self.until_epoch}")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._thawed and self.until_step is not None and trainer.global_step >= self.until_step:
            self._thaw_all(trainer, f"until_step={self.until_step}")

    def _thaw_all(self, trainer: pl.Trainer, reason: str) -> None:
        self.transition(trainer, thaw=[layer.name for layer in self.layers], lr=self.lr, reason=reason)
        self._thawed = True  # also after a resume past the thaw: nothing left to check on later steps
