"""FrozenPrefixCache: exact fingerprints, planning, storage, and real fits that must be bit-identical
to the same fit without the cache (LayerFreeze, FreezeOut with boundary moves, thaw, budget, resume)."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from models import Net, make_data, snapshot, trainer
from resume import assert_same_weights, run_interrupted, run_uninterrupted
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze
from lightning_freeze.cache.callback import find_plan
from lightning_freeze.cache.fingerprint import LANES, Fingerprinter, signature
from lightning_freeze.cache.store import RowStore, parse_bytes, should_switch_off
from lightning_freeze.engine.freezing import FreezeEngine
from lightning_freeze.engine.layers import select_layers

# ---------------------------------------------------------------------------------------------- pure parts


def test_fingerprints_are_exact_per_row():
    fp = Fingerprinter()
    x = torch.randn(16, 3, 5, 5)
    keys = fp.rows(x)
    assert len(keys) == 16 and len(set(keys)) == 16 and all(len(k) == 16 for k in keys)
    assert fp.rows(x.clone()) == keys  # content, not identity
    y = x.clone()
    y[7, 2, 4, 4] = torch.nextafter(y[7, 2, 4, 4], torch.tensor(1e9))  # one ulp in one sample
    changed = [i for i, (a, b) in enumerate(zip(keys, fp.rows(y), strict=True)) if a != b]
    assert changed == [7]
    assert fp.rows(torch.tensor([[0.0]])) != fp.rows(torch.tensor([[-0.0]]))  # bits, not values
    for t in (
        torch.randint(0, 255, (4, 9), dtype=torch.uint8),
        torch.rand(4, 3) > 0.5,
        torch.randint(-(2**40), 2**40, (4, 3)),
        torch.randn(4, 3).half(),
        torch.randn(4, 2, dtype=torch.cfloat),
    ):
        assert len(set(fp.rows(t))) == len(set(map(tuple, t.reshape(4, -1).tolist())))
    assert signature(x) == ("torch.float32", (3, 5, 5))


def _reference_lane(words: list[int], keys: list[int]) -> int:
    """One lane of the multilinear hash in exact Python integers: (sum k_i * w_i mod 2**64) >> 32."""
    total = sum((k % 2**64) * (w % 2**64) for k, w in zip(keys, words, strict=True)) % 2**64
    return total >> 32


def test_device_fingerprint_matches_exact_integer_arithmetic():
    # The hash used on GPUs relies on int64 products and sums wrapping modulo 2**64: check it against
    # Python's big integers.
    fp = Fingerprinter(seed=12345)
    x = torch.randint(
        -(2**31), 2**31 - 1, (3, 37), generator=torch.Generator().manual_seed(0), dtype=torch.int64
    )
    got = fp.words(x)
    keys = fp.keys(37, torch.device("cpu")).tolist()
    for row in range(3):
        lanes = [_reference_lane(x[row].tolist(), keys[lane]) for lane in range(LANES)]
        want = [(lanes[0] << 32) | lanes[1], (lanes[2] << 32) | lanes[3]]
        assert got[row].tolist() == [w - 2**64 if w >= 2**63 else w for w in want]
    fp = Fingerprinter(seed=1)
    x = torch.randn(8, 40000)  # longer than one chunk: the tree path
    a = fp.device_rows(x)
    y = x.clone()
    y[3, 39999] += 1.0
    b = fp.device_rows(y)
    assert a.shape == (8, 2) and (a != b).any(dim=1).nonzero().flatten().tolist() == [3]


def test_parse_bytes_and_switch_off_rule():
    assert parse_bytes(None) is None and parse_bytes(1000) == 1000
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5 MB") == 1_500_000
    assert parse_bytes(0.5, available=1000) == 500
    with pytest.raises(ValueError):
        parse_bytes("lots")
    # repeated inputs: everything cached comes back; capped cache: the cached part comes back
    assert not should_switch_off(hits=64, lookups=64, entries_at_start=64, min_hit_rate=0.25)
    assert not should_switch_off(hits=30, lookups=64, entries_at_start=32, min_hit_rate=0.25)
    # random augmentation: nothing comes back
    assert should_switch_off(hits=1, lookups=64, entries_at_start=64, min_hit_rate=0.25)
    assert not should_switch_off(
        hits=0, lookups=64, entries_at_start=0, min_hit_rate=0.25
    )  # nothing to judge


def _frozen(model, spec, names=None, norm="eval"):
    layers = select_layers(model, spec)
    engine = FreezeEngine(model, layers, norm=norm)
    engine.freeze(names or [layer.name for layer in layers])
    managed = {id(m) for m in engine.eval_modules()}
    return engine, managed


def test_plan_whole_module_segment_and_refusals():
    model = Net()
    engine, managed = _frozen(model, "backbone.*")
    plan = find_plan(model, engine.frozen_prefix(), managed)
    assert plan.kind == "module" and plan.target is model.backbone
    engine, managed = _frozen(Net(), "backbone.*", ["backbone.0", "backbone.1"])
    plan = find_plan(engine.model, engine.frozen_prefix(), managed)
    assert (
        plan.kind == "segment" and plan.target is engine.model.backbone and (plan.start, plan.stop) == (0, 1)
    )
    # norm="train": batch norm keeps training, so its output depends on the batch: never cached
    engine, managed = _frozen(Net(), "backbone.*", norm="train")
    assert find_plan(engine.model, engine.frozen_prefix(), managed) is None
    # a dropout that no frozen layer owns sits between frozen convs: refused
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2))
    engine, managed = _frozen(model, ["0", "2"])
    assert find_plan(model, engine.frozen_prefix(), managed) is None
    assert find_plan(model, engine.frozen_prefix()[:1], managed).describe() == "module '0'"


def test_store_budget_and_transform():
    store = RowStore(budget=10 * 4 * 4, pin=False)  # room for 10 rows of 4 floats
    sig = ("s",)
    rows = torch.arange(48, dtype=torch.float32).reshape(12, 4)
    keys = [bytes([i]) * 16 for i in range(12)]
    assert store.insert(sig, keys, rows) == 10 and store.full and store.entries == 10
    slots = store.lookup(sig, keys)
    assert slots[10:] == [-1, -1]
    assert torch.equal(store.gather(sig, slots[:10][::-1], torch.device("cpu")), rows[:10].flip(0))
    store.transform(lambda r: r * 2, batch_rows=4, min_rows=3, device=torch.device("cpu"))
    assert torch.equal(store.gather(sig, store.lookup(sig, keys[:10]), torch.device("cpu")), rows[:10] * 2)


# ---------------------------------------------------------------------------------------------- real fits


def fit(callbacks, *, cache=None, shuffle=True, epochs=3, data=None, model=None, **kw):
    torch.manual_seed(0)
    model = model or Net()
    cbs = list(callbacks) + ([cache] if cache is not None else [])
    t = trainer(max_epochs=epochs, callbacks=cbs, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"), **kw)
    train = DataLoader(data or make_data(64, 0), batch_size=8, shuffle=shuffle)
    t.fit(model, train, DataLoader(make_data(24, 1), batch_size=8))
    return model, t


def same(a, b):
    assert a.losses == b.losses
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.fixture(scope="module")
def baseline():
    return fit([LayerFreeze("backbone.*", plot=False)])[0]


def test_layer_freeze_bit_identical_and_warm(baseline):
    cache = FrozenPrefixCache()
    model, t = fit([LayerFreeze("backbone.*", plot=False)], cache=cache)
    same(baseline, model)
    hist = cache.history
    assert [h["cached"] for h in hist] == ["module 'backbone'"] * 3
    assert hist[0]["train_hits"] == 0 and all(h["train_hits"] == h["train_lookups"] == 64 for h in hist[1:])
    assert hist[-1]["entries"] == 64 + 24 and hist[-1]["bytes"] > 0 and hist[-1]["off"] is None
    assert t.callback_metrics["cache/hit_rate"] == 1.0 and "cache/time_saved_s" in t.callback_metrics
    assert cache._verify_left == 0  # a served batch was recomputed and matched exactly
    assert "forward" not in model.backbone.__dict__ and cache.store is None  # restored and released


def test_named_module_and_budget_cap(baseline):
    row = 16 * 4
    cache = FrozenPrefixCache(module="backbone", max_bytes=40 * row)
    model, _ = fit([LayerFreeze("backbone.*", plot=False)], cache=cache)
    same(baseline, model)
    last = cache.history[-1]
    assert last["full"] and last["entries"] == 40 and 0 < last["hit_rate"] < 1 and last["off"] is None


def test_unfrozen_named_module_is_computed_as_usual(baseline):
    cache = FrozenPrefixCache(module="head")
    with pytest.warns(UserWarning, match="'head' has trainable parameters"):
        model, _ = fit([LayerFreeze("backbone.*", plot=False)], cache=cache)
    same(baseline, model)
    assert all(h["lookups"] == 0 for h in cache.history)


def test_freezeout_boundary_moves_extend_the_cache():
    make = lambda: FreezeOut(layers="backbone.*", t0=0.3, plot=False)  # noqa: E731
    ref, _ = fit([make()], epochs=4)
    cache = FrozenPrefixCache()
    model, _ = fit([make()], cache=cache, epochs=4)
    same(ref, model)
    assert [e["action"] for e in cache.events] == ["extend", "extend", "drop"]
    assert cache.history[-1]["cached"] == "module 'backbone'" and cache.history[-1]["hit_rate"] == 1.0


def test_thaw_invalidates():
    make = lambda: LayerFreeze("backbone.*", until_step=12, plot=False)  # noqa: E731
    ref, _ = fit([make()])
    cache = FrozenPrefixCache()
    model, _ = fit([make()], cache=cache)
    same(ref, model)
    assert cache.history[0]["entries"] > 0 and cache.history[-1]["cached"] is None
    assert cache.history[-1]["lookups"] == 0


class Augmented(Dataset):
    def __init__(self):
        self.base = make_data(64, 0)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.randn_like(x), y


def test_random_augmentation_switches_it_off():
    cache = FrozenPrefixCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([LayerFreeze("backbone.*", plot=False)], cache=cache, data=Augmented())
    ours = [w for w in caught if "FrozenPrefixCache switched off" in str(w.message)]
    assert len(ours) == 1 and "augmentation" in str(ours[0].message)
    assert cache.off_reason and cache.store is None and cache.history[1]["train_hits"] == 0
    assert cache.history[-1]["lookups"] == 0  # computed as usual afterwards


def test_resume_is_bit_identical_with_the_cache(tmp_path):
    make_model = lambda: Net("adam")  # noqa: E731
    full, _ = run_uninterrupted(
        make_model, lambda: [LayerFreeze("backbone.*", plot=False)], tmp_path, max_epochs=3
    )
    resumed, t = run_interrupted(
        make_model,
        lambda: [LayerFreeze("backbone.*", plot=False), FrozenPrefixCache()],
        tmp_path,
        stop_at=11,
        max_epochs=3,
    )
    assert_same_weights(full, resumed)
    cache = next(c for c in t.callbacks if isinstance(c, FrozenPrefixCache))
    # nothing came from the checkpoint: the resumed run refilled the cache and served from it
    assert cache.history[0]["entries"] == 40 + 24 and cache.history[-1]["entries"] == 64 + 24
    assert cache.history[-1]["train_hits"] > 0


def test_digits_cnn_rows_served_match_fresh_computation():
    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset

    data = Subset(DigitsDataset(), range(96))

    def run(cache):
        torch.manual_seed(0)
        model = DigitsClassifier(pretrained=False)
        cbs = [LayerFreeze("backbone", plot=False)] + ([cache] if cache else [])
        t = trainer(max_epochs=3, callbacks=cbs, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"))
        t.fit(model, DataLoader(data, batch_size=16, shuffle=True))
        return snapshot(model)

    cache = FrozenPrefixCache(verify=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = run(cache)
    assert not [w for w in caught if "FrozenPrefixCache" in str(w.message)]  # verify found no difference
    off = run(None)
    assert all(torch.equal(on[k], off[k]) for k in on)
    assert cache._verify_left == 0 and cache.history[-1]["hit_rate"] == 1.0


def test_hydra_cache_group_builds_the_callback(conf_dir):
    from hydra import compose, initialize_config_dir

    from lightning_freeze.app.main import build_callbacks

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        default = compose("lightning_freeze")
        on = compose("lightning_freeze", overrides=["cache=frozen_prefix", "cache.max_bytes=1GB"])
    assert build_callbacks(default.get("cache"), "cache") == []
    (cache,) = build_callbacks(on.cache, "cache")
    assert isinstance(cache, FrozenPrefixCache) and cache.max_bytes == "1GB" and cache.module == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pinned_path_is_bit_identical():
    def run(cache):
        torch.manual_seed(0)
        model = Net()
        t = trainer(
            max_epochs=3,
            accelerator="gpu",
            devices=1,
            callbacks=[LayerFreeze("backbone.*", plot=False)] + ([cache] if cache else []),
            default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"),
        )
        t.fit(model, DataLoader(make_data(64, 0), batch_size=8, shuffle=True))
        return model

    cache = FrozenPrefixCache()
    on, off = run(cache), run(None)
    same(off, on)
    assert cache.history[-1]["hit_rate"] == 1.0


def test_freezeout_auto_extends_the_cache_as_each_block_freezes():
    # layers="auto" gives the backbone's blocks; FreezeOut freezes them one by one and the cache pushes its
    # stored rows through each newly frozen block instead of starting over, with results unchanged.
    make = lambda: FreezeOut(layers="auto", t0=0.3, plot=False)  # noqa: E731
    ref, _ = fit([make()], epochs=3)
    cache = FrozenPrefixCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = fit([make()], cache=cache, epochs=3)
    same(ref, model)
    assert not [w for w in caught if "FrozenPrefixCache" in str(w.message)]
    assert cache.history[-1]["cached"] == "module 'backbone'"
    assert [e["action"] for e in cache.events] == ["extend", "extend", "drop"]  # drop: end of fit
    assert cache.history[-1]["train_hits"] == 64
