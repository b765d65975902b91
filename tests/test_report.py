"""Sweep aggregation: the numbers against a hand computation, the t distribution against known values,
failed jobs listed (never averaged), and the CLI over a sweep dir laid out as Hydra writes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_freeze.splitrun.report import cli, describe, paired, t_cdf, t_quantile, write_summary

# two-sided 95% Student t critical values (tables)
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 30: 2.0423}


@pytest.mark.parametrize(("df", "value"), sorted(T975.items()))
def test_t_quantile_matches_the_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_cdf(value, df) == pytest.approx(0.975, abs=1e-5)


def test_describe_by_hand():
    s = describe([0.80, 0.82, 0.84, 0.86, 0.88])
    assert s["n"] == 5 and s["mean"] == pytest.approx(0.84)
    std = math.sqrt((0.04**2 + 0.02**2 + 0 + 0.02**2 + 0.04**2) / 4)  # = 0.0316228
    assert s["std"] == pytest.approx(std)
    half = 2.7764451 * std / math.sqrt(5)  # = 0.0392641
    assert s["ci95"] == pytest.approx([0.84 - half, 0.84 + half], abs=1e-6)
    assert describe([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci95": None, "values": [0.5]}


def test_paired_t_test_by_hand():
    base = [0.81, 0.83, 0.80, 0.86, 0.84]
    other = [0.85, 0.86, 0.82, 0.90, 0.85]
    r = paired(base, other)
    # d = [.04, .03, .02, .04, .01]: mean .028, sd .0130384, t = .028 / (.0130384 / sqrt 5) = 4.80196
    assert r["mean_diff"] == pytest.approx(0.028) and r["std"] == pytest.approx(0.0130384, abs=1e-7)
    assert r["t"] == pytest.approx(4.80196, abs=1e-5)
    assert r["p_value"] == pytest.approx(0.0086358, abs=1e-6)  # scipy.stats.ttest_rel gives 0.00863579
    assert r["ci95"] == pytest.approx(
        [0.028 - 2.7764451 * 0.0130384 / math.sqrt(5), 0.028 + 2.7764451 * 0.0130384 / math.sqrt(5)], abs=1e-6
    )
    assert paired([1.0, 2.0], [1.0, 2.0])["p_value"] == 1.0


def _job(root: Path, num: int, overrides: list[str], metrics: dict | None, status: str = "ok") -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(
            json.dumps(
                {
                    "status": status,
                    "error": None if status == "ok" else "RuntimeError: boom",
                    "metrics": metrics,
                    "wall_time_s": 1.0 + num,
                    "trainable_fraction": 0.5,
                    "overrides": overrides,
                }
            )
        )


@pytest.fixture
def sweep(tmp_path):
    """freeze=none,layer_freeze x split.fold=0..2; the (layer_freeze, fold 2) job failed, one job died."""
    acc = {
        ("none", 0): 0.80,
        ("none", 1): 0.84,
        ("none", 2): 0.88,
        ("layer_freeze", 0): 0.85,
        ("layer_freeze", 1): 0.86,
        ("layer_freeze", 2): 0.90,
    }
    num = 0
    for freeze in ("none", "layer_freeze"):
        for fold in range(3):
            ov = [f"freeze={freeze}", f"split.fold={fold}", "trainer.max_epochs=2"]
            if (freeze, fold) == ("layer_freeze", 2):
                _job(tmp_path, num, ov, {}, status="failed")
            else:
                _job(tmp_path, num, ov, {"val/acc": acc[freeze, fold], "val/loss": 1 - acc[freeze, fold]})
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
    by = {c["condition"]: c for c in summary["conditions"]}
    none = by["freeze=none"]["metrics"]["val/acc"]
    assert none["n"] == 3 and none["mean"] == pytest.approx(0.84) and none["std"] == pytest.approx(0.04)
    half = 4.3026527 * 0.04 / math.sqrt(3)
    assert none["ci95"] == pytest.approx([0.84 - half, 0.84 + half], abs=1e-6)
    lf = by["freeze=layer_freeze"]["metrics"]["val/acc"]
    assert lf["n"] == 2 and lf["mean"] == pytest.approx(0.855)  # the failed fold is not averaged in
    (cmp,) = [c for c in summary["comparisons"] if c["metric"] == "val/acc"]
    assert cmp["baseline"] == "freeze=none" and cmp["other"] == "freeze=layer_freeze"
    # paired on folds 0 and 1 only: d = [.05, .02]
    assert cmp["n"] == 2 and cmp["mean_diff"] == pytest.approx(0.035) and cmp["unpaired"] == 1
    assert cmp["pairs"] == [{"split.fold": "0"}, {"split.fold": "1"}]
    t = 0.035 / (math.sqrt(((0.015**2) * 2) / 1) / math.sqrt(2))
    assert cmp["t"] == pytest.approx(t)
    for name in ("summary.json", "summary.md", "summary.png"):
        assert (sweep / name).stat().st_size > 0
    md = (sweep / "summary.md").read_text()
    assert "Failed jobs" in md and "RuntimeError: boom" in md and "freeze=layer_freeze" in md


def test_cli_over_an_existing_sweep_dir(sweep, capsys):
    assert cli([str(sweep), "--baseline", "freeze=layer_freeze"]) == 0
    out = capsys.readouterr().out
    assert "Paired comparisons" in out
    summary = json.loads((sweep / "summary.json").read_text())
    assert {c["baseline"] for c in summary["comparisons"]} == {"freeze=layer_freeze"}
