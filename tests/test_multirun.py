"""Parallel runs with the real app in real processes: DDP inside a Hydra multirun (every rank of job j runs job
j's composed config, one dir per job, no second sweep), an Optuna sweep over DDP jobs, the joblib and
submitit-local launchers, and the sweep summary written by the Hydra callback, failed jobs included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, run_app

SCRIPTS = Path(__file__).parent / "ddp_scripts"
PROBE = "+callbacks.probe={_target_: rank_probe.RankProbe, stamp: '${now:%H:%M:%S.%f}'}"
PROBE_ENV = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
FAST = [
    "task.model.pretrained=false",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.enable_checkpointing=false",
    "trainer.logger=false",
    "freeze=none",
]


def _sweep(tmp_path: Path, *overrides: str, probe: bool = False):
    """``lightning-freeze -m <overrides> <FAST>`` into ``tmp_path/sweep`` (with the rank probe if asked)."""
    extra = [PROBE] if probe else []
    env = PROBE_ENV if probe else None
    return run_app(
        "-m", *overrides, *FAST, *extra, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, env=env
    )


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(
        (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: int(p.name)
    )


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _ranks(job: Path) -> tuple[dict, dict]:
    return tuple(json.loads((job / f"rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_jobs_of_an_optuna_sweep_train_each_trials_config_on_every_rank(tmp_path):
    """DDP inside a multirun with a sweeper that samples: every rank of job j trains job j's sampled config
    (not a config it composed or sampled itself), one dir per job, no second sweep, a fresh rank 1 and a fresh
    MASTER_PORT per job, and the float Optuna needs (optimized_metric)."""
    sweep = tmp_path / "sweep"
    proc = _sweep(
        tmp_path,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.seed=0",
        "task.model.optimizer.lr=interval(0.0005, 0.05)",
        "optimized_metric=val/acc",
        "trainer=ddp_cpu",
        "split=stratified_kfold",
        probe=True,
    )
    _check(proc)
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]  # exactly one dir per job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no second sweep, no stray outputs/
    records = []
    for num, job in enumerate(jobs):
        r0, r1 = _ranks(job)
        assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
        for key in ("stamp", "overrides", "job_num", "split_hashes", "master_port", "lr", "params_sha256"):
            assert r0[key] == r1[key], key  # this job's config, this job's group, identical replicas
        (override,) = [o for o in r0["overrides"] if o.startswith("task.model.optimizer.lr=")]
        assert float(override.split("=")[1]) == pytest.approx(r0["lr"])  # the trial's sampled value
        assert r0["job_num"] == num and read_metrics(job)["status"] == "ok"
        records.append((r0, r1))
    (a0, a1), (b0, b1) = records
    assert a0["lr"] != b0["lr"]
    assert a0["pid"] == b0["pid"] and a1["pid"] != b1["pid"]  # rank 0 is the sweep process; a fresh rank 1
    assert a0["master_port"] != b0["master_port"]  # no stale MASTER_PORT carried into job 1
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(read_metrics(j)["metrics"]["val/acc"] for j in jobs)
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_ok"] == 2 and "task.model.optimizer.lr" in summary["compare_axes"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_run_folds_in_parallel_and_the_sweep_is_summarised(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    proc = _sweep(
        tmp_path,
        f"hydra/launcher={launcher}",
        *extra,
        "split=stratified_kfold",
        "split.k=2",
        "split.fold=0,1",
    )
    _check(proc)
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    hashes = []
    for job in jobs:
        assert read_metrics(job)["status"] == "ok"
        hashes.append(json.loads((job / "split_manifest.json").read_text())["parts"]["val"]["sha256"])
    assert hashes[0] != hashes[1]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_ok"] == 2 and not summary["failed"]
    assert summary["conditions"][0]["metrics"]["val/acc"]["n"] == 2
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()


def test_a_failed_job_still_leaves_a_summary_that_lists_it(tmp_path):
    """Hydra skips on_multirun_end after a failed job; the summary is written at every job end instead."""
    sweep = tmp_path / "sweep"
    proc = _sweep(tmp_path, "split=kfold", "split.k=2", "split.fold=0,7")
    assert proc.returncode != 0  # the sweep reports the failure
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_jobs"] == 2 and summary["n_ok"] == 1
    (failed,) = summary["failed"]
    assert failed["overrides"]["split.fold"] == "7" and "fold must be" in failed["error"]
    assert "Failed jobs" in (sweep / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.ddp
def test_a_rank_that_dies_after_rank_0_succeeded_fails_the_job_in_metrics_json_too(tmp_path):
    """The exit code and metrics.json agree: rank 1 exits 3 after testing, so the job is failed, not ok."""
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = run_app(
        "trainer=ddp_cpu",
        *FAST,
        "+callbacks.die={_target_: app_callbacks.ExitAfterTest, rank: 1, code: 3}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode != 0
    record = read_metrics(run_dir)
    assert record["status"] == "failed" and "(1, 3)" in record["error"], record["error"]
    assert record["global_step"] == 3  # rank 0 itself had finished
