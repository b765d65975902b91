"""Fast checks of the benchmark harness: alternation, statistics, pairwise ratios, error reporting,
result files / README, and tiny real runs of the benchmark loops (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks.harness import (
    Contender,
    Measurement,
    Result,
    Summary,
    Table,
    alternate,
    discover,
    machine_info,
    median_step_time,
    pairwise_ratios,
)
from benchmarks.models import NetSpec, SplitNet, make_batches, make_blocks, pick_prefix
from benchmarks.report import write_readme, write_result

TINY = NetSpec(width=4, blocks_per_stage=1, image=8, batch=4)


def test_alternate_runs_warmup_then_abab_and_keeps_only_recorded_rounds():
    calls: list[str] = []

    def make(name, value):
        def run():
            calls.append(name)
            return value

        return run

    ms = alternate(
        [Contender("a", make("a", 1.0)), Contender("b", make("b", 2.0))], rounds=3, warmup_rounds=2
    )
    assert calls == ["a", "b"] * 5
    assert [m.values() for m in ms] == [[1.0] * 3, [2.0] * 3]


def test_pairwise_ratios_cancel_noise_common_to_a_round():
    # A machine that gets 10x slower in round 2 slows both contenders alike: the paired ratio is unchanged.
    speed = iter([1.0, 1.0, 10.0, 10.0, 1.5, 1.5])
    ms = alternate(
        [Contender("base", lambda: next(speed) * 2.0), Contender("x", lambda: next(speed) * 3.0)],
        rounds=3,
        warmup_rounds=0,
    )
    base, x = ms
    assert pairwise_ratios(x.values(), base.values()) == pytest.approx([1.5, 1.5, 1.5])
    table = Table.build("t", ms, baseline="base", unit="s")
    row = next(d for d in table.data if d["contender"] == "x")
    assert row["ratio_summary"]["median"] == pytest.approx(1.5)
    assert row["ratio_summary"]["q1"] == pytest.approx(1.5) and row["ratio_summary"]["q3"] == pytest.approx(
        1.5
    )
    # while the raw medians are spread by the noise
    assert row["summary"]["max"] / row["summary"]["min"] == pytest.approx(10.0)


def test_summary_median_iqr_and_median_step_time():
    s = Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert median_step_time([100.0, 50.0, 1.0, 2.0, 3.0], skip=2) == 2.0
    with pytest.raises(ValueError):
        median_step_time([1.0], skip=1)


def test_failing_contender_is_reported_with_its_reason_and_the_others_go_on():
    def boom():
        raise RuntimeError("peer cannot run this case")

    ms = alternate(
        [Contender("base", lambda: 1.0), Contender("bad", boom), Contender("ok", lambda: 2.0)],
        rounds=2,
        warmup_rounds=1,
    )
    bad = ms[1]
    assert bad.error.startswith("RuntimeError: peer cannot run this case")
    assert ms[2].values() == [2.0, 2.0]
    table = Table.build("t", ms, baseline="base")
    bad_row = next(r for r in table.rows if r[0] == "bad")
    assert "could not run: RuntimeError: peer cannot run this case" in " ".join(bad_row)


def test_multi_metric_samples_and_result_files(tmp_path):
    ms = alternate(
        [
            Contender("a", lambda: {"rss": 10.0, "bytes": 4.0}),
            Contender("b", lambda: {"rss": 5.0, "bytes": 1.0}),
        ],
        rounds=2,
        warmup_rounds=0,
    )
    assert ms[1].values("rss") == [5.0, 5.0] and ms[1].values("bytes") == [1.0, 1.0]
    table = Table.build("mem", ms, baseline="a", metric="rss", unit="MiB")
    res = Result("demo_cmp", "Demo comparison", description="desc", tables=[table], config={"n": 1})

    from benchmarks.harness import BenchContext

    path = write_result(res.to_json(BenchContext(quick=True), machine_info(), 1.0), tmp_path)
    payload = json.loads(path.read_text())
    assert payload["name"] == "demo_cmp" and payload["mode"] == "quick"
    assert {"cpu", "cores", "torch", "lightning", "device", "date_utc", "git_commit"} <= set(
        payload["machine"]
    )
    # a second result written later (another helper's comparison) shows up in the same README
    write_result({"name": "zz_other", "title": "Other", "tables": [], "machine": {}}, tmp_path)
    readme = write_readme(tmp_path).read_text()
    assert "## Demo comparison (`demo_cmp`)" in readme and "## Other (`zz_other`)" in readme
    assert "| b | 5.00 |" in readme and "0.500×" in readme


def test_registry_discovers_the_suite():
    names = set(discover())
    assert {"static_freezing", "overhead", "memory", "splits"} <= names


def test_prefix_share_is_monotone_and_net_splits_at_k():
    blocks = make_blocks(TINY)
    shares = [pick_prefix(blocks, TINY, t)[1] for t in (0.3, 0.7, 0.85)]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1
    k, _ = pick_prefix(blocks, TINY, 0.5)
    net = SplitNet.from_blocks(blocks, k, TINY.num_classes)
    assert len(net.backbone) == k and len(net.trunk) == len(blocks) - k
    assert net.training and all(m.training for m in net.modules())


def test_hand_frozen_loop_leaves_the_prefix_bit_identical_and_trains_the_rest():
    from benchmarks.loops import plain_step_round

    blocks = make_blocks(TINY)
    net = SplitNet.from_blocks(blocks, 2, TINY.num_classes)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step_s = plain_step_round(net, make_batches(TINY, 4), frozen=True, skip=1)
    assert step_s > 0
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert all(p.grad is None for p in net.backbone.parameters())


def test_lightning_round_times_every_step_and_layer_freeze_keeps_prefix(tmp_path):
    from benchmarks.lit import BenchModule, fit_round, frozen_prefix_report
    from lightning_freeze import LayerFreeze

    blocks = make_blocks(TINY)
    module = BenchModule(SplitNet.from_blocks(blocks, 2, TINY.num_classes))
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    seen = {}
    step_s = fit_round(
        lambda: module,
        make_batches(TINY, 5),
        [LayerFreeze(layers="backbone")],
        skip=1,
        after_fit=lambda tr, m: seen.update(steps=tr.global_step),
    )
    assert step_s > 0 and seen["steps"] == 5
    assert frozen_prefix_report(before, module) == "yes"


def test_hand_frozen_lightning_baseline_really_keeps_the_backbone_in_eval_mode():
    from benchmarks.lit import BenchModule, fit_round, frozen_prefix_report

    module = BenchModule(SplitNet.from_blocks(make_blocks(TINY), 2, TINY.num_classes), hand_frozen=True)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    modes = []
    module.on_train_batch_start = lambda batch, i: modes.append(
        (module.backbone.training, module.trunk.training)
    )
    fit_round(lambda: module, make_batches(TINY, 3), skip=0)
    assert modes == [(False, True)] * 3
    assert frozen_prefix_report(before, module) == "yes"


def test_memory_worker_counts_fewer_grad_and_state_bytes_when_frozen():
    from benchmarks.comparisons.memory import run_worker, run_workers

    cfg = {"net": TINY.to_json(), "k": 3, "steps": 2, "device": "cpu"}
    full = run_worker("PyTorch, nothing frozen", cfg)  # full mode: one fresh process per contender
    # quick mode: several contenders in one process, each measured alike; an unknown one is named, not fatal
    shared = run_workers(["PyTorch, hand-frozen (optimum)", "PyTorch, nothing frozen", "no such"], cfg)
    frozen = shared["PyTorch, hand-frozen (optimum)"]
    assert shared["PyTorch, nothing frozen"]["grad_state_bytes"] == full["grad_state_bytes"]
    assert "no memory contender 'no such'" in shared["no such"]["error"]
    assert frozen["grad_state_bytes"] < full["grad_state_bytes"]
    # exact: SGD with momentum holds one grad and one momentum buffer per trainable parameter
    net = SplitNet.from_blocks(make_blocks(TINY), 3, TINY.num_classes)
    trainable = sum(p.numel() * 4 for n, p in net.named_parameters() if not n.startswith("backbone."))
    assert frozen["grad_state_bytes"] == 2 * trainable
    assert full["peak_rss"] > 0


def test_measurement_round_trip():
    m = Measurement("x")
    m.add(1.0)
    m.add({"value": 2.0, "other": 3.0})
    assert m.values() == [1.0, 2.0] and m.values("other") == [3.0]
    assert m.to_json()["samples"]["value"] == [1.0, 2.0]


class _FakeClock:
    """A perf_counter that moves only when told to (and when the device 'synchronises')."""

    def __init__(self) -> None:
        self.t = 0.0
        self.synced: list[str] = []

    def __call__(self) -> float:
        return self.t


def _fake_time(monkeypatch) -> _FakeClock:
    import benchmarks.harness as harness

    fake = _FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", fake)
    return fake


def test_step_clock_times_start_to_start_and_leaves_excluded_work_out(monkeypatch):
    from benchmarks.harness import StepClock

    fake = _fake_time(monkeypatch)
    clock = StepClock()
    clock.begin()
    for advance in (1.0, 2.0):
        clock.step()
        fake.t += advance
    with clock.excluded():  # e.g. a weight copy between two steps
        fake.t += 10.0
    clock.step()
    fake.t += 3.0
    clock.close()
    assert clock.step_times() == [1.0, 2.0, 3.0]
    assert clock.elapsed() == 6.0


def test_every_clock_reading_waits_for_the_device_first(monkeypatch):
    import benchmarks.harness as harness
    from benchmarks.harness import StepClock, now

    fake = _fake_time(monkeypatch)

    def sync(device):  # queued device work finishes during the synchronisation
        if getattr(device, "type", device) == "cuda":
            fake.synced.append("sync")
            fake.t += 0.5

    monkeypatch.setattr(harness, "sync", sync)
    assert now(torch.device("cuda")) == 0.5  # the reading comes after the wait
    clock = StepClock(torch.device("cuda"))
    clock.step()  # begins (one sync), then stamps (another)
    clock.close()
    assert clock.step_times() == [0.5] and len(fake.synced) == 4
    fake.synced.clear()
    StepClock(torch.device("cpu")).step()
    assert fake.synced == []


def test_mean_ci_is_students_t_and_ratios_run_contender_over_baseline():
    from scipy import stats

    from benchmarks.harness import mean_ci, ratio_ci

    values = [1.0, 2.0, 4.0, 3.0, 5.5]
    iv = mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert iv.n == 5 and iv.mean == pytest.approx(np.mean(values))
    assert (iv.low, iv.high) == (pytest.approx(low), pytest.approx(high))
    one = mean_ci([2.0, float("nan")])  # NaN dropped; one value has no interval
    assert one.n == 1 and one.mean == 2.0 and np.isnan(one.low)
    ratio = ratio_ci([8.0, 9.0, 10.0], [10.0, 10.0, 10.0])
    assert ratio.mean == pytest.approx(0.9) and ratio.low < 0.9 < ratio.high
    assert ratio_ci([1.0, 2.0], [2.0, 4.0]).mean == pytest.approx(0.5)  # lower is better, paired by round
    with pytest.raises(ValueError, match="unpaired"):
        ratio_ci([1.0], [1.0, 2.0])


def test_lightning_step_timer_counts_every_step_and_snapshots_each_epoch_outside_the_clock(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.lit import BenchModule, StepTimer, make_trainer, quiet

    module = BenchModule(SplitNet.from_blocks(make_blocks(TINY), 2, TINY.num_classes))
    x = torch.randn(12, 3, TINY.image, TINY.image)
    y = torch.randint(0, TINY.num_classes, (12,))
    timer = StepTimer("cpu", snapshots=True)
    with quiet():
        trainer = make_trainer(-1, [timer], "cpu", root_dir=str(tmp_path), max_epochs=3)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert len(timer.step_times()) == 9 and all(t > 0 for t in timer.step_times())
    times = [t for t, _ in timer.points]
    assert len(times) == 3 and times == sorted(times)
    assert sum(timer.step_times()) <= timer.clock.elapsed() + 1e-9
    last = timer.points[-1][1]
    assert all(torch.equal(last[k], v) for k, v in module.state_dict().items())


def test_transfer_statistics_and_goal_verdicts():
    from benchmarks.comparisons import transfer as tr

    # relative change of the error: paired differences over the baseline's mean error
    rel = tr.relative_error_change([0.89, 0.90, 0.91], [0.90, 0.90, 0.90])
    assert rel.mean == pytest.approx(0.0, abs=1e-12) and rel.low < 0 < rel.high
    worse = tr.relative_error_change([0.88, 0.88, 0.88], [0.90, 0.90, 0.90])
    assert worse.mean == pytest.approx(0.2) and worse.low == pytest.approx(0.2)
    # time to target: the first epoch end at or above the baseline's final accuracy (same seed) - 0.5 points
    curves = {
        tr.BASELINE: [[(1.0, 0.80), (2.0, 0.90)], [(1.0, 0.85), (2.0, 0.92)]],
        "x": [[(0.5, 0.896), (1.0, 0.91)], [(0.5, 0.80), (1.0, 0.90)]],
    }
    reach = tr.time_to_target(curves, "x")
    assert reach[0] == 0.5 and np.isnan(reach[1])
    # the same on the CPU clock, the third element of a point (wall s, accuracy, CPU s)
    curves = {name: [[(t, acc, 10 * t) for t, acc in run] for run in runs] for name, runs in curves.items()}
    assert tr.time_to_target(curves, "x", tr.CPU)[0] == 5.0 and tr.time_to_target(curves, "x")[0] == 0.5
    assert tr.speedups([20.0, 20.0], tr.time_to_target(curves, "x", tr.CPU))[0] == 4.0
    # the finetuning-scheduler plan mirrors ProgressiveUnfreezing's: head, then one block per epoch from the top
    plan = tr.fts_schedule(["a", "b", "head"], lr=1.0, lr_decay=2.6)
    assert plan[0]["params"] == ["head.*"] and plan[1]["params"] == ["b.*"] and plan[2]["params"] == ["a.*"]
    assert plan[2]["lr"] == pytest.approx(1 / 2.6**2) and plan[2]["max_transition_epoch"] == 3
    summary = {
        tr.PROGRESSIVE: {"acc_min": 0.90, "acc_max": 0.93},
        tr.BACKBONE_FT: {"acc_min": 0.89, "acc_max": 0.93},
        tr.FTS: {"acc_min": 0.90, "acc_max": 0.94},
        tr.ADAPTIVE_CACHE: {
            "speedup_to_target": [1.6, 1.7, 1.8],
            "acc_diff_points": {"mean": -0.2, "low": -0.6, "high": 0.2, "n": 3},
        },
    }

    def freezeout(met: bool, saved: float, low: float, high: float) -> dict:
        return {
            "met": met,
            "time_ratio": {"mean": 1 - saved, "low": 1 - saved, "high": 1 - saved, "n": 3},
            "relative_error_change": {"mean": (low + high) / 2, "low": low, "high": high, "n": 3},
        }

    table = tr.goals_table(
        {
            "bert1d": {
                "summary": summary,
                "freezeout": {
                    "0.8": freezeout(True, 0.25, -0.02, 0.02),
                    "0.9": freezeout(False, 0.1, -0.1, 0.1),
                },
            }
        }
    )
    verdicts = [row[-1] for row in table.rows]
    assert verdicts == ["**met**", "**met**", "**not met**"]  # FTS's best seed beats ours
    assert "bert1d t0=0.8: 25.0% saved" in table.rows[0][1] and "3/3 seeds reach" in table.rows[1][1]
    summary[tr.ADAPTIVE_CACHE]["speedup_to_target"] = [2.0, float("nan"), 2.0]  # one seed never gets there
    missed = tr.goals_table(
        {"bert1d": {"summary": summary, "freezeout": {"0.9": freezeout(False, 0.1, -0.1, 0.05)}}}
    )
    assert [row[-1] for row in missed.rows[:2]] == ["**not met**", "**not met**"]
    assert "tightest error CI: bert1d t0=0.9" in missed.rows[0][1] and "2/3 seeds" in missed.rows[1][1]


def test_cosine_for_own_groups_leaves_a_group_added_later_to_whoever_added_it():
    from benchmarks.transfer import CosineOwnGroups

    head = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([head], lr=1.0)
    sched = CosineOwnGroups(opt, lambda step: 1 - step / 4)
    opt.step()
    sched.step()
    # BackboneFinetuning's thaw: a new group whose LR the callback sets by hand every epoch
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1})
    lrs = []
    for _ in range(2):
        opt.step()
        sched.step()  # a plain LambdaLR raises here: one lambda per group it was built with
        lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs == [[pytest.approx(0.5), 0.1], [pytest.approx(0.25), 0.1]]
    opt.param_groups[1]["lr"] = 0.2  # the callback's next epoch
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.0), 0.2]
    plain = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([head], lr=1.0), lambda step: 1.0)
    plain.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1})
    plain.optimizer.step()
    with pytest.raises(ValueError, match="zip"):
        plain.step()


def test_budget_plan_keeps_the_order_and_skips_what_does_not_fit():
    from benchmarks.__main__ import BUDGET_PLAN, budget_plan

    plan = [("a", True, 100.0), ("b", True, 300.0), ("c", False, 50.0)]
    assert [n for n, _, _ in budget_plan(160, plan)] == ["a", "c"]
    assert budget_plan(10, plan) == []
    gpu = budget_plan(480)
    assert sum(e for _, _, e in gpu) <= 480 and gpu[0][0] == "transfer"
    assert {n for n, _, _ in BUDGET_PLAN} <= set(discover())


def test_budget_run_stops_a_comparison_past_the_budget_and_says_so(tmp_path, monkeypatch):
    import benchmarks.__main__ as cli

    # static_freezing takes far longer than 8 s anywhere (imports alone take seconds): it must be stopped
    monkeypatch.setattr(cli, "BUDGET_PLAN", (("static_freezing", True, 1.0), ("splits", True, 1000.0)))
    rc = cli.main(["--budget", "8", "--device", "cpu", "--results-dir", str(tmp_path), "-q"])
    assert rc == 1
    payload = json.loads((tmp_path / "static_freezing.json").read_text())
    assert "ran past the budget" in payload["error"] and payload["machine"]["device"] == "cpu"
    assert not (tmp_path / "splits.json").exists()  # it did not fit the plan
    assert "ran past the budget" in (tmp_path / "README.md").read_text()
