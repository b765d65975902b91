"""One run's result record (:class:`RunResult`), ``metrics.json``, and its printed table.

A run records ``status``: ``ok``, ``failed`` (with the ``error``) or ``interrupted`` (with the last epoch and
step and the checkpoint to resume from). A completed result is never replaced by another run that did not
complete: a refused or failed re-run into the same directory writes ``metrics.<status>.json`` next to it
and leaves the earlier ``metrics.json`` as it was. ``run_id`` tells runs apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_freeze.splitrun.report import json_ready

__all__ = ["METRICS_FILE", "RunResult", "format_result", "write_result"]

METRICS_FILE = "metrics.json"
RunStatus = Literal["ok", "failed", "interrupted"]


@dataclass(kw_only=True)
class RunResult:
    """What one run records in ``metrics.json``: one field per key, in the file's order.

    A run starts ``failed`` and becomes ``ok`` only when fit, validation and test all returned, so a crash at
    any point leaves an honest record.

    Args:
        run_dir: the run directory (``metrics.json`` and the checkpoints go there).
        seed: the run seed (``seed``), as configured.
        overrides: the command-line overrides of this Hydra job (empty outside Hydra).
        choices: the option picked in each config group (``{"freeze": "layer_freeze", ...}``).
    """

    status: RunStatus = "failed"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # val and test together
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    wall_time_s: float | None = None
    fit_time_s: float | None = None
    trainable_fraction: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    epochs: int | None = None
    global_step: int | None = None
    resumed_from: str | None = None  # the checkpoint this run continued from
    seed: Any = None
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, Any] = field(default_factory=dict)
    run_dir: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    traceback: str | None = None
    resume_from: str | None = None  # an interrupted run: the checkpoint to continue from
    resume_hint: str | None = None
    written_to: str | None = None

    def set_trainable(self, trainable: int, total: int) -> None:
        """Record the trainable and total parameter counts (at the end of training)."""
        self.trainable_params, self.total_params = trainable, total
        self.trainable_fraction = trainable / max(total, 1)

    def set_evaluation(self, val: Mapping[str, float], test: Mapping[str, float]) -> None:
        """Record the validation and test metrics; ``metrics`` holds both."""
        self.val, self.test = dict(val), dict(test)
        self.metrics = {**self.val, **self.test}

    def set_error(self, err: BaseException) -> None:
        """Record the exception that ended the run (called inside its ``except`` block, for the traceback)."""
        self.error = f"{type(err).__name__}: {err}"
        self.traceback = traceback.format_exc()

    def set_interrupted(self, resume_from: Path | None) -> None:
        """Mark the run interrupted (Ctrl+C, SIGTERM) and say how to continue it."""
        self.status = "interrupted"
        self.resume_from = None if resume_from is None else str(resume_from)
        self.resume_hint = (
            "no checkpoint was written yet: rerun from the start"
            if resume_from is None
            else "rerun the same command with resume=last (same run dir)"
            if resume_from.name.startswith("last")
            else f"rerun the same command with ckpt_path={resume_from}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as ``metrics.json`` holds it (and as ``train()`` returns it)."""
        return dataclasses.asdict(self)


def write_result(run_dir: Path, result: Mapping[str, Any]) -> Path:
    """Write a run's record to ``run_dir/metrics.json``, atomically.

    A completed (``ok``) record of another run is never replaced by one that did not complete: that record
    goes to ``metrics.<status>.json`` next to it instead.

    Args:
        run_dir: the run directory (created if needed).
        result: the record (:meth:`RunResult.to_dict`).

    Returns:
        The path written.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    if result.get("status") != "ok" and path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = {}
        # this run's own record may be corrected (a rank failed after rank 0 wrote ok); another run's may not
        if (
            isinstance(earlier, dict)
            and earlier.get("status") == "ok"
            and earlier.get("run_id") != result.get("run_id")
        ):
            path = run_dir / f"metrics.{result.get('status', 'failed')}.json"
    text = json.dumps(json_ready(dict(result)), indent=2, default=str, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def format_result(result: Mapping[str, Any]) -> str:
    """A short, human-readable table of one run's record.

    Args:
        result: the record (:meth:`RunResult.to_dict`, or ``metrics.json`` as read back).
    """
    rows: list[tuple[str, str]] = [("status", str(result["status"]))]
    if result.get("error"):
        rows.append(("error", str(result["error"]).splitlines()[0][:200]))
    for key, value in sorted(result.get("metrics", {}).items()):
        rows.append(
            (key, f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value))
        )
    if result.get("trainable_fraction") is not None:
        rows.append(
            (
                "trainable params",
                f"{100 * result['trainable_fraction']:.1f}% "
                f"({result['trainable_params']:,} of {result['total_params']:,})",
            )
        )
    if result.get("epochs") is not None:
        rows.append(("epochs / steps", f"{result['epochs']} / {result['global_step']}"))
    if result.get("resumed_from"):
        rows.append(("resumed from", str(result["resumed_from"])))
    if result.get("resume_from"):
        rows.append(("resume from", f"{result['resume_from']}  ({result.get('resume_hint')})"))
    if result.get("fit_time_s") is not None:
        rows.append(("fit time", f"{result['fit_time_s']:.1f} s"))
    if result.get("wall_time_s") is not None:
        rows.append(("wall time", f"{result['wall_time_s']:.1f} s"))
    rows.append(("run dir", str(result.get("run_dir"))))
    if result.get("written_to") and Path(str(result["written_to"])).name != METRICS_FILE:
        rows.append(("recorded in", f"{result['written_to']} (the earlier completed metrics.json is kept)"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    overrides = " ".join(result.get("overrides") or []) or "(defaults)"
    return f"\nlightning-freeze: {overrides}\n{line}\n{body}\n{line}"
