"""SplitRunDataModule with a real Trainer: the digits dataset, the manifest, resume checks and bit-exact
mid-epoch resume without any freezing callback (ExactResume)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from resume import StopAt
from torch import nn
from torch.utils.data import TensorDataset

from lightning_freeze.splitrun import (
    MANIFEST_NAME,
    Arms,
    ExactResume,
    Holdout,
    KFold,
    ResumableDataLoader,
    SplitManifestMismatch,
    SplitRunDataModule,
)
from lightning_freeze.tasks.digits import DigitsDataset


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch[:2]
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _OneCycleDropout(pl.LightningModule):
    """Dropout (global RNG) and a OneCycleLR sized from trainer.estimated_stepping_batches: the two things a
    resume loses without ExactResume (the loader is set up before the checkpoint's loader state is known)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(root, **kw):
    kw = {"max_steps": 2, "num_sanity_val_steps": 0, "enable_checkpointing": False, **kw}
    return pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kw
    )


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset()


def _data(n: int = 90) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def test_holdout_on_digits_writes_the_manifest(tmp_path, digits):
    dm = SplitRunDataModule(digits, split=Holdout(stratify=True), seed=0, batch_size=32)
    trainer = _trainer(tmp_path)
    trainer.fit(_Tiny(), datamodule=dm)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    n = len(digits)
    assert manifest["n"] == n and manifest["seed"] == 0 and manifest["spec"]["kind"] == "Holdout"
    assert (
        manifest["roles"] == {"train": "train", "val": "val", "test": "test"}
        and manifest["dataset"] == "DigitsDataset"
    )
    assert sum(p["size"] for p in manifest["parts"].values()) == n
    assert set(manifest["parts"]) == {"train", "val", "test"} and dm.has_test
    counts = manifest["parts"]["val"]["class_counts"]
    assert set(counts) == {"0", "1", "2", "3", "4"} and max(counts.values()) - min(counts.values()) <= 2
    parts = [dm.part(p) for p in ("train", "val", "test")]
    assert sum(p.size for p in parts) == n and np.unique(np.concatenate(parts)).size == n
    assert sum(isinstance(cb, ExactResume) for cb in trainer.callbacks) == 1  # setup attached it, once


def test_resume_with_a_different_split_is_refused(tmp_path, digits):
    dm = SplitRunDataModule(digits, split=KFold(k=5, fold=0), seed=0, batch_size=32)
    trainer = _trainer(tmp_path / "a")
    trainer.fit(_Tiny(), datamodule=dm)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    # same split: resumes fine (a fresh dir, so only the checkpoint's manifest is compared)
    same = SplitRunDataModule(digits, split=KFold(k=5, fold=0), seed=0, batch_size=32)
    _trainer(tmp_path / "b", max_steps=3).fit(_Tiny(), datamodule=same, ckpt_path=ckpt)
    other = SplitRunDataModule(digits, split=KFold(k=5, fold=1), seed=0, batch_size=32)
    with pytest.raises(SplitManifestMismatch, match="split differently") as err:
        _trainer(tmp_path / "c", max_steps=4).fit(_Tiny(), datamodule=other, ckpt_path=ckpt)
    assert "['train', 'val']" in str(err.value)
    # a manifest already in the run dir that records another split is refused too, naming the option
    with pytest.raises(SplitManifestMismatch, match="check_manifest"):
        _trainer(tmp_path / "a").fit(_Tiny(), datamodule=SplitRunDataModule(digits, split=KFold(), seed=1))
    SplitRunDataModule(
        digits, split=KFold(), seed=1, check_manifest=False, manifest_dir=tmp_path / "a"
    ).setup()


