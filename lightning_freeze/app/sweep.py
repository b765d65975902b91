"""The Hydra callback that summarises a sweep: ``summary.json``, ``summary.md`` and ``summary.png`` at its root.

Hydra skips ``on_multirun_end`` when a job of the sweep failed, so the summary is also written when each job
ends (``on_job_end`` runs for failed jobs too): a sweep with a failed job still leaves a summary that lists the
failure. Writes are atomic, so parallel launchers (joblib, submitit) may finish jobs at the same time.

    hydra:
      callbacks:
        splitrun_report:
          _target_: lightning_freeze.app.sweep.SweepSummary
          # replicate_keys: [split.fold, split.repeat, seed, split_seed]   # averaged over
          # baseline: freeze=none                                          # compared against
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from typing_extensions import override

from lightning_freeze.splitrun.report import REPLICATE_KEYS, to_markdown, write_summary

__all__ = ["SweepSummary"]

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Write the sweep summary after every job of a multirun and when the multirun ends.

    Args:
        replicate_keys: the overrides averaged over (folds, repeats, seeds); every other override names a
            condition.
        baseline: the condition the others are compared against (e.g. ``freeze=none``); default: none.
    """

    def __init__(self, replicate_keys: Sequence[str] = REPLICATE_KEYS, baseline: str | None = None) -> None:
        self.replicate_keys = list(replicate_keys)
        self.baseline = baseline

    def _write(self, config: Any) -> dict[str, Any] | None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            return write_summary(sweep_dir, self.replicate_keys, self.baseline)
        except Exception as err:  # never turn a finished job or sweep into a failure
            log.warning("could not summarise %s: %s", sweep_dir, err)
            return None

    @override
    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(config)

    @override
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summary = self._write(config)
        if summary is not None:
            print(to_markdown(summary, f"Sweep summary: {config.hydra.sweep.dir}"), flush=True)
