"""Parallel runs with the real app in real processes: DDP inside a Hydra multirun (every rank of job j runs
job j's composed config, one dir per job, no second sweep), the joblib and submitit-local launchers, and
the sweep summary written by the Hydra callback at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import read_metrics, run_app

SCRIPTS = Path(__file__).parent / "ddp_scripts"
REPORT = "+hydra.callbacks.report={_target_: lightning_freeze.splitrun.report.SweepSummary}"
FAST = [
    "task.model.pretrained=false",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.enable_checkpointing=false",
    "+trainer.logger=false",
    "freeze=none",
]


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_inside_a_multirun_runs_each_jobs_config_on_every_rank(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(
        "-m",
        "trainer=ddp_cpu",
        "split=stratified_kfold",
        "split.k=3",
        "split.fold=0,1",
        *FAST,
        "+callbacks.probe={_target_: rank_probe.RankProbe, stamp: '${now:%H:%M:%S.%f}'}",
        REPORT,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])},
    )
    _check(proc)
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]  # exactly one dir per job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no second sweep, no stray outputs/
    records = []
    for num, job in enumerate(jobs):
        r0, r1 = (json.loads((job / f"rank{r}.json").read_text()) for r in (0, 1))
        assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
        for key in ("stamp", "overrides", "job_num", "split_hashes", "master_port"):
            assert r0[key] == r1[key], key  # both ranks: this job's composed config, this job's group
        assert r0["job_num"] == num and f"split.fold={num}" in r0["overrides"]
        assert read_metrics(job)["status"] == "ok"
        records.append((r0, r1))
    (a0, a1), (b0, b1) = records
    assert a0["split_hashes"] != b0["split_hashes"]  # fold 0 vs fold 1
    assert a0["pid"] == b0["pid"] and a1["pid"] != b1["pid"]  # rank 0 is the sweep process; fresh rank 1
    assert a0["master_port"] != b0["master_port"]  # no stale MASTER_PORT carried into job 1
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_ok"] == 2 and summary["replicate_axes"] == ["split.fold"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_run_folds_in_parallel_and_the_sweep_is_summarised(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    proc = run_app(
        "-m",
        f"hydra/launcher={launcher}",
        *extra,
        "split=stratified_kfold",
        "split.k=2",
        "split.fold=0,1",
        *FAST,
        REPORT,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    _check(proc)
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    hashes = []
    for job in jobs:
        assert read_metrics(job)["status"] == "ok"
        manifest = json.loads((job / "split_manifest.json").read_text())
        hashes.append(manifest["parts"]["val"]["sha256"])
    assert hashes[0] != hashes[1]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_ok"] == 2 and not summary["failed"]
    assert summary["conditions"][0]["metrics"]["val/acc"]["n"] == 2
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