def test_labels_groups_from_fields_callables_and_arrays():
    from lightning_freeze.splitrun import GroupKFold

    data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    data.targets = np.arange(40) % 2
    data.site = np.arange(40) // 10
    split = GroupKFold(k=2)
    by_field = SplitRunDataModule(data, split=split, groups="site", seed=0)
    by_call = SplitRunDataModule(data, split=split, groups=lambda ds: ds.site, seed=0)
    by_array = SplitRunDataModule(data, split=split, groups=np.arange(40) // 10, labels=data.targets, seed=0)
    assert len({tuple(dm.split_parts.hashes.values()) for dm in (by_field, by_call, by_array)}) == 1
    parts = by_field.split_parts
    assert not set(data.site[parts["train"]]) & set(data.site[parts["val"]])


def test_dataset_factory_is_split_in_setup():
    calls = []

    def factory():
        calls.append(1)
        return _data(40)

    dm = SplitRunDataModule(factory, split=KFold(k=4), labels=None)
    assert calls == []  # nothing built at construction
    dm.setup("fit")
    assert calls == [1] and dm.part("val").size == 10


def test_return_indices_and_loader_options():
    data = TensorDataset(torch.arange(20).float(), torch.arange(20) % 2)
    labels = np.arange(20) % 2
    dm = SplitRunDataModule(
        data,
        split=Holdout(stratify=True),
        labels=labels,
        return_indices=True,
        batch_size=4,
        loader_options={"drop_last": True, "pin_memory": False},
    )
    dm.setup("fit")
    x, y, idx = next(iter(dm.val_dataloader()))
    assert torch.equal(x.long(), idx) and set(idx.tolist()) <= set(dm.part("val").tolist())
    assert (
        dm.train_dataloader().drop_last and not dm.val_dataloader().drop_last
    )  # evaluation sees every sample
    plain = SplitRunDataModule(data, split=Holdout(stratify=True), labels=labels, batch_size=4)
    assert len(next(iter(plain.val_dataloader()))) == 2


def test_another_arm_in_the_same_run_dir_is_refused(tmp_path):
    """Arms A and B are one split (same part hashes) but train on different parts: not the same run."""
    data, labels = TensorDataset(torch.zeros(60, 1)), np.arange(60) % 3
    arm_a = SplitRunDataModule(
        data, split=Arms(arms={"A": [0], "B": [1, 2]}, arm="A"), labels=labels, manifest_dir=tmp_path
    )
    arm_a.setup("fit")
    arm_b = SplitRunDataModule(data, split=Arms(arms={"A": [0], "B": [1, 2]}, arm="B"), labels=labels)
    with pytest.raises(SplitManifestMismatch, match="it trained on"):
        arm_b.check_run_dir(tmp_path)
    arm_a.check_run_dir(tmp_path)  # the same arm again is fine


def test_arms_train_on_the_chosen_arm():
    data = TensorDataset(torch.zeros(60, 1))
    labels = np.arange(60) % 3
    dm = SplitRunDataModule(data, split=Arms(arms={"A": [0], "B": [1, 2]}, arm="B"), labels=labels, seed=0)
    assert set(labels[dm.part("train")]) == {1, 2} and set(labels[dm.part("val")]) == {1, 2}
    assert not dm.has_test and dm.manifest["roles"]["train"] == "B/train"


def _fit(tmp_path, name, model, *, ckpt=None, stop_at=None, callbacks=(), datamodule=None, loader=None):
    cbs = list(callbacks) + ([StopAt(stop_at, str(tmp_path / f"{name}.ckpt"))] if stop_at else [])
    trainer = _trainer(tmp_path / name, max_epochs=3, max_steps=-1, callbacks=cbs)
    if datamodule is not None:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    else:
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "stop_at", [4, 9, 15]
)  # mid-epoch 1, the last batch of epoch 1 (9 per epoch), epoch 2
def test_mid_epoch_resume_is_bit_exact_with_onecycle_and_dropout_and_no_freezing_callback(tmp_path, stop_at):
    def module():
        return SplitRunDataModule(_data(), split=KFold(k=5, fold=2), seed=3, batch_size=8, labels=None)

    torch.manual_seed(0)
    full = _fit(tmp_path, "full", _OneCycleDropout(), datamodule=module())
    torch.manual_seed(0)
    _fit(tmp_path, "first", _OneCycleDropout(), datamodule=module(), stop_at=stop_at)
    torch.manual_seed(99)  # a different init and RNG: everything must come from the checkpoint
    resumed = _fit(tmp_path, "second", _OneCycleDropout(), datamodule=module(), ckpt=tmp_path / "first.ckpt")
    assert [k for k in full if not torch.equal(full[k], resumed[k])] == []
    ckpt = torch.load(tmp_path / "first.ckpt", weights_only=True)  # plain containers only
    assert len(ckpt["callbacks"]["ExactResume"]["rng"]) == 1


def test_a_bare_resumable_loader_needs_exact_resume(tmp_path):
    """The same resume with a bare ResumableDataLoader: exact with ExactResume, not without it."""

    def loader():
        return ResumableDataLoader(_data(72), batch_size=8, shuffle=True, seed=5)

    torch.manual_seed(0)
    full = _fit(tmp_path, "full", _OneCycleDropout(), loader=loader())
    results = {}
    for with_callback in (True, False):
        name = f"with{with_callback}"
        callbacks = [ExactResume()] if with_callback else []
        torch.manual_seed(0)
        _fit(tmp_path, name, _OneCycleDropout(), loader=loader(), stop_at=4, callbacks=callbacks)
        torch.manual_seed(99)
        results[with_callback] = _fit(
            tmp_path,
            name + "b",
            _OneCycleDropout(),
            loader=loader(),
            ckpt=tmp_path / f"{name}.ckpt",
            callbacks=callbacks,
        )
    assert all(torch.equal(full[k], results[True][k]) for k in full)
    assert not all(torch.equal(full[k], results[False][k]) for k in full)
