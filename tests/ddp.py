"""Run a DDP script from tests/ddp_scripts in real processes and collect each rank's JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning.pytorch as pl

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_scripts")


def run_ddp_script(name: str, out_dir, *args: str, world_size: int = 2, timeout: int = 180) -> list[dict]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
    }
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), str(out_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    reports = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as fh:
            reports.append(json.load(fh))
    return reports


def write_rank_report(out_dir, result: dict) -> None:
    """Inside a DDP run, on every rank: write ``result`` as ``rank<r>.json``, which :func:`run_ddp_script` reads."""
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as fh:
        json.dump(result, fh)


class WrapperProbe(pl.Callback):
    """Records, at every training batch, ``[step, parameter tensors the live DDP wrapper trains,
    find_unused_parameters]`` in ``steps`` (frozen parameters must not be in the all-reduce), and at train end
    whether the replicas are bit-identical, in ``replicas_equal``."""

    def __init__(self) -> None:
        self.steps: list[list] = []
        self.replicas_equal: bool | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ddp = trainer.strategy.model
        trained = sum(p.requires_grad for p in ddp.module.parameters())
        self.steps.append([trainer.global_step, trained, bool(ddp.find_unused_parameters)])

    def on_train_end(self, trainer, pl_module) -> None:
        self.replicas_equal = replicas_equal(pl_module)

    def changes(self) -> list[list]:
        """The steps at which the trained-parameter count changed, the first step included."""
        return [s for i, s in enumerate(self.steps) if i == 0 or s[1] != self.steps[i - 1][1]]


def replicas_equal(module) -> bool:
    """Inside a DDP run, on every rank: do all ranks hold bit-identical floating-point state?"""
    import torch

    flat = torch.cat(
        [v.detach().flatten().double() for v in module.state_dict().values() if v.is_floating_point()]
    )
    gathered = [torch.zeros_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def shutdown() -> None:
    """End a DDP script cleanly on every rank: wait for all ranks, then close the process group.

    Without it, a rank that exits first can close its gloo connections while another rank's process
    group is being destroyed at interpreter exit, which aborts that process (SIGABRT) now and then.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
