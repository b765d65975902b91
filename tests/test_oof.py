"""Cross-validation to a decision, on sweep dirs written as the app writes them: out-of-fold predictions,
fold ensembles, the best-condition line, nested CV selection, Optuna's best trial and the report CLI.
The same features on real multiruns and real DDP are in test_cv_app.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from sweep_fixtures import write_job

from lightning_freeze.splitrun import (
    EnsembleError,
    IncompleteOOFError,
    KFold,
    NestedKFold,
    fold_ensemble,
    oof_predictions,
)
from lightning_freeze.splitrun.report import cli, write_summary

N = 120
LABELS = np.arange(N) % 3


def _logits(fold: int):
    """A fold model's outputs: a function of the sample and of the fold, so each row tells who made it."""

    def rows(index: np.ndarray) -> np.ndarray:
        base = np.eye(3)[LABELS[index]] * 2.0 + 0.01 * index[:, None]
        return base + 0.1 * fold * np.array([1.0, -1.0, 0.5])

    return rows


def _kfold_sweep(root, k=4, test_ratio=0.25, failed=(), skip=(), seeds=None):
    seeds = seeds or {}
    for fold in range(k):
        if fold in skip:
            continue
        write_job(
            root / str(fold),
            ["split=kfold", f"split.fold={fold}"],
            KFold(k=k, fold=fold, stratify=True, test_ratio=test_ratio),
            N,
            {"val/acc": 0.8 + 0.01 * fold, "test/acc": 0.75},
            status="failed" if fold in failed else "ok",
            labels=LABELS,
            outputs=_logits(fold),
            split_seed=seeds.get(fold, 0),
        )
    return root


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_oof_predictions_cover_every_sample_once_in_dataset_order_from_its_fold_model(tmp_path):
    sweep = _kfold_sweep(tmp_path)
    oof = oof_predictions(sweep)
    test = KFold(k=4, fold=0, stratify=True, test_ratio=0.25).split(N, LABELS, seed=0)["test"]
    assert np.array_equal(oof.index, np.setdiff1d(np.arange(N), test))  # sorted, every non-test sample once
    for fold in range(4):
        val = KFold(k=4, fold=fold, stratify=True, test_ratio=0.25).split(N, LABELS, seed=0)["val"]
        rows = np.searchsorted(oof.index, val)
        assert (oof.fold[rows] == fold).all()
        assert np.array_equal(oof.output[rows], _logits(fold)(val))  # exactly its fold model's output
    assert np.array_equal(oof.target, LABELS[oof.index]) and oof.kind == "logits"
    summary = write_summary(sweep, with_plot=False)
    (entry,) = summary["oof"]
    assert entry["complete"] and entry["n"] == oof.index.size and entry["metrics"]["oof/acc"] == 1.0
    saved = np.load(sweep / "oof_predictions.npz")
    assert np.array_equal(saved["index"], oof.index) and np.array_equal(saved["output"], oof.output)


@pytest.mark.parametrize("how", ["failed", "missing"])
def test_a_missing_or_failed_fold_is_named_and_no_oof_score_is_made(tmp_path, how):
    sweep = _kfold_sweep(
        tmp_path, failed=(2,) if how == "failed" else (), skip=(2,) if how == "missing" else ()
    )
    expected = "fold 2: job" if how == "failed" else "fold 2: no job of this sweep ran it"
    with pytest.raises(IncompleteOOFError, match=expected):
        oof_predictions(sweep)
    summary = write_summary(sweep, with_plot=False)
    (entry,) = summary["oof"]
    assert not entry["complete"] and "metrics" not in entry and expected in entry["missing"][0]
    assert not (sweep / "oof_predictions.npz").exists()
    assert "incomplete, no OOF score" in (sweep / "summary.md").read_text()


def test_predictions_of_another_run_are_refused(tmp_path):
    sweep = _kfold_sweep(tmp_path)
    rows = dict(np.load(sweep / "1" / "predictions.val.npz"))
    np.savez(
        sweep / "1" / "predictions.val.npz",
        **{**rows, "index": rows["index"][:-1], "output": rows["output"][:-1]},
    )
    with pytest.raises(IncompleteOOFError, match="does not hold exactly the job's validation part"):
        oof_predictions(sweep)


