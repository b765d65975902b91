"""LayerFreeze under real 2-process DDP on CPU: thaw mid-run, replicas stay identical, no unused-param search."""

from ddp import run_ddp_script


def test_ddp_thaw_mid_run_keeps_replicas_identical(tmp_path):
    reports = run_ddp_script("layer_freeze_ddp.py", tmp_path)
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world_size"] == 2
    assert all(r["replicas_equal"] for r in reports)
    # Both ranks thawed at the same step; the DDP wrapper covered only the head before and all after.
    assert reports[0]["events"] == reports[1]["events"] and reports[0]["events"][0]["step"] == 5
    for r in reports:
        counts = {step: n for step, n, _ in r["ddp_params"]}
        assert counts[0] == 2 and counts[4] == 2 and counts[5] == 14
        assert not any(unused for _, _, unused in r["ddp_params"])
        assert r["groups"] == [["backbone.0", 4], ["backbone.1", 4], ["backbone.2", 4], ["head", 2]]
