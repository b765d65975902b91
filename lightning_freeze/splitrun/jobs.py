"""The jobs of a sweep as the report reads them: each job dir's status, metrics, overrides and split.

Every job dir holds ``metrics.json`` (written by the app), ``split_manifest.json`` and Hydra's
``.hydra/overrides.yaml``. :func:`collect_jobs` reads them into :class:`Job` records; the summary, the
out-of-fold merge and the fold ensembles all start from that list. Pure Python and numpy: reading a sweep
imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EXTRA_METRICS",
    "MANIFEST_FILE",
    "METRICS_FILE",
    "REPLICATE_KEYS",
    "Job",
    "NoJobsError",
    "collect_jobs",
    "optimized_metric",
]

REPLICATE_KEYS = ("split.fold", "split.repeat", "split.outer_fold", "split.inner_fold", "seed", "split_seed")
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "split_manifest.json"
# Per-job numbers recorded next to the metrics: fit time apart from the wall time (which includes one-time setup
# such as the demo's pretraining).
EXTRA_METRICS = ("trainable_fraction", "fit_time_s", "wall_time_s")


class NoJobsError(ValueError):
    """The directory holds no job of a sweep (no ``metrics.json`` and no ``.hydra/`` below it)."""


# ----------------------------------------------------------------------------------------------- sweep files


@dataclass
class Job:
    """One job dir of a sweep: its overrides, status, flat metrics and what its split was.

    Args:
        path: the job dir.
        overrides: the job's Hydra overrides as ``key -> value`` strings.
        status: ``ok``, ``failed``, ``interrupted``, ``missing`` or ``unreadable``.
        metrics: the job's numeric metrics (``val/acc`` ...) and times.
        error: the error of a job that did not succeed.
        split_key: the part hashes of its split manifest, the split seed and the run seed (pairs jobs).
        split: a short description of the split, for the tables.
        manifest: the job's ``split_manifest.json`` (None when it has none).
    """

    path: Path
    overrides: dict[str, str]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    split_key: tuple[Any, ...] | None = None  # the part hashes of its split manifest and its run seed
    split: str | None = None  # a short description of that split, for the tables
    manifest: dict[str, Any] | None = None  # its split_manifest.json


def _parse_overrides(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _read_overrides(job_dir: Path, metrics: Mapping[str, Any] | None) -> dict[str, str]:
    if metrics and metrics.get("overrides") is not None:
        return _parse_overrides(metrics["overrides"])
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        import yaml

        return _parse_overrides(yaml.safe_load(path.read_text()) or [])
    return {}


def _read_manifest(job_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((job_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _split_identity(
    manifest: Mapping[str, Any] | None, seed: Any
) -> tuple[tuple[Any, ...] | None, str | None]:
    try:
        hashes = tuple(sorted((str(name), str(part["sha256"])) for name, part in manifest["parts"].items()))  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        return None, None
    spec = manifest.get("spec") or {}  # type: ignore[union-attr]
    kind = spec.get("kind", "?")
    where = "".join(f" {k}={spec[k]}" for k in ("repeat", "fold", "outer_fold", "inner_fold") if k in spec)
    return (hashes, manifest.get("seed"), seed), f"{kind}{where} split_seed={manifest.get('seed')}"  # type: ignore[union-attr]


def optimized_metric(jobs: Sequence[Job]) -> str | None:
    """The sweep's ``optimized_metric`` (the app records it in each job's Hydra config), if it set one."""
    for job in jobs[:1]:
        path = job.path / ".hydra" / "config.yaml"
        if path.is_file():
            import yaml

            value = (yaml.safe_load(path.read_text()) or {}).get("optimized_metric")
            return str(value) if value else None
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job dir under ``sweep_dir`` (a dir with ``metrics.json`` or ``.hydra/``), sorted naturally.

    Args:
        sweep_dir: the sweep root (Hydra's ``hydra.sweep.dir``).
    """
    root = Path(sweep_dir)
    dirs = {p.parent for p in root.rglob(METRICS_FILE)} | {
        p.parent for p in root.rglob(".hydra") if p.is_dir()
    }
    dirs.discard(root)
    jobs = []
    for job_dir in sorted(
        dirs, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts]
    ):
        data: dict[str, Any] | None = None
        path = job_dir / METRICS_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                jobs.append(Job(job_dir, _read_overrides(job_dir, None), "unreadable", error=str(err)))
                continue
        overrides = _read_overrides(job_dir, data)
        if data is None:
            jobs.append(
                Job(
                    job_dir,
                    overrides,
                    "missing",
                    error=f"no {METRICS_FILE} (the job died or is running)",
                    manifest=_read_manifest(job_dir),
                )
            )
            continue
        metrics = {k: float(v) for k, v in (data.get("metrics") or {}).items() if _is_number(v)}
        metrics.update({k: float(data[k]) for k in EXTRA_METRICS if _is_number(data.get(k))})
        manifest = _read_manifest(job_dir)
        key, split = _split_identity(manifest, data.get("seed"))
        jobs.append(
            Job(
                job_dir,
                overrides,
                str(data.get("status", "unknown")),
                metrics,
                data.get("error"),
                key,
                split,
                manifest,
            )
        )
    return jobs