@pytest.mark.parametrize("average", ["probs", "logits"])
def test_fold_ensemble_is_the_mean_of_the_fold_models_outputs(tmp_path, average):
    sweep = _kfold_sweep(tmp_path)
    test = KFold(k=4, fold=0, stratify=True, test_ratio=0.25).split(N, LABELS, seed=0)["test"]
    folds = [_logits(f)(test) for f in range(4)]
    expected = (
        np.mean([_softmax(f) for f in folds], axis=0)
        if average == "probs"
        else _softmax(np.mean(folds, axis=0))
    )
    result = fold_ensemble(sweep, average=average)
    assert np.array_equal(result.index, test) and np.allclose(result.output, expected, rtol=0, atol=1e-12)
    assert result.metrics["acc"] == 1.0 and result.fold_metrics["acc"]["n"] == 4
    summary = write_summary(sweep, with_plot=True, ensemble=True, average=average)
    assert summary["ensembles"][0]["metrics"]["log_loss"] == pytest.approx(result.metrics["log_loss"])
    assert (sweep / "summary.png").stat().st_size > 0


def test_fold_ensemble_refuses_folds_from_different_splits(tmp_path):
    sweep = _kfold_sweep(tmp_path, seeds={3: 1})  # fold 3 ran with another split seed: another test part
    with pytest.raises(EnsembleError, match="different splits"):
        fold_ensemble(sweep)
    summary = write_summary(sweep, with_plot=False, ensemble=True)
    assert "different splits" in summary["ensembles"][0]["error"]


def _conditions_sweep(root, means, metric="val/acc", k=5, noise=0.004):
    rng = np.random.default_rng(0)
    num = 0
    for lr, mean in means.items():
        for fold in range(k):
            value = mean + noise * rng.standard_normal()
            write_job(
                root / str(num),
                [f"task.model.optimizer.lr={lr}", f"split.fold={fold}"],
                KFold(k=k, fold=fold),
                50,
                {metric: value, "val/loss": 1 - value},
            )
            num += 1
    return root


def test_best_condition_line_names_the_known_winner_with_its_ci_and_the_paired_test(tmp_path):
    sweep = _conditions_sweep(tmp_path, {"0.0": 0.2, "0.001": 0.85, "0.01": 0.9})
    summary = write_summary(sweep, with_plot=False)
    best = summary["decision"]
    assert (
        best["best"] == "task.model.optimizer.lr=0.01"
        and best["runner_up"] == "task.model.optimizer.lr=0.001"
    )
    assert best["ci95"][0] < best["mean"] < best["ci95"][1] and best["n"] == 5
    assert (
        best["significant"] is True
        and best["comparison"]["pairs"] == 5
        and best["comparison"]["mean_diff"] > 0
    )
    assert (
        "Best condition on val/acc (maximize): task.model.optimizer.lr=0.01"
        in (sweep / "summary.md").read_text()
    )
    by_loss = write_summary(sweep, with_plot=False, metric="val/loss")["decision"]
    assert by_loss["direction"] == "minimize" and by_loss["best"] == "task.model.optimizer.lr=0.01"
    worst = write_summary(sweep, with_plot=False, metric="val/acc", direction="minimize")["decision"]
    assert worst["best"] == "task.model.optimizer.lr=0.0"
    with pytest.raises(ValueError, match="not a metric of this sweep"):
        write_summary(sweep, with_plot=False, metric="val/f1")


def test_optuna_best_trial_is_named_with_its_overrides_and_run_dir(tmp_path):
    sweep = _conditions_sweep(tmp_path, {"0.001": 0.85, "0.01": 0.9}, k=2)
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump(
            {"name": "optuna", "best_params": {"task.model.optimizer.lr": 0.01}, "best_value": 0.9}
        )
    )
    optuna = write_summary(sweep, with_plot=False)["optuna"]
    assert optuna["overrides"] == {"task.model.optimizer.lr": "0.01"} and optuna["best_value"] == 0.9
    assert optuna["run_dir"] == str(sweep / "2")
    assert "Optuna's best trial" in (sweep / "summary.md").read_text()


