"""Cross-validation to a decision with real components: a 2-process gloo DDP validation recorded once per
sample, and real Hydra multiruns of the app on the digits task (k-fold OOF predictions and fold ensembles
checked against each fold's own model; nested CV and the best-condition line on a sweep with a known winner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_app

from lightning_freeze.splitrun import (
    EnsembleError,
    KFold,
    NestedKFold,
    checkpoint_ensemble,
    fold_ensemble,
    oof_predictions,
)
from lightning_freeze.splitrun.assign import part_hash
from lightning_freeze.splitrun.prediction_files import read_predictions

SCRIPTS = Path(__file__).parent / "ddp_scripts"
FAST = [
    "task.model.pretrained=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.logger=false",
    "freeze=none",
]


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.ddp
def test_ddp_predictions_are_gathered_exactly_once_and_equal_the_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "predictions_ddp.py"), str(tmp_path), "2"],
        timeout=240,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"DDP script failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    sys.path.insert(0, str(SCRIPTS))
    try:
        from predictions_ddp import data, model
    finally:
        sys.path.remove(str(SCRIPTS))
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    x, y = data().tensors
    net = model().eval()
    for stage in ("val", "test"):
        rows = read_predictions(tmp_path / f"predictions.{stage}.npz")
        part = np.asarray(ranks[stage])
        assert np.array_equal(rows["index"], part)  # every sample of the part once, in dataset order
        assert rows["part_sha256"] == part_hash(part) and rows["kind"] == "logits"
        with torch.no_grad():
            expected = net(x[torch.as_tensor(part)]).numpy()
        np.testing.assert_allclose(rows["output"], expected, rtol=0, atol=1e-6)
        assert np.array_equal(rows["target"], y.numpy()[part])
    assert sorted(ranks["val_rows_per_rank"]) == [16, 17]  # each rank recorded only its own shard


@pytest.mark.slow
def test_kfold_sweep_oof_predictions_and_fold_ensemble_match_each_fold_model(tmp_path):
    """The app records every job's predictions by default (callbacks.predictions)."""
    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset

    sweep = tmp_path / "sweep"
    proc = run_app(
        "-m",
        "split=stratified_kfold",
        "split.k=3",
        "split.fold=range(3)",
        "split.test_ratio=0.2",
        *FAST,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    _check(proc)
    data = DigitsDataset(classes=[5, 6, 7, 8, 9])
    x, labels = data.images, np.asarray(data.labels)
    oof = oof_predictions(sweep)
    test = KFold(k=3, fold=0, stratify=True, test_ratio=0.2).split(len(data), labels, seed=0)["test"]
    assert np.array_equal(oof.index, np.setdiff1d(np.arange(len(data)), test))  # every sample once, in order
    assert np.array_equal(oof.target, labels[oof.index])
    ensemble = fold_ensemble(sweep)
    fold_probs = []
    for fold, job in sorted(oof.jobs.items()):
        model = DigitsClassifier.load_from_checkpoint(
            Path(job) / "checkpoints" / "last.ckpt", weights_only=True
        )
        model.eval()
        rows = oof.fold == fold
        with torch.no_grad():
            val_out = model(x[torch.as_tensor(oof.index[rows])]).numpy()
            fold_probs.append(torch.softmax(model(x[torch.as_tensor(test)]), dim=1).numpy())
        np.testing.assert_allclose(
            oof.output[rows], val_out, rtol=0, atol=1e-5
        )  # its own fold model's output
        metrics = json.loads((Path(job) / "metrics.json").read_text())["metrics"]
        predicted, truth = oof.output[rows].argmax(1), oof.target[rows]
        macro = np.mean(
            [(predicted[truth == c] == c).mean() for c in np.unique(truth)]
        )  # torchmetrics' default
        assert macro == pytest.approx(metrics["val/acc"], abs=1e-6)
    np.testing.assert_allclose(ensemble.output, np.mean(fold_probs, axis=0), rtol=0, atol=1e-5)
    from_checkpoints = checkpoint_ensemble(
        sweep, lambda path: DigitsClassifier.load_from_checkpoint(path, weights_only=True), data
    )
    assert np.array_equal(from_checkpoints.index, test)
    np.testing.assert_allclose(from_checkpoints.output, ensemble.output, rtol=0, atol=1e-5)
    with pytest.raises(EnsembleError, match="does not reproduce the sweep's test part"):
        checkpoint_ensemble(
            sweep, DigitsClassifier.load_from_checkpoint, DigitsDataset(classes=[0, 1, 2, 3, 4])
        )
    summary = json.loads((sweep / "summary.json").read_text())
    (entry,) = summary["oof"]
    assert entry["complete"] and entry["metrics"]["oof/acc"] == pytest.approx(
        (oof.output.argmax(1) == oof.target).mean()
    )
    assert summary["ensembles"][0]["metrics"]["acc"] == pytest.approx(ensemble.metrics["acc"])
    assert (sweep / "oof_predictions.npz").is_file() and (sweep / "summary.png").is_file()


@pytest.mark.slow
def test_nested_sweep_selects_on_inner_folds_and_names_the_known_winner(tmp_path):
    """lr=0 cannot learn: it must lose every inner selection and the best-condition line, significantly."""
    sweep = tmp_path / "sweep"
    proc = run_app(
        "-m",
        "split=nested_kfold",
        "split.outer_k=3",
        "split.inner_k=2",
        "split.outer_fold=range(3)",
        "split.inner_fold=range(2)",
        "task.model.optimizer.lr=0.0,0.003",
        *FAST,
        "trainer.limit_train_batches=8",
        "trainer.enable_checkpointing=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    _check(proc)
    summary = json.loads((sweep / "summary.json").read_text())
    winner = "task.model.optimizer.lr=0.003"
    best = summary["decision"]
    assert best["best"] == winner and best["significant"] is True and best["comparison"]["pairs"] == 6
    nested = summary["nested"]
    assert [f["selected"] for f in nested["outer_folds"]] == [winner] * 3 and nested["estimate"]["n"] == 3
    # the manifests show each job trained and validated on the inner split of its outer fold's training part
    data_n = json.loads((sweep / "0" / "split_manifest.json").read_text())["n"]
    labels = None
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        manifest = json.loads((job / "split_manifest.json").read_text())
        spec = manifest["spec"]
        if labels is None:
            from lightning_freeze.tasks.digits import DigitsDataset

            labels = np.asarray(DigitsDataset(classes=[5, 6, 7, 8, 9]).labels)
            assert labels.size == data_n
        parts = NestedKFold(3, 2, spec["outer_fold"], spec["inner_fold"], stratify=True).split(
            data_n, labels, seed=0
        )
        assert {name: p["sha256"] for name, p in manifest["parts"].items()} == parts.hashes
        assert not set(parts["test"]) & (set(parts["train"]) | set(parts["val"]))
    for fold in nested["outer_folds"]:
        scores = [
            json.loads((job / "metrics.json").read_text())["metrics"]["test/acc"]
            for job in sweep.iterdir()
            if job.is_dir()
            and job.name.isdigit()
            and json.loads((job / "split_manifest.json").read_text())["spec"]["outer_fold"]
            == fold["outer_fold"]
            and "lr=0.003" in " ".join(json.loads((job / "metrics.json").read_text())["overrides"])
        ]
        assert fold["outer_score"] == pytest.approx(sum(scores) / len(scores))
    assert "Nested estimate (test/acc)" in (sweep / "summary.md").read_text()


def _validate(module, dm, root, **recorder):
    import lightning.pytorch as pl

    from lightning_freeze.splitrun import PredictionRecorder

    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[PredictionRecorder(stages=("val",), **recorder)],
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    return read_predictions(root / "predictions.val.npz")


def test_recorder_takes_a_transformers_model_output_from_dict_batches(tmp_path):
    """BERT behind forward(**batch) returning a ModelOutput: its logits, the batch's labels, dataset order."""
    from hf_models import TextData, TextModule

    from lightning_freeze.splitrun import SplitRunDataModule

    torch.manual_seed(0)
    data = TextData(40)
    dm = SplitRunDataModule(data, split=KFold(k=4, fold=2), batch_size=6)
    module = TextModule("bert").eval()
    rows = _validate(module, dm, tmp_path)
    val = dm.part("val")
    with torch.no_grad():
        expected = module.model(input_ids=data.ids[val], attention_mask=data.mask[val]).logits.numpy()
    assert np.array_equal(rows["index"], val) and np.array_equal(rows["target"], data.labels[val].numpy())
    np.testing.assert_allclose(rows["output"], expected, rtol=0, atol=1e-5)
    assert rows["kind"] == "logits"


def test_recorder_takes_the_wrapped_model_output_and_refuses_outputs_that_are_not_per_sample(tmp_path):
    import lightning.pytorch as pl
    import torchmetrics
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_freeze.splitrun import SplitRunDataModule

    class Wrapped(pl.LightningModule):
        """Calls its wrapped model directly (never self(x)), then a metric (a parameter-free child)."""

        def __init__(self, pooled: bool = False) -> None:
            super().__init__()
            self.model = nn.Linear(3, 4)
            self.acc = torchmetrics.Accuracy("multiclass", num_classes=4)
            self.pooled = pooled

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            self.acc(logits, y)
            return logits.mean(0, keepdim=True) if self.pooled else None

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(30, 3), torch.arange(30) % 4)
    dm = SplitRunDataModule(data, split=KFold(k=3, fold=1), batch_size=4, labels=None)
    module = Wrapped()
    rows = _validate(module, dm, tmp_path, kind="logits")
    val = torch.as_tensor(dm.part("val"))
    with torch.no_grad():
        np.testing.assert_allclose(
            rows["output"], module.model(data.tensors[0][val]).numpy(), rtol=0, atol=1e-6
        )
    pooled = Wrapped(pooled=True)
    with pytest.raises(RuntimeError, match="output has 1 rows but the batch holds 4 samples"):
        _validate(pooled, dm, tmp_path / "pooled")
    assert not any(m._forward_hooks for m in [*module.modules(), *pooled.modules()])  # no hook of ours stays


@pytest.mark.slow
def test_optuna_sweep_summary_names_the_best_trial_and_its_run_dir(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.seed=0",
        "task.model.optimizer.lr=interval(0.0001, 0.01)",
        "optimized_metric=val/acc",
        *FAST,
        "trainer.enable_checkpointing=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    _check(proc)
    summary = json.loads((sweep / "summary.json").read_text())
    optuna = summary["optuna"]
    best_job = Path(optuna["run_dir"])
    result = json.loads((best_job / "metrics.json").read_text())
    assert result["metrics"]["val/acc"] == pytest.approx(optuna["best_value"])
    assert f"task.model.optimizer.lr={optuna['overrides']['task.model.optimizer.lr']}" in result["overrides"]
    assert summary["decision"]["metric"] == "val/acc"  # the sweep's optimized_metric
    assert summary["decision"]["mean"] == pytest.approx(optuna["best_value"])  # one job per trial


@pytest.mark.slow
@pytest.mark.ddp
def test_app_ddp_job_records_its_validation_part_once(tmp_path):
    """The app under trainer=ddp_cpu (2 gloo ranks): one predictions file, every val sample once."""
    run_dir = tmp_path / "run"
    proc = run_app(
        "trainer=ddp_cpu",
        "split=kfold",
        "split.fold=1",
        *FAST,
        "trainer.limit_train_batches=3",
        "trainer.enable_checkpointing=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    _check(proc)
    rows = read_predictions(run_dir / "predictions.val.npz")
    manifest = json.loads((run_dir / "split_manifest.json").read_text())
    assert rows["index"].size == manifest["parts"]["val"]["size"] and np.all(np.diff(rows["index"]) > 0)
    assert rows["part_sha256"] == manifest["parts"]["val"]["sha256"]
    # k-fold without a test part: no test pass, so no test predictions
    assert sorted(p.name for p in run_dir.glob("predictions.*")) == ["predictions.val.npz"]


def test_validate_after_fit_records_the_validate_call_own_loader(tmp_path):
    """fit() on fold 0, then validate() on fold 1: the rows are fold 1's samples, in their own order."""
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_freeze.splitrun import PredictionRecorder, SplitRunDataModule

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(3, 2)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    folds = [
        SplitRunDataModule(data, split=KFold(k=4, fold=f), batch_size=4, labels=None, check_manifest=False)
        for f in (0, 1)
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[PredictionRecorder(stages=("val",))],
    )
    net = Net()
    trainer.fit(net, datamodule=folds[0])
    trainer.validate(net, datamodule=folds[1], verbose=False)
    rows = read_predictions(tmp_path / "predictions.val.npz")
    val = folds[1].part("val")
    assert np.array_equal(rows["index"], val)
    with torch.no_grad():
        np.testing.assert_allclose(rows["output"], net(data.tensors[0][val]).numpy(), rtol=0, atol=1e-6)
