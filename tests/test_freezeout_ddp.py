"""FreezeOut under real 2-process DDP on CPU: same freeze steps on every rank, identical replicas, and
frozen layers really leave the gradient all-reduce (counted by a DDP communication hook)."""

import pytest
from ddp import run_ddp_script

pytestmark = pytest.mark.ddp


def test_ddp_freezes_in_step_and_stops_reducing_frozen_layers(tmp_path):
    reports = run_ddp_script("freezeout_ddp.py", tmp_path)
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world_size"] == 2
    assert all(r["replicas_equal"] for r in reports)
    assert reports[0]["events"] == reports[1]["events"]
    assert [(e["layer"], e["step"]) for e in reports[0]["events"]] == [
        ("backbone.0", 8),
        ("backbone.1", 11),
        ("backbone.2", 14),
    ]
    assert reports[0]["total_steps"] == 16
    numel = reports[0]["layer_numel"]
    total = sum(numel.values())
    frozen_after = {
        8: ["backbone.0"],
        11: ["backbone.0", "backbone.1"],
        14: ["backbone.0", "backbone.1", "backbone.2"],
    }
    for r in reports:
        steps = r["steps"]
        assert [s["step"] for s in steps] == list(range(16))
        assert not any(s["find_unused_parameters"] for s in steps)
        # a fresh DistributedDataParallel after each of the 3 freezes
        assert [s["wrapper"] for s in steps] == [1] * 8 + [2] * 3 + [3] * 3 + [4] * 2
        for s in steps:
            frozen = next((v for k, v in sorted(frozen_after.items(), reverse=True) if s["step"] >= k), [])
            expected = total - sum(numel[n] for n in frozen)
            # what trains == what DDP registered == what is all-reduced in that step's backward
            assert s["trainable"] == expected, s
            assert s["ddp_param_bytes"] == 4 * expected, s
            assert s["allreduced"] == expected, s
        # frozen groups are empty and their LR is 0; the head still trains
        assert [g[:2] for g in r["groups"]] == [
            ["backbone.0", 0],
            ["backbone.1", 0],
            ["backbone.2", 0],
            ["head", 2],
        ]
