"""Per-epoch statistics of the cache, and the rule that switches it off for inputs that never repeat.

>>> stats = EpochStats(entries_at_start=64)
>>> stats.lookups, stats.found = 64, 2          # random augmentation: almost nothing came back
>>> stats.inputs_changed(min_hit_rate=0.25)
True
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochStats:
    """What happened in the training steps of one epoch (validation and test are never looked up)."""

    entries_at_start: int = 0
    generation: int = 0
    steps: int = 0  # training steps
    lookups: int = 0  # samples looked up
    hashed: int = 0  # samples whose inputs were fingerprinted (all of them, unless keyed by sample id)
    found: int = 0  # samples found in the cache (served, or computed anyway in a batch of too few misses)
    hits: int = 0  # samples served from the cache
    uncopied: int = 0  # of them, served without a copy (a batch asked for in the order it was stored)
    computed: int = 0  # samples whose skipped blocks were computed
    stored: int = 0  # samples stored
    bypassed: int = 0  # calls computed without a lookup (tiny batch, a stale cut, inputs that need grad)
    verified: int = 0  # checks of stored rows against a fresh computation
    compute_seconds: float = 0.0  # time in the skipped blocks when they were computed
    overhead_seconds: float = (
        0.0  # our work: the step hooks, keys, lookups, gathering, serving, storing (not the blocks)
    )
    record_seconds: float = 0.0  # time recording a new cut
    per_row: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # recent compute s/sample

    def miss(self, rows: int, seconds: float) -> None:
        self.computed += rows
        self.compute_seconds += seconds
        if rows and seconds:
            self.per_row.append(seconds / rows)

    def inputs_changed(self, min_hit_rate: float) -> bool:
        """After an epoch that started with cached samples: were too few of them reused?

        If inputs repeat, every cached sample is looked up again, so ``found`` is about
        ``min(entries_at_start, lookups)`` (also when the budget capped the cache); random augmentation
        makes it about 0.
        """
        expected = min(self.entries_at_start, self.lookups)
        return expected > 0 and self.found < min_hit_rate * expected

    def summary(self, per_row: deque[float]) -> dict[str, Any]:
        seconds_per_row = statistics.median(per_row) if per_row else 0.0
        return {
            "steps": self.steps,
            "lookups": self.lookups,
            "hashed": self.hashed,
            "found": self.found,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else None,
            "uncopied": self.uncopied,
            "computed": self.computed,
            "stored": self.stored,
            "bypassed": self.bypassed,
            "verified": self.verified,
            "time_saved_s": max(0.0, self.hits * seconds_per_row - self.overhead_seconds),
            "overhead_s": self.overhead_seconds,
            "record_s": self.record_seconds,
        }
