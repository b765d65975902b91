"""The records a freezing callback keeps during a fit: its transitions and the series its timeline plots.

They are checkpointed as plain containers (:meth:`LrHistory.to_state`, events are dicts), so a checkpoint
still loads with ``torch.load(..., weights_only=True)`` and the timeline JSON is the same data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypedDict

Action = Literal["freeze", "thaw"]


class Event(TypedDict):
    """One layer's transition: at optimizer step ``step`` of epoch ``epoch`` it was frozen or thawed, and why."""

    step: int
    epoch: int
    layer: str
    action: Action
    reason: str


def _append(series: dict[str, list[float | None]], length: int, values: Mapping[str, float | None]) -> None:
    """Add one point per name; a name seen for the first time gets ``None`` for the points before."""
    for name, value in values.items():
        column = series.setdefault(name, [])
        column.extend([None] * (length - 1 - len(column)))
        column.append(value)


def _drop_last(series: dict[str, list[float | None]], length: int) -> None:
    for column in series.values():
        if len(column) == length:
            column.pop()


@dataclass
class LrHistory:
    """The learning rate of each param group (by layer or group name) at recorded optimizer steps.

    ``lr[name][i]`` belongs to ``step[i]``; ``None`` while the layer is frozen (or before its group existed).
    """

    step: list[int] = field(default_factory=list)
    lr: dict[str, list[float | None]] = field(default_factory=dict)

    def record(self, step: int, lrs: Mapping[str, float | None]) -> None:
        """Add the point for ``step``; a second record of the same step replaces the first."""
        if self.step and self.step[-1] == step:
            _drop_last(self.lr, len(self.step))
            self.step.pop()
        self.step.append(step)
        _append(self.lr, len(self.step), lrs)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> LrHistory:
        state = state or {}
        return cls(list(state.get("step", [])), {k: list(v) for k, v in state.get("lr", {}).items()})


@dataclass
class SignalHistory:
    """AdaptiveFreeze's decision inputs at each check: every layer's score and the threshold it was held to."""

    step: list[int] = field(default_factory=list)
    score: dict[str, list[float | None]] = field(default_factory=dict)
    threshold: list[float | None] = field(default_factory=list)

    def record(self, step: int, scores: Mapping[str, float | None], threshold: float | None) -> None:
        self.step.append(step)
        _append(self.score, len(self.step), scores)
        self.threshold.append(threshold)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> SignalHistory:
        state = state or {}
        return cls(
            list(state.get("step", [])),
            {k: list(v) for k, v in state.get("score", {}).items()},
            list(state.get("threshold", [])),
        )
