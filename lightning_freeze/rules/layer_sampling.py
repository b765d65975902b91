"""Layer sampling (LISA, Pan et al. 2024, arXiv 2403.17919) as pure logic: which middle layers train when.

Training is cut into intervals of ``interval`` optimizer steps; interval ``k`` covers the steps
``k * interval`` to ``(k + 1) * interval - 1``. In each interval a seeded random choice of ``n_layers`` of
the *middle* layers trains (the layers not in ``always``); the others wait, frozen. The choice is a pure
function of ``(seed, k)``, so every process that knows the seed makes the same one, and a resumed run
makes the same one as an uninterrupted run, without any random state to carry along.

>>> plan = SamplingPlan(["block0", "block1", "block2", "block3"], n_layers=2, interval=10, seed=0)
>>> plan.interval_of(25)
2
>>> chosen = plan.chosen(2)
>>> len(chosen), chosen == plan.chosen(2), set(chosen) <= set(plan.middle)
(2, True, True)
>>> sorted(plan.waiting(2) + chosen) == sorted(plan.middle)
True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_freeze.validation import check_int

_WHERE = "LayerSampling"


@dataclass(frozen=True)
class SamplingPlan:
    """The middle layers (in order), how many train at a time, for how many steps, and the run's seed."""

    middle: Sequence[str]
    n_layers: int
    interval: int
    seed: int

    def __post_init__(self) -> None:
        check_int(self.interval, "interval", minimum=1, where=_WHERE)
        check_int(self.seed, "seed", minimum=0, where=_WHERE)
        check_n_layers(self.n_layers, self.middle)

    def interval_of(self, step: int) -> int:
        """The interval that optimizer step ``step`` belongs to."""
        return step // self.interval

    def chosen(self, k: int) -> tuple[str, ...]:
        """The middle layers that train in interval ``k``, in layer order."""
        # A string seed is hashed with SHA-512 by ``random``: the same stream in every process and Python
        # version, independent of PYTHONHASHSEED and of the global generators training draws from.
        rng = random.Random(f"layer-sampling:{self.seed}:{k}")
        picked = set(rng.sample(range(len(self.middle)), self.n_layers))
        return tuple(name for i, name in enumerate(self.middle) if i in picked)

    def waiting(self, k: int) -> tuple[str, ...]:
        """The middle layers that are frozen in interval ``k``, in layer order."""
        chosen = set(self.chosen(k))
        return tuple(name for name in self.middle if name not in chosen)


def check_n_layers(n_layers: int, middle: Sequence[str]) -> int:
    """``n_layers`` if that many of the ``middle`` layers can be sampled; ``ValueError`` naming the option otherwise."""
    check_int(n_layers, "n_layers", minimum=1, where=_WHERE)
    if n_layers > len(middle):
        raise ValueError(
            f"{_WHERE}: n_layers={n_layers} but there are only {len(middle)} middle layers to sample from "
            f"({list(middle)}); lower n_layers, or take layers out of `always`"
        )
    return n_layers
