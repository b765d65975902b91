"""LayerSampling under real 2-process DDP on CPU: the same choices on every rank without a seed and with
different global generators, waiting layers out of the all-reduce, replicas bit-identical; on a full model and
on peft LoRA adapters."""

import pytest
from ddp import run_ddp_script


@pytest.mark.ddp
@pytest.mark.parametrize("what", ["full", "adapters"])
def test_ddp_ranks_sample_alike_and_replicas_stay_identical(tmp_path, what):
    reports = run_ddp_script("layer_sampling_ddp.py", tmp_path, what, timeout=300)
    first, second = reports
    assert [r["rank"] for r in reports] == [0, 1] and first["world_size"] == 2
    assert first["seed"] == second["seed"]
    assert first["choices"] == second["choices"] and first["events"] == second["events"]
    assert all(r["replicas_equal"] for r in reports)
    steps = first["steps"]
    assert [c["step"] for c in first["choices"]] == list(range(0, steps, 3))
    for r in reports:
        assert r["base_violations"] == 0
        assert not any(unused for _, _, unused in r["ddp_params"])
        # Every step trains the always-trained layers and exactly one middle layer (full: backbone.0 and the
        # head, 4 + 2 tensors, plus one block's 4; LoRA: the classifier copy's 2 plus one block's 4 adapters).
        assert {n for _, n, _ in r["ddp_params"]} == ({10} if what == "full" else {6})
        assert len(r["ddp_params"]) == steps and {e["step"] % 3 for e in r["events"]} <= {0}
    if what == "adapters":
        assert all(".encoder.layer." in name for name in first["middle"]) and len(first["middle"]) == 3
