"""The cluster recipes: two torchrun "nodes" on 127.0.0.1 with trainer.num_nodes=2, the SLURM launcher config
(one task per device), and a preempted job requeued by submitit into the same run dir, resumed with resume=last."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, read_metrics, run_app
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_freeze.app.main import CONFIG_NAME

TESTS = Path(__file__).parent
QUIET = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.logger=false",
    "freeze=none",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_launcher_config_has_one_task_per_device():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            CONFIG_NAME,
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "resume=last",
            ],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0
    plugin = instantiate(cfg.hydra.launcher)  # the real submitit launcher plugin takes these parameters
    assert plugin.params["tasks_per_node"] == 4


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_nodes_on_localhost(tmp_path):
    """`torchrun --nnodes 2` twice on 127.0.0.1: one process per "node", trainer.num_nodes=2, one run dir."""
    port = _free_port()
    run_dir = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "ddp_scripts"), env.get("PYTHONPATH", "")])
    torchrun = Path(sys.executable).with_name("torchrun")
    procs = []
    for node in (0, 1):
        command = [
            str(torchrun), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "lightning_freeze",
            "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_steps=4",
            "task.model.pretrained=false", *QUIET, f"hydra.run.dir={run_dir}",
            "+callbacks.probe={_target_: rank_probe.RankProbe, stamp: node}",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    r0, r1 = (json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["node_rank"], r1["node_rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
    assert r0["params_sha256"] == r1["params_sha256"] and r0["global_step"] == r1["global_step"] == 4
    assert r0["split_hashes"] == r1["split_hashes"]
    assert read_metrics(run_dir)["status"] == "ok"  # written once, by global rank 0


@pytest.mark.slow
def test_a_preempted_job_is_requeued_into_its_run_dir_and_resumes(tmp_path):
    """submitit's requeue (the path SLURM takes on a timeout or preemption), with its local executor: the job
    gets the requeue signal mid-training, Hydra's submitit launcher resubmits it, and the new attempt lands in
    the same run dir and continues from last.ckpt with resume=last."""
    sweep = tmp_path / "sweep"
    proc = run_app(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=1",  # the local executor signals 30 s before the limit: 30 s into each attempt
        "+hydra.launcher.max_num_timeout=3",
        "resume=last",
        "checkpoint.every_n_train_steps=4",
        "trainer.max_epochs=6",
        *QUIET,
        "+callbacks.slow={_target_: app_callbacks.SlowUntilResumed, seconds: 0.6}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = sweep / "0"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0"]
    result = read_metrics(job)
    assert result["status"] == "ok" and result["global_step"] == 72
    assert result["resumed_from"] == str(job / "checkpoints" / "last.ckpt")  # the same run dir
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "SIGUSR2" in logs  # the requeue signal did arrive