def test_nested_selection_reads_inner_validation_scores_only(tmp_path):
    """Condition A wins the inner folds of outer folds 0 and 1, B of outer fold 2; the test scores favour the
    loser everywhere, so a selection that read them would pick the other condition."""
    val = {("A", 0): 0.9, ("B", 0): 0.8, ("A", 1): 0.9, ("B", 1): 0.85, ("A", 2): 0.7, ("B", 2): 0.8}
    test = {("A", 0): 0.6, ("B", 0): 0.95, ("A", 1): 0.62, ("B", 1): 0.96, ("A", 2): 0.97, ("B", 2): 0.64}
    num = 0
    for cond, lr in (("A", "0.01"), ("B", "0.001")):
        for outer in range(3):
            for inner in range(2):
                write_job(
                    tmp_path / str(num),
                    [
                        f"task.model.optimizer.lr={lr}",
                        f"split.outer_fold={outer}",
                        f"split.inner_fold={inner}",
                    ],
                    NestedKFold(outer_k=3, inner_k=2, outer_fold=outer, inner_fold=inner),
                    60,
                    {"val/acc": val[cond, outer] + 0.01 * inner, "test/acc": test[cond, outer]},
                )
                num += 1
    nested = write_summary(tmp_path, with_plot=False)["nested"]
    a, b = "task.model.optimizer.lr=0.01", "task.model.optimizer.lr=0.001"
    assert [f["selected"] for f in nested["outer_folds"]] == [a, a, b]
    assert [f["outer_score"] for f in nested["outer_folds"]] == [0.6, 0.62, 0.64]
    assert nested["estimate"]["mean"] == pytest.approx(0.62) and nested["estimate"]["n"] == 3
    assert all(f["test_part_held_out"] for f in nested["outer_folds"])
    assert nested["naive_best"]["condition"] == a and nested["score_metric"] == "test/acc"
    assert "Nested estimate (test/acc): 0.6200" in (tmp_path / "summary.md").read_text()


def test_report_cli_ensemble_flag(tmp_path, capsys):
    sweep = _kfold_sweep(tmp_path / "cv")
    assert cli([str(sweep), "--ensemble", "--ensemble-average", "logits"]) == 0
    out = capsys.readouterr().out
    assert "Fold ensembles on the test part" in out and "| all | 4 | logits | test/acc | 1.0000 |" in out
    assert json.loads((sweep / "summary.json").read_text())["ensembles"][0]["average"] == "logits"
    plain = _kfold_sweep(tmp_path / "no_test", test_ratio=0.0)
    with pytest.raises(SystemExit):
        cli([str(plain), "--ensemble"])
    assert "no fold ensemble can be made" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"stages": ("train",)}, "stages='train' is not supported"),
        ({"kind": "prob"}, "kind='prob' is not supported"),
        ({"during_fit": "no"}, "during_fit must be true or false"),
    ],
)
def test_prediction_recorder_refuses_bad_arguments(kwargs, words):
    from lightning_freeze.splitrun import PredictionRecorder

    with pytest.raises(ValueError, match=words):
        PredictionRecorder(**kwargs)


def test_reading_a_sweeps_predictions_needs_no_torch(tmp_path):
    """The OOF merge, the ensemble and the report read .npz files with numpy alone, in a fresh process."""
    import subprocess
    import sys

    sweep = _kfold_sweep(tmp_path)
    code = (
        "import sys\n"
        "from lightning_freeze.splitrun import fold_ensemble, oof_predictions\n"
        "from lightning_freeze.splitrun.report import write_summary\n"
        f"oof = oof_predictions({str(sweep)!r}); fold_ensemble({str(sweep)!r})\n"
        f"write_summary({str(sweep)!r}, with_plot=False)\n"
        "print(oof.index.size, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["90", "False", "False"]


def test_an_unreadable_predictions_file_is_named_and_the_summary_still_written(tmp_path):
    sweep = _kfold_sweep(tmp_path)
    (sweep / "2" / "predictions.val.npz").write_bytes(b"not an npz")
    (sweep / "2" / "predictions.test.npz").write_bytes(b"not an npz")
    summary = write_summary(sweep, with_plot=False, ensemble=True)
    assert not summary["oof"][0]["complete"] and "metrics" not in summary["oof"][0]
    assert "error" in summary["ensembles"][0]
    assert (sweep / "summary.md").is_file()
