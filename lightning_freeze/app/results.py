"""One run's result record, ``metrics.json``, and its printed table.

A run records ``status``: ``ok``, ``failed`` (with the ``error``) or ``interrupted`` (with the last epoch and
step and the checkpoint to resume from). A completed result is never replaced by another run that did not
complete: a refused or failed re-run into the same directory writes ``metrics.<status>.json`` next to it
and leaves the earlier ``metrics.json`` as it was. ``run_id`` tells runs apart.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_freeze.splitrun.report import json_ready

__all__ = ["METRICS_FILE", "format_result", "write_result"]

METRICS_FILE = "metrics.json"


def write_result(run_dir: Path, result: Mapping[str, Any]) -> Path:
    """Write ``result`` to ``run_dir/metrics.json`` (atomically), unless that would replace a completed result
    with an incomplete one; then to ``metrics.<status>.json``. Returns the path written."""
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
    """A short, human-readable table of one run's result."""
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
