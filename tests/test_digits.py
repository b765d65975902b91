"""The built-in digits task: data, pretrain cache, and real transfer learning with a frozen backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from lightning_freeze.app.main import CONFIG_NAME, train
from lightning_freeze.tasks.digits import (
    DigitsClassifier,
    DigitsDataset,
    default_cache_dir,
    pretrained_backbone_state,
)

SMALL = {"epochs": 2}  # a quick pretraining for the cache tests


def test_dataset_remaps_labels_and_is_map_style():
    ds = DigitsDataset(classes=[5, 6, 7, 8, 9])
    assert len(ds) == len(ds.labels) > 850
    assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64
    assert sorted(np.unique(ds.labels).tolist()) == [0, 1, 2, 3, 4]
    assert np.bincount(ds.labels).min() > 170  # balanced classes
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and -1.0 <= x.min() <= x.max() <= 1.0
    assert int(y) == ds.labels[0]
    first = DigitsDataset(classes=[0, 1])
    assert set(first.labels.tolist()) == {0, 1} and first.num_classes == 2


@pytest.mark.parametrize("classes", [[], [1, 1], [10]])
def test_dataset_rejects_bad_classes(classes):
    with pytest.raises(ValueError, match="classes"):
        DigitsDataset(classes=classes)


def test_model_layout_for_freezing():
    model = DigitsClassifier(pretrained=False)
    names = [name for name, _ in model.named_children()]
    assert names[:2] == ["backbone", "head"]
    assert len(model.backbone) == 3
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, torch.nn.Dropout2d | torch.nn.Dropout) for m in model.modules())
    assert model(model.example_input_array).shape == (2, 5)


def test_optimizer_and_scheduler_from_config():
    from functools import partial

    model = DigitsClassifier(
        pretrained=False,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        scheduler={"scheduler": partial(torch.optim.lr_scheduler.StepLR, step_size=1), "interval": "step"},
    )
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    # every parameter goes to the optimizer: no requires_grad filtering (callbacks regroup them)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "step"
    plain = DigitsClassifier(pretrained=False).configure_optimizers()
    assert isinstance(plain, torch.optim.AdamW)


def test_pretrain_cache_is_reused(tmp_path: Path):
    state1, path1, cached1 = pretrained_backbone_state(pretrain=SMALL, cache_dir=tmp_path)
    state2, path2, cached2 = pretrained_backbone_state(pretrain=SMALL, cache_dir=tmp_path)
    assert (cached1, cached2) == (False, True)
    assert path1 == path2 and path1.parent == tmp_path and path1.name.startswith("digits_pretrained_")
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    assert [p.name for p in tmp_path.iterdir()] == [path1.name]  # no temp files left behind
    # different settings: a different file; same settings: the same weights (pretraining is deterministic)
    _, path3, cached3 = pretrained_backbone_state(pretrain={**SMALL, "seed": 1}, cache_dir=tmp_path)
    assert path3 != path1 and not cached3
    path1.unlink()
    state4, _, cached4 = pretrained_backbone_state(pretrain=SMALL, cache_dir=tmp_path)
    assert not cached4 and all(torch.equal(state1[k], state4[k]) for k in state1)


def test_pretraining_does_not_touch_global_rng(tmp_path: Path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrained_backbone_state(pretrain=SMALL, cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path):
    _, path, _ = pretrained_backbone_state(pretrain=SMALL, cache_dir=tmp_path)
    path.write_bytes(b"not a checkpoint")
    state, _, cached = pretrained_backbone_state(pretrain=SMALL, cache_dir=tmp_path)
    assert not cached and set(state) == set(DigitsClassifier(pretrained=False).backbone.state_dict())


def test_model_loads_the_cached_backbone(tmp_path: Path):
    first = DigitsClassifier(pretrain=SMALL, cache_dir=str(tmp_path))
    second = DigitsClassifier(pretrain=SMALL, cache_dir=str(tmp_path))
    assert (first.pretrained_was_cached, second.pretrained_was_cached) == (False, True)
    for a, b in zip(first.backbone.state_dict().values(), second.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LIGHTNING_FREEZE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIGHTNING_FREEZE_CACHE")
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path / "outputs" / ".cache"


def test_frozen_backbone_transfers_well(tmp_path: Path):
    """The default job: backbone pretrained on 0-4 and frozen; only the head learns 5-9."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            CONFIG_NAME, overrides=["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
        )
    pretrained = DigitsClassifier().backbone.state_dict()  # from the (session) cache
    result = train(cfg, run_dir=tmp_path)
    assert result["status"] == "ok"
    assert result["trainable_fraction"] < 0.05
    assert result["metrics"]["val/acc"] >= 0.9
    assert result["metrics"]["test/acc"] >= 0.9
    assert result["epochs"] == cfg.trainer.max_epochs
    # the frozen backbone (weights and BatchNorm statistics) is exactly the pretrained one
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    for key, value in pretrained.items():
        assert torch.equal(state[f"backbone.{key}"], value), key
