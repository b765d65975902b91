"""FrozenPrefixCache under real 2-process DDP on CPU: each rank caches its own shard, results unchanged."""

import pytest
from ddp import run_ddp_script


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One launch of the 2-process script serves every test here (starting processes is the slow part)."""
    return run_ddp_script("cache_ddp.py", tmp_path_factory.mktemp("cache-ddp"), timeout=400)


@pytest.mark.ddp
def test_each_rank_caches_its_shard_and_replicas_stay_bit_identical(reports):
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


@pytest.mark.ddp
def test_reshuffling_sampler_is_named_once_and_fixed_shards_keep_the_cache_warm(reports):
    # A plain DataLoader(shuffle=True): Lightning's DistributedSampler deals each rank other samples every epoch.
    for r in reports:
        plain, fixed = r["plain_loader"], r["plain_loader_fixed"]
        (warning,) = [w for w in plain["warnings"] if "DistributedSampler" in w]
        assert "a different subset every epoch" in warning and "fixed_shards=True" in warning
        assert min(h["hits"] / h["lookups"] for h in plain["history"][1:]) < 0.95
        assert not fixed["warnings"]
        assert all(h["hits"] / h["lookups"] >= 0.95 for h in fixed["history"][1:])
        assert fixed["history"][-1]["entries"] == 32  # each rank keeps its own half
