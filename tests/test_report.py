"""Sweep aggregation: the numbers against hand computations and scipy, failed jobs listed (never averaged),
pairing by the split manifest, valid JSON for zero-variance pairs, the plot, and the CLI's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_freeze.splitrun.report import (
    NoJobsError,
    cli,
    collect_jobs,
    metric_range,
    plot,
    summarize,
    write_summary,
)
from lightning_freeze.splitrun.splitters import KFold
from lightning_freeze.splitrun.stats import describe, paired

T975 = {2: 4.3027, 4: 2.7764}  # two-sided 95% Student t critical values (tables)


def test_describe_by_hand():
    s = describe([0.80, 0.82, 0.84, 0.86, 0.88])
    assert s["n"] == 5 and s["mean"] == pytest.approx(0.84)
    std = math.sqrt((0.04**2 + 0.02**2 + 0 + 0.02**2 + 0.04**2) / 4)  # = 0.0316228
    assert s["std"] == pytest.approx(std)
    half = T975[4] * std / math.sqrt(5)
    assert s["ci95"] == pytest.approx([0.84 - half, 0.84 + half], abs=1e-5)
    assert describe([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci95": None, "values": [0.5]}


def test_paired_t_test_by_hand():
    base = [0.81, 0.83, 0.80, 0.86, 0.84]
    other = [0.85, 0.86, 0.82, 0.90, 0.85]
    r = paired(base, other)
    # d = [.04, .03, .02, .04, .01]: mean .028, sd .0130384, t = .028 / (.0130384 / sqrt 5) = 4.80196
    assert r["mean_diff"] == pytest.approx(0.028) and r["std"] == pytest.approx(0.0130384, abs=1e-7)
    assert r["t"] == pytest.approx(4.80196, abs=1e-5) and r["p_value"] == pytest.approx(0.0086358, abs=1e-6)
    half = T975[4] * 0.0130384 / math.sqrt(5)
    assert r["ci95"] == pytest.approx([0.028 - half, 0.028 + half], abs=1e-5) and r["note"] is None


@pytest.mark.parametrize(("base", "other"), [([1.0, 2.0], [1.0, 2.0]), ([0.8, 0.9, 0.7], [0.85, 0.95, 0.75])])
def test_zero_variance_pairs_get_a_note_and_no_infinity(base, other):
    r = paired(base, other)
    assert r["t"] is None and r["p_value"] is None and "zero variance" in r["note"]
    json.dumps(r, allow_nan=False)  # valid JSON: no Infinity, no NaN


def _job(
    root: Path,
    num: int,
    overrides: list[str],
    metrics: dict | None,
    status: str = "ok",
    manifest: dict | None = None,
    seed: int = 0,
) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if manifest is not None:
        (job / "split_manifest.json").write_text(json.dumps(manifest))
    if metrics is not None:
        (job / "metrics.json").write_text(
            json.dumps(
                {
                    "status": status,
                    "error": None if status == "ok" else "RuntimeError: boom",
                    "metrics": metrics,
                    "fit_time_s": 0.5 + num,
                    "wall_time_s": 3.0 + num,
                    "trainable_fraction": 0.5,
                    "seed": seed,
                    "overrides": overrides,
                }
            )
        )


def _manifest(splitter, n: int = 60, seed: int = 0) -> dict:
    return splitter.split(n, labels=np.arange(n) % 3, seed=seed).manifest


@pytest.fixture
def sweep(tmp_path):
    """freeze=none,layer_freeze x split.fold=0..2; the (layer_freeze, fold 2) job failed, one job died."""
    acc = {
        ("none", 0): 0.80,
        ("none", 1): 0.84,
        ("none", 2): 0.88,
        ("layer_freeze", 0): 0.85,
        ("layer_freeze", 1): 0.86,
    }
    num = 0
    for freeze in ("none", "layer_freeze"):
        for fold in range(3):
            ov = [f"freeze={freeze}", f"split.fold={fold}", "trainer.max_epochs=2"]
            man = _manifest(KFold(k=3, fold=fold, stratify=True))
            if (freeze, fold) == ("layer_freeze", 2):
                _job(tmp_path, num, ov, {}, status="failed", manifest=man)
            else:
                _job(
                    tmp_path,
                    num,
                    ov,
                    {"val/acc": acc[freeze, fold], "val/loss": 1 - acc[freeze, fold]},
                    manifest=man,
                )
            num += 1
    _job(
        tmp_path, num, ["freeze=none", "split.fold=3", "trainer.max_epochs=2"], None
    )  # died: no metrics.json
    return tmp_path


def test_summary_numbers_and_failed_jobs(sweep):
    summary = write_summary(sweep)
    assert summary["n_jobs"] == 7 and summary["n_ok"] == 5
    assert {f["status"] for f in summary["failed"]} == {"failed", "missing"}
    assert summary["replicate_axes"] == ["split.fold"] and summary["compare_axes"] == ["freeze"]
    assert summary["paired_by"] == "split manifest (part hashes) and run seed"
    by = {c["condition"]: c for c in summary["conditions"]}
    none = by["freeze=none"]["metrics"]["val/acc"]
    assert none["n"] == 3 and none["mean"] == pytest.approx(0.84) and none["std"] == pytest.approx(0.04)
    half = T975[2] * 0.04 / math.sqrt(3)
    assert none["ci95"] == pytest.approx([0.84 - half, 0.84 + half], abs=1e-5)
    lf = by["freeze=layer_freeze"]["metrics"]["val/acc"]
    assert lf["n"] == 2 and lf["mean"] == pytest.approx(0.855)  # the failed fold is not averaged in
    (cmp,) = [c for c in summary["comparisons"] if c["metric"] == "val/acc"]
    assert cmp["baseline"] == "freeze=none" and cmp["other"] == "freeze=layer_freeze"
    # paired on folds 0 and 1 only: d = [.05, .02]
    assert cmp["n"] == 2 and cmp["mean_diff"] == pytest.approx(0.035) and cmp["unpaired"] == 1
    assert cmp["pairs"] == [{"split.fold": "0"}, {"split.fold": "1"}]
    assert cmp["t"] == pytest.approx(0.035 / (math.sqrt(0.015**2 * 2) / math.sqrt(2)))
    assert {"fit_time_s", "wall_time_s"} <= set(summary["metrics"])  # fit time apart from the wall time
    for name in ("summary.json", "summary.md", "summary.png"):
        assert (sweep / name).stat().st_size > 0
    md = (sweep / "summary.md").read_text()
    assert "Failed jobs" in md and "RuntimeError: boom" in md and "freeze=layer_freeze" in md


def test_pairs_come_from_the_manifest_not_the_override_strings(tmp_path):
    """split=kfold and split=stratified_kfold both have a fold 0, but not the same folds: nothing pairs."""
    for num, (name, stratify, acc) in enumerate([("kfold", False, 0.8), ("stratified_kfold", True, 0.9)]):
        for fold in range(2):
            _job(
                tmp_path,
                num * 2 + fold,
                [f"split={name}", f"split.fold={fold}"],
                {"val/acc": acc + fold / 100},
                manifest=_manifest(KFold(k=2, fold=fold, stratify=stratify)),
            )
    summary = summarize(collect_jobs(tmp_path))
    (cmp,) = [c for c in summary["comparisons"] if c["metric"] == "val/acc"]
    assert cmp["n"] == 0 and cmp["unpaired"] == 4 and "no pairs" in cmp["note"]


def test_zero_variance_comparison_writes_valid_json(tmp_path):
    for num, (freeze, acc) in enumerate([("none", 0.8), ("none", 0.9), ("lf", 0.7), ("lf", 0.8)]):
        fold = num % 2
        _job(
            tmp_path,
            num,
            [f"freeze={freeze}", f"split.fold={fold}"],
            {"val/acc": acc},
            manifest=_manifest(KFold(k=2, fold=fold)),
        )
    write_summary(tmp_path, baseline="freeze=none")
    text = (tmp_path / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    (cmp,) = [c for c in json.loads(text)["comparisons"] if c["metric"] == "val/acc"]
    assert cmp["t"] is None and cmp["mean_diff"] == pytest.approx(-0.1) and "zero variance" in cmp["note"]
    assert "zero variance" in (tmp_path / "summary.md").read_text()


def test_plot_has_a_replicate_legend_and_clips_the_ci(sweep, monkeypatch):
    import matplotlib.figure

    summary = summarize(collect_jobs(sweep))
    assert summary["metric_ranges"]["val/acc"] == [0.0, 1.0] and metric_range([-1.0, 2.0]) == (
        -math.inf,
        math.inf,
    )
    seen = {}
    original = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen["fig"] = fig
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    summary["conditions"][0]["metrics"]["val/acc"]["ci95"] = [0.5, 1.2]  # a CI past the metric's range
    assert plot(summary, sweep / "p.png")
    ax = seen["fig"].axes[0]
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "split.fold"
    assert [t.get_text() for t in legend.get_texts()] == ["split.fold=0", "split.fold=1", "split.fold=2"]
    tops = [seg[1][1] for coll in ax.collections for seg in coll.get_segments()]
    assert max(tops) <= 1.0  # clipped to [0, 1]


def test_cli_over_an_existing_sweep_dir(sweep, capsys):
    assert cli([str(sweep), "--baseline", "freeze=layer_freeze"]) == 0
    assert "Paired comparisons" in capsys.readouterr().out
    summary = json.loads((sweep / "summary.json").read_text())
    assert {c["baseline"] for c in summary["comparisons"]} == {"freeze=layer_freeze"}


def test_no_jobs_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(NoJobsError, match="holds no job"):
        write_summary(tmp_path)
    assert list(tmp_path.iterdir()) == []
