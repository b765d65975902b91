"""Callbacks the app tests add with `+callbacks.<name>={_target_: app_callbacks....}`."""

from __future__ import annotations

import lightning.pytorch as pl


class InterruptAt(pl.Callback):
    """Press Ctrl+C after optimizer step ``step``: raise KeyboardInterrupt where a real SIGINT would surface."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
