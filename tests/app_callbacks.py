"""Callbacks the app tests add with `+callbacks.<name>={_target_: app_callbacks....}`."""

from __future__ import annotations

import time

import lightning.pytorch as pl


class InterruptAt(pl.Callback):
    """Press Ctrl+C after optimizer step ``step``: raise KeyboardInterrupt where a real SIGINT would surface."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class SlowUntilResumed(pl.Callback):
    """Sleep after every step of a run that did not resume from a checkpoint: the first attempt of a job is
    long enough to be preempted; the resumed attempt runs at full speed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.ckpt_path is None:
            time.sleep(self.seconds)


class ExitAfterTest(pl.Callback):
    """Rank ``rank`` exits with ``code`` once testing is done: a rank that dies after rank 0's job succeeded."""

    def __init__(self, rank: int, code: int) -> None:
        self.rank, self.code = rank, code

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank:
            import os

            os._exit(self.code)
