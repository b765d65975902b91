"""ProgressiveUnfreezing under real 2-process DDP on CPU: metric-driven thaws mid-epoch, decided alike on every
rank from rank 0's metric, thawed groups all-reduced (replicas bit-identical), no find_unused_parameters."""

import pytest
from ddp import run_ddp_script


@pytest.mark.ddp
def test_ddp_metric_driven_thaws_keep_replicas_identical(tmp_path):
    reports = run_ddp_script("unfreezing_ddp.py", tmp_path)
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world_size"] == 2
    # rank 1's own score never plateaus: the thaws happen on rank 0's decision, at the same steps
    assert reports[0]["events"] == reports[1]["events"]
    assert [(e["step"], e["layer"]) for e in reports[0]["events"]] == [
        (6, "backbone.2"),
        (10, "backbone.1"),
        (14, "backbone.0"),
    ]
    assert reports[0]["steps_per_epoch"] == 4  # so steps 6, 10 and 14 are in the middle of epochs
    assert reports[0]["frozen"] == reports[1]["frozen"] == []
    # replicas bit-identical after mid-run thaws (Lightning issue #20340 is the opposite)
    assert reports[0]["digest"] == reports[1]["digest"]
    for r in reports:
        assert all(r["changed"].values())  # every thawed layer really trained
        # the DDP wrapper grows with each thaw: 2 tensors (head) -> +4 per backbone block; never unused search
        assert [(step, n) for step, n, _ in r["ddp_params"]] == [(0, 2), (6, 6), (10, 10), (14, 14)]
        assert not any(unused for _, _, unused in r["ddp_params"])
