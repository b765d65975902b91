"""FrozenPrefixCache under real 2-process DDP on CPU: each rank caches its own shard, results unchanged."""

import pytest
from ddp import run_ddp_script


@pytest.mark.ddp
def test_each_rank_caches_its_shard_and_replicas_stay_bit_identical(tmp_path):
    reports = run_ddp_script("cache_ddp.py", tmp_path)
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world_size"] == 2
    for r in reports:
        lf, fo = r["layer_freeze"], r["freezeout"]
        assert lf["replicas_equal"] and lf["same_as_uncached"]
        last = lf["history"][-1]
        # 64 train samples in all (validation is never stored); a rank holds its half, served entirely from epoch 1 on
        assert last["entries"] == 32 and last["hits"] == last["lookups"] == 32
        assert last["off"] is None and [e["action"] for e in lf["events"]] == ["record", "drop"]
        # FreezeOut re-wraps DDP (a broadcast from rank 0) at each freeze: the cache is extended, never dropped
        assert fo["replicas_equal"] and fo["same_as_uncached"]
        assert [e["action"] for e in fo["events"] if e["action"] != "record"] == ["extend", "extend", "drop"]
        assert fo["history"][-1]["hits"] == 32
