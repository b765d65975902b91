"""Shared test fixtures: the repository root, a session-wide pretrain cache, and an app runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


@pytest.fixture(scope="session", autouse=True)
def _pretrain_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the digits task's pretrained-backbone cache out of the checkout, shared by all tests.

    Subprocesses inherit it through ``$LIGHTNING_FREEZE_CACHE``.
    """
    cache = tmp_path_factory.mktemp("pretrain_cache")
    previous = os.environ.get("LIGHTNING_FREEZE_CACHE")
    os.environ["LIGHTNING_FREEZE_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("LIGHTNING_FREEZE_CACHE", None)
    else:
        os.environ["LIGHTNING_FREEZE_CACHE"] = previous


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF_DIR


def run_app(
    *overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lightning_freeze <overrides>`` in ``cwd`` as a user would (a real process)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lightning_freeze", *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
