"""Records the trainable-parameter count at the start and the end of training."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_freeze.engine.sharding import parameter_counts


class TrainableFraction(Callback):
    """``at_start``/``at_end``: ``(trainable, total)`` parameters when training starts and ends.

    Measured in ``on_train_end``, before callbacks' ``teardown`` could thaw anything; whole under FSDP1 too
    (:func:`~lightning_freeze.engine.sharding.parameter_counts`).
    """

    def __init__(self) -> None:
        self.at_start: tuple[int, int] | None = None
        self.at_end: tuple[int, int] | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = parameter_counts(pl_module, trainer.strategy)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_end = parameter_counts(pl_module, trainer.strategy)
