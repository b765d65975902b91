"""SplitRunDataModule with a real Trainer: the digits dataset, the manifest, resume checks, option errors."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_freeze.splitrun import MANIFEST_NAME, SplitManifestMismatch, SplitRunDataModule, SplitSpecError
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


def _trainer(root, **kw):
    kw = {"max_steps": 2, **kw}
    return pl.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        **kw,
    )


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset()


def test_holdout_on_digits_writes_the_manifest(tmp_path, digits):
    dm = SplitRunDataModule(digits, split="holdout", seed=0, batch_size=32)
    _trainer(tmp_path).fit(_Tiny(), datamodule=dm)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    n = len(digits)
    assert manifest["n"] == n and manifest["seed"] == 0 and manifest["spec"]["kind"] == "holdout"
    assert sum(p["size"] for p in manifest["parts"].values()) == n
    assert set(manifest["parts"]) == {"train", "val", "test"} and dm.has_test
    counts = manifest["parts"]["val"]["class_counts"]
    assert set(counts) == {"0", "1", "2", "3", "4"} and max(counts.values()) - min(counts.values()) <= 2
    parts = [dm.part(p) for p in ("train", "val", "test")]
    assert sum(p.size for p in parts) == n and np.unique(np.concatenate(parts)).size == n


def test_resume_with_a_different_split_is_refused(tmp_path, digits):
    dm = SplitRunDataModule(digits, split="kfold", k=5, fold=0, seed=0, batch_size=32)
    trainer = _trainer(tmp_path / "a")
    trainer.fit(_Tiny(), datamodule=dm)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    # same split: resumes fine (a fresh dir, so only the checkpoint's manifest is compared)
    same = SplitRunDataModule(digits, split="kfold", k=5, fold=0, seed=0, batch_size=32)
    _trainer(tmp_path / "b", max_steps=3).fit(_Tiny(), datamodule=same, ckpt_path=ckpt)
    other = SplitRunDataModule(digits, split="kfold", k=5, fold=1, seed=0, batch_size=32)
    with pytest.raises(SplitManifestMismatch, match="split differently") as err:
        _trainer(tmp_path / "c", max_steps=4).fit(_Tiny(), datamodule=other, ckpt_path=ckpt)
    assert "['train', 'val']" in str(err.value)
    # a manifest already in the run dir that records another split is refused too, naming the option
    with pytest.raises(SplitManifestMismatch, match="check_manifest"):
        _trainer(tmp_path / "a").fit(_Tiny(), datamodule=SplitRunDataModule(digits, split="kfold", seed=1))
    SplitRunDataModule(
        digits, split="kfold", seed=1, check_manifest=False, manifest_dir=tmp_path / "a"
    ).setup()


def test_labels_groups_from_fields_callables_and_arrays():
    x = torch.randn(40, 3)
    data = TensorDataset(x, torch.arange(40) % 2)
    data.targets = np.arange(40) % 2
    data.site = np.arange(40) // 10
    by_field = SplitRunDataModule(data, split="kfold", k=2, groups="site", seed=0)
    by_call = SplitRunDataModule(data, split="kfold", k=2, groups=lambda ds: ds.site, seed=0)
    by_array = SplitRunDataModule(
        data, split="kfold", k=2, groups=np.arange(40) // 10, labels=data.targets, seed=0
    )
    hashes = {tuple(dm.make_plan().hashes.values()) for dm in (by_field, by_call, by_array)}
    assert len(hashes) == 1
    plan = by_field.make_plan()
    assert not set(data.site[plan["train"]]) & set(data.site[plan["val"]])


def test_return_indices_appends_the_dataset_index():
    data = TensorDataset(torch.arange(20).float(), torch.arange(20) % 2)
    dm = SplitRunDataModule(
        data, split="holdout", labels=np.arange(20) % 2, return_indices=True, batch_size=4
    )
    dm.setup("fit")
    x, y, idx = next(iter(dm.val_dataloader()))
    assert torch.equal(x.long(), idx) and set(idx.tolist()) <= set(dm.part("val").tolist())
    plain = SplitRunDataModule(data, split="holdout", labels=np.arange(20) % 2, batch_size=4)
    plain.setup("fit")
    assert len(next(iter(plain.val_dataloader()))) == 2


def test_arms_train_on_the_chosen_arm():
    data = TensorDataset(torch.zeros(60, 1))
    labels = np.arange(60) % 3
    dm = SplitRunDataModule(data, split="arms", arms={"A": [0], "B": [1, 2]}, arm="B", labels=labels, seed=0)
    dm.setup("fit")
    assert set(labels[dm.part("train")]) == {1, 2} and set(labels[dm.part("val")]) == {1, 2}
    assert not dm.has_test


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"split": "kfold", "labels": None}, "`labels`"),
        ({"split": "kfold", "labels": "no_such_field"}, "`labels='no_such_field'`"),
        ({"split": "kfold", "k": 1, "stratify": False}, "`k`"),
        ({"split": "kfold", "fold": 7, "stratify": False}, "`fold`"),
        ({"split": "holdout", "ratios": {"train": 0.5, "val": 0.2}, "stratify": False}, "`ratios`"),
        ({"split": "holdout", "ratios": {"tr": 0.5, "val": 0.5}, "stratify": False}, "`ratios`"),
        ({"split": "arms", "arms": {"A": 0.5, "B": 0.5}, "arm": "C", "stratify": False}, "`arm`"),
        ({"split": "kfold", "groups": [0, 1], "stratify": False}, "`groups`"),
        ({"split": "bootstrap"}, "`split`"),
    ],
)
def test_bad_options_fail_at_setup_naming_the_option(kwargs, option):
    data = TensorDataset(torch.zeros(30, 1))  # no labels field
    with pytest.raises(SplitSpecError) as err:
        dm = SplitRunDataModule(data, **kwargs)
        dm.setup("fit")
    assert option in str(err.value)


def test_test_dataloader_without_a_test_part_names_test_ratio():
    data = TensorDataset(torch.zeros(30, 1))
    dm = SplitRunDataModule(data, split="kfold", stratify=False)
    dm.setup("test")
    with pytest.raises(SplitSpecError, match="test_ratio"):
        dm.test_dataloader()
