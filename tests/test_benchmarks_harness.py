"""Fast checks of the benchmark harness: alternation, statistics, pairwise ratios, error reporting,
result files / README, and tiny real runs of the benchmark loops (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
        [LayerFreeze(layers="backbone", plot=False)],
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
    from benchmarks.comparisons.memory import run_worker

    cfg = {"net": TINY.to_json(), "k": 3, "steps": 2, "device": "cpu"}
    full = run_worker("PyTorch, nothing frozen", cfg)
    frozen = run_worker("PyTorch, hand-frozen (optimum)", cfg)
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
