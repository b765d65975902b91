"""The pure SplitRun modules (splitters, assignment algorithms, statistics, the report's library part) import
without torch, Lightning, Hydra or OmegaConf, in a fresh process: `from lightning_freeze.splitrun import KFold`
must not cost the seconds torch takes to import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning", "pytorch_lightning", "hydra", "omegaconf", "scipy")

PURE = [
    "import lightning_freeze.splitrun.splitters",
    "import lightning_freeze.splitrun.assign",
    "import lightning_freeze.splitrun.stats",
    "import lightning_freeze.splitrun.report",
    "from lightning_freeze.splitrun import KFold, Holdout, Arms, RepeatedKFold, SplitSpecError",
    "from lightning_freeze.splitrun import NestedKFold, TimeSeriesSplit, oof_predictions, fold_ensemble",
    "import lightning_freeze.splitrun.prediction_files, lightning_freeze.splitrun.decision",
]


@pytest.mark.parametrize("statement", PURE)
def test_pure_modules_import_without_heavy_dependencies(statement):
    code = (
        "import sys, json, time\n"
        "start = time.perf_counter()\n"
        f"{statement}\n"
        "print(json.dumps({'seconds': time.perf_counter() - start, "
        f"'loaded': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    report = json.loads(out.stdout)
    assert report["loaded"] == [], f"{statement} imported {report['loaded']}"


def test_the_splitters_work_in_that_process():
    code = (
        "import sys; from lightning_freeze.splitrun import KFold\n"
        "parts = KFold(k=4, fold=1).split(20, seed=0)\n"
        "print(len(parts['val']), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["5", "False"]
