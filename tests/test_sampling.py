"""Shard samplers, the resumable train loader (real Trainer, resume at every step), and exact DDP evaluation
(real 2-process gloo DDP on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler, TensorDataset

from lightning_freeze.splitrun.sampling import EvalShardSampler, ResumableDataLoader, TrainShardSampler

SCRIPTS = Path(__file__).parent / "ddp_scripts"


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 300),
    world=st.integers(1, 5),
    epoch=st.integers(0, 3),
    pad=st.booleans(),
    fixed=st.booleans(),
)
def test_train_shards_are_disjoint_equal_and_cover(n, world, epoch, pad, fixed):
    indices = np.arange(1000, 1000 + n)
    remainder = "pad" if pad else "drop"
    shards = []
    for rank in range(world):
        s = TrainShardSampler(
            indices, num_replicas=world, rank=rank, seed=7, remainder=remainder, fixed_shards=fixed
        )
        s.set_epoch(epoch)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len({len(sh) for sh in shards}) == 1  # every rank: the same number of samples, hence batches
    flat = [i for sh in shards for i in sh]
    if pad:
        assert set(flat) == set(indices.tolist()) and len(flat) - n < world
    else:
        assert len(set(flat)) == len(flat) and n - len(flat) < world  # disjoint; drops < world samples


def test_train_shards_reshuffle_per_epoch_deterministically():
    a = TrainShardSampler(100, num_replicas=2, rank=0, seed=1)
    b = TrainShardSampler(100, num_replicas=2, rank=0, seed=1)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != e0
    assert list(TrainShardSampler(100, shuffle=False)) == list(range(100))


def test_fixed_shards_keep_each_rank_on_the_same_samples_in_a_new_order():
    """What a per-rank cache needs: rank r sees the same sample set every epoch, shuffled within it."""
    for rank in range(2):
        s = TrainShardSampler(101, num_replicas=2, rank=rank, seed=4, fixed_shards=True)
        epochs = []
        for epoch in range(3):
            s.set_epoch(epoch)
            epochs.append(list(s))
        assert set(epochs[0]) == set(epochs[1]) == set(epochs[2]) and len(epochs[0]) == 50
        assert epochs[0] != epochs[1] != epochs[2]
    moving = TrainShardSampler(101, num_replicas=2, rank=0, seed=4)
    first = set(moving)
    moving.set_epoch(1)
    assert set(moving) != first


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 6))
def test_eval_shards_cover_every_sample_exactly_once(n, world):
    indices = np.arange(n) * 3
    shards = [list(EvalShardSampler(indices, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for sh in shards for i in sh) == indices.tolist()
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_samplers_are_distributed_samplers_so_lightning_keeps_them():
    assert isinstance(TrainShardSampler(4, num_replicas=1, rank=0), DistributedSampler)
    assert isinstance(EvalShardSampler(4, num_replicas=1, rank=0), DistributedSampler)


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].tolist())
        return self.layer(batch[0].float()[:, None]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_every_step_replays_the_same_batches(tmp_path, num_workers):
    """Stopped at any step (mid-epoch or at an epoch end) and resumed: exactly the uninterrupted batches."""

    def loader():
        return ResumableDataLoader(
            TensorDataset(torch.arange(14)), batch_size=4, shuffle=True, seed=3, num_workers=num_workers
        )

    kwargs = dict(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    full = _Recorder()
    ckpt = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)
    pl.Trainer(callbacks=[ckpt], **kwargs).fit(full, train_dataloaders=loader())
    assert len(full.seen) == 8 and full.seen[:4] != full.seen[4:]  # 2 epochs, reshuffled
    steps = range(1, 8) if num_workers == 0 else (2, 4, 5)
    for step in steps:
        resumed = _Recorder()
        with _no_resume_warning():
            pl.Trainer(enable_checkpointing=False, **kwargs).fit(
                resumed, train_dataloaders=loader(), ckpt_path=tmp_path / f"step={step}.ckpt"
            )
        assert resumed.seen == full.seen[step:], f"resumed at step {step}"


class _no_resume_warning:
    """Lightning warns 'dataloader is not resumable' for loaders without state_dict: ours must not trigger it."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.records if "not resumable" in str(w.message)]


def test_resumable_loader_state_roundtrip_without_trainer():
    data = TensorDataset(torch.arange(11))
    loader = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=0)
    full = [b[0].tolist() for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["batches_consumed"] == 2 and state["epoch"] == 0
    fresh = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=0)
    fresh.load_state_dict(state)
    assert [b[0].tolist() for b in fresh] == full[2:]
    assert [b[0].tolist() for b in fresh] == full  # the skip applies once


def test_resumable_loader_with_a_foreign_deterministic_sampler():
    """Lightning swaps in a SequentialSampler for overfit_batches: still resumable, by dropping batches."""
    data = TensorDataset(torch.arange(10))
    loader = ResumableDataLoader(data, batch_size=3, sampler=torch.utils.data.SequentialSampler(range(10)))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    fresh = ResumableDataLoader(data, batch_size=3, sampler=torch.utils.data.SequentialSampler(range(10)))
    fresh.load_state_dict(state)
    assert [b[0].tolist() for b in fresh] == [[3, 4, 5], [6, 7, 8], [9]]
    done = {**state, "batches_consumed": len(loader)}  # saved at the epoch end: the next epoch is whole
    fresh.load_state_dict(done)
    assert len([b for b in fresh]) == 4


@pytest.mark.ddp
def test_two_process_ddp_validation_is_exact_and_shards_are_disjoint(tmp_path):
    """Odd-sized val part, 2 gloo ranks: torchmetrics accuracy equals the single-process count; no hang."""
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "splitrun_ddp.py"), str(out), "2", str(tmp_path)],
        timeout=240,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"DDP script failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    val, train = res["val_part"], res["train_part"]
    assert len(val) % 2 == 1
    assert res["val_acc"] == pytest.approx(res["correct"] / len(val), abs=1e-7)
    # validate(): every val sample exactly once across the two ranks
    assert sorted(res["validate"][0] + res["validate"][1]) == sorted(val)
    assert res["gathered"] == sorted(val)  # torchmetrics' uneven all_gather of a cat state is exact too
    # fit(): train shards disjoint, the same number of batches per rank, val once per rank-union
    r0, r1 = res["fit"]
    assert not set(r0["train"]) & set(r1["train"]) and set(r0["train"]) | set(r1["train"]) <= set(train)
    assert r0["batches"] == r1["batches"] > 0
    assert sorted(r0["val"] + r1["val"]) == sorted(val)
    assert json.loads((tmp_path / "split_manifest.json").read_text())["parts"]["val"]["size"] == len(val)
