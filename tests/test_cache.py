"""FrozenPrefixCache: exact fingerprints, the cut, the store, and real fits that must be bit-identical to the
same fit without the cache (LayerFreeze, FreezeOut with boundary moves, thaw, budget, resume)."""

from __future__ import annotations

import tempfile
import warnings

import lightning.pytorch as pl
import pytest
import torch
from models import Net, make_data, snapshot, trainer
from resume import assert_same_weights, run_interrupted, run_uninterrupted
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze
from lightning_freeze.cache.budget import check_size, share
from lightning_freeze.cache.cut import fallback_cut, plan_cut, usable_prefix
from lightning_freeze.cache.fingerprint import LANES, Fingerprinter, dtype_and_shape
from lightning_freeze.cache.keys import CallKeys
from lightning_freeze.cache.stats import EpochStats
from lightning_freeze.cache.store import RowStore
from lightning_freeze.cache.trace import record
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
    assert dtype_and_shape(x) == ("torch.float32", (3, 5, 5))


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


def test_call_keys_cover_every_tensor_argument_positional_or_keyword():
    fp = Fingerprinter(seed=0)
    ids = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7], [1, 2, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    call = CallKeys.of(fp, (ids,), {"attention_mask": mask, "return_dict": True})
    assert call.batch == 4 and call.keys[0] == call.keys[2] and len(set(call.keys)) == 3  # the mask counts
    # a tensor without the batch dimension and the constants go into the table key
    positions = torch.arange(3)[None]
    a = CallKeys.of(fp, (ids,), {"position_ids": positions})
    b = CallKeys.of(fp, (ids,), {"position_ids": positions + 1})
    assert a.keys == b.keys and a.table_key != b.table_key
    assert (
        CallKeys.of(fp, (ids,), {"return_dict": False}).table_key
        != CallKeys.of(fp, (ids,), {"return_dict": True}).table_key
    )


def test_sizes_and_switch_off_rule():
    assert share(1000, available=10, processes=8, default=0.25) == 1000  # absolute sizes are per process
    assert share("2GiB", 0, 1, 0.25) == 2 * 2**30 and share("1.5 MB", 0, 1, 0.25) == 1_500_000
    # a fraction, explicit or the default, is a share of the machine divided by the processes on it
    assert share(0.5, available=1000, processes=1, default=0.25) == 500
    assert share(0.25, available=8000, processes=8, default=0.1) == 250
    assert share(None, available=8000, processes=8, default=0.25) == 250
    assert check_size("2GB", "max_bytes") == "2GB" and check_size(None, "max_bytes") is None
    with pytest.raises(ValueError, match="max_disk_bytes"):
        check_size("lots", "max_disk_bytes")
    with pytest.raises(ValueError, match="neither a fraction"):
        check_size(1.5, "max_bytes")

    def changed(hits, lookups, entries):
        return EpochStats(entries_at_start=entries, lookups=lookups, found=hits).inputs_changed(0.25)

    # repeated inputs: everything cached comes back; capped cache: the cached part comes back
    assert not changed(hits=64, lookups=64, entries=64) and not changed(hits=30, lookups=64, entries=32)
    assert changed(hits=1, lookups=64, entries=64)  # random augmentation: nothing comes back
    assert not changed(hits=0, lookups=64, entries=0)  # nothing to judge
    assert EpochStats().summary(EpochStats().per_row)["hit_rate"] is None  # no lookups, no rate


def _frozen(model, spec, names=None, norm="eval"):
    layers = select_layers(model, spec)
    engine = FreezeEngine(model, layers, norm=norm)
    engine.freeze(names or [layer.name for layer in layers])
    engine.activate_modes()
    return engine


def test_cut_whole_module_graph_and_refusals():
    engine = _frozen(Net(), "backbone.*")
    layers, why = usable_prefix(engine.frozen_prefix(), engine.model)
    cut = plan_cut(engine.model, layers)
    assert why is None and cut.kind == "graph" and cut.root is engine.model.backbone and len(cut.blocks) == 3
    engine = _frozen(Net(), "backbone")
    cut = plan_cut(engine.model, engine.frozen_prefix())
    assert cut.kind == "module" and cut.describe() == "module 'backbone'"
    # norm="train": batch norm keeps training, so its output depends on the batch: never cached
    engine = _frozen(Net(), "backbone.*", norm="train")
    layers, why = usable_prefix(engine.frozen_prefix(), engine.model)
    assert layers == [] and "norm layer" in why and "norm='train'" in why
    # the fallback planner: the largest leading part of the prefix that is exactly one module
    engine = _frozen(Net(), "backbone.*", ["backbone.0", "backbone.1"])
    assert fallback_cut(engine.model, engine.frozen_prefix()).describe() == "module 'backbone.0'"
    engine = _frozen(Net(), "backbone.*")
    assert fallback_cut(engine.model, engine.frozen_prefix()).describe() == "module 'backbone'"


def test_recording_finds_what_the_rest_needs():
    # 0 and 2 are frozen; the ReLU between them is glue; a dropout that no frozen layer owns makes 2's input
    # random, so only 0's output can be served.
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False), model[2].requires_grad_(False)
    rec = record(model, (torch.randn(8, 4),), {}, {"0": model[0], "2": model[2]})
    assert [c.cacheable for c in rec.calls] == [True, True] and rec.needed == {(1, ())}
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2)).train()
    model[0].requires_grad_(False), model[2].requires_grad_(False)
    rec = record(model, (torch.randn(8, 4),), {}, {"0": model[0], "2": model[2]})
    assert [c.cacheable for c in rec.calls] == [True, False] and rec.needed == {(0, ())}
    assert rec.calls[1].why == "its input depends on dropout in training mode (random)"
    # the same dropout module in eval mode is deterministic glue, watched for a change of mode
    model.eval()
    rec = record(model, (torch.randn(8, 4),), {}, {"0": model[0], "2": model[2]})
    assert [c.cacheable for c in rec.calls] == [True, True] and rec.modes == [(model[1], False)]


class Branchy(nn.Module):
    """Glue that branches on a frozen value and computes a mask from the input alone."""

    def __init__(self):
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        mask = (x > 0).float()  # from the input alone: recomputed
        h = self.block(self.embed(x))
        if h.abs().sum() > 0:  # a Python branch on a frozen value: that value must be the real one
            h = h * mask
        return self.head(h)


def test_recording_marks_values_python_reads_and_recomputes_input_only_values():
    model = Branchy()
    model.embed.requires_grad_(False), model.block.requires_grad_(False)
    rec = record(model, (torch.randn(8, 4),), {}, {"embed": model.embed, "block": model.block})
    assert rec.needed == {
        (1, ())
    }  # block's output: read by the branch and by the head; the mask is not stored


class NoisyGlue(nn.Module):
    """Functional dropout between two frozen blocks: the second block's input is random in training."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.b(nn.functional.dropout(self.a(x), 0.5, training=self.training)))


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a per-sample Bernoulli mask in training, identity in eval."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class DropPathGlue(NoisyGlue):
    def __init__(self):
        super().__init__()
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.b(h + self.drop_path(h)))


def test_random_glue_ends_the_cut():
    model = NoisyGlue().train()
    model.a.requires_grad_(False), model.b.requires_grad_(False)
    rec = record(model, (torch.randn(8, 4),), {}, {"a": model.a, "b": model.b})
    assert [c.cacheable for c in rec.calls] == [True, False] and rec.needed == {(0, ())}
    # functional dropout with training=False is deterministic glue
    model.eval()
    rec = record(model, (torch.randn(8, 4),), {}, {"a": model.a, "b": model.b})
    assert [c.cacheable for c in rec.calls] == [True, True] and rec.needed == {(1, ())}
    # drop-path in training mode ends the cut, and the reason names the random op; in eval mode it is identity
    model = DropPathGlue().train()
    model.a.requires_grad_(False), model.b.requires_grad_(False)
    rec = record(model, (torch.randn(8, 4),), {}, {"a": model.a, "b": model.b})
    assert [c.cacheable for c in rec.calls] == [True, False] and "bernoulli_" in rec.calls[1].why
    model.drop_path.eval()
    rec = record(model, (torch.randn(8, 4),), {}, {"a": model.a, "b": model.b})
    assert [c.cacheable for c in rec.calls] == [True, True]


def test_store_budget_tiers_and_rebuild(tmp_path):
    from lightning_freeze.cache.disk import DiskTier

    row = 4 * 4
    store = RowStore(ram_budget=10 * row)  # room for 10 rows of 4 floats, no disk
    rows = torch.arange(48, dtype=torch.float32).reshape(12, 4)
    keys = [bytes([i]) * 16 for i in range(12)]
    assert store.insert("s", keys, [rows]) == 10 and store.full and store.entries == 10
    found = store.lookup("s", keys)
    assert found[10:] == [-1, -1]
    assert torch.equal(store.gather("s", found[:10][::-1], torch.device("cpu"))[0], rows[:10].flip(0))
    # past the RAM budget, rows go to the disk tier, within its own budget; two slots per sample
    disk = DiskTier(tmp_path, budget=1 << 20, reserve=0)
    store = RowStore(ram_budget=5 * (row + 6), disk=disk)
    labels = torch.arange(12, dtype=torch.bfloat16)[:, None].repeat(1, 3)
    assert store.insert("s", keys, [rows, labels]) == 12 and store.disk_entries == 7 and len(disk.files) == 1
    got = store.gather("s", store.lookup("s", keys[::-1]), torch.device("cpu"))
    assert torch.equal(got[0], rows.flip(0)) and torch.equal(got[1], labels.flip(0))
    new = store.rebuild(lambda v: [v[0] * 2], batch_rows=4, min_rows=3, device=torch.device("cpu"))
    assert torch.equal(new.gather("s", new.lookup("s", keys), torch.device("cpu"))[0], rows * 2)
    assert not store.entries and disk.allocated == new.disk_bytes  # the old rows' chunk files are gone
    new.clear()
    assert disk.files == [] and disk.allocated == 0
    small = DiskTier(tmp_path, budget=100, reserve=0)  # the disk budget is a hard bound
    store = RowStore(ram_budget=0, disk=small)
    assert store.insert("s", keys, [rows]) <= 100 // row and small.allocated <= 100
    disk.release(), small.release()


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
    return fit([LayerFreeze("backbone.*")])[0]


def test_layer_freeze_bit_identical_and_warm(baseline):
    cache = FrozenPrefixCache()
    model, t = fit([LayerFreeze("backbone.*")], cache=cache)
    same(baseline, model)
    hist = cache.history
    assert all("'backbone.0'..'backbone.2' (3 blocks)" in h["cached"] for h in hist)
    assert hist[0]["hits"] == 0 and all(h["hits"] == h["lookups"] == 64 for h in hist[1:])
    # validation batches are never looked up nor stored
    assert hist[-1]["entries"] == 64 and hist[-1]["bytes"] > 0 and hist[-1]["off"] is None
    assert t.callback_metrics["cache/hit_rate"] == 1.0 and "cache/time_saved_s" in t.callback_metrics
    assert hist[0]["verified"] == 1  # rows were checked against another batch composition while filling
    assert "forward" not in model.backbone.__dict__ and cache.cut is None  # restored and released
    assert not any("_compiled_call_impl" in m.__dict__ for m in model.modules())


def test_named_module_and_budget_cap(baseline):
    row = 16 * 4
    cache = FrozenPrefixCache(module="backbone", max_bytes=40 * row, max_disk_bytes=0)
    model, _ = fit([LayerFreeze("backbone.*")], cache=cache)
    same(baseline, model)
    last = cache.history[-1]
    assert last["full"] and last["entries"] == 40 and 0 < last["hit_rate"] < 1 and last["off"] is None


def test_disk_tier_serves_past_the_ram_budget(baseline, tmp_path):
    row = 16 * 4
    cache = FrozenPrefixCache(max_bytes=20 * row, max_disk_bytes="1MB", disk_dir=tmp_path / "rows")
    model, _ = fit([LayerFreeze("backbone.*")], cache=cache)
    same(baseline, model)
    last = cache.history[-1]
    assert last["entries"] == 64 and last["disk_entries"] == 44 and last["hit_rate"] == 1.0
    assert 0 < last["disk_bytes"] <= 10**6
    assert not list(tmp_path.rglob("*"))  # the files and their folder are gone after fit


def test_new_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="FrozenPrefixCache: max_disk_bytes: cannot read 'lots'"):
        FrozenPrefixCache(max_disk_bytes="lots")
    with pytest.raises(ValueError, match="FrozenPrefixCache: disk_dir must be a path"):
        FrozenPrefixCache(disk_dir=3)
    with pytest.raises(ValueError, match="FrozenPrefixCache: on_mismatch='raise' is not supported"):
        FrozenPrefixCache(on_mismatch="raise")
    with pytest.raises(ValueError, match="FrozenPrefixCache: fixed_shards must be true or false"):
        FrozenPrefixCache(fixed_shards="yes")


def test_public_surface_is_the_options_history_events_and_cut():
    import inspect

    from lightning.pytorch.callbacks import Callback

    cache = FrozenPrefixCache()
    options = set(inspect.signature(FrozenPrefixCache).parameters)
    ours = {n for n in dir(cache) if not n.startswith("_")} - set(dir(Callback()))
    assert ours == options | {"history", "events", "cut"}


def test_unfrozen_named_module_is_computed_as_usual(baseline):
    cache = FrozenPrefixCache(module="head")
    with pytest.warns(UserWarning, match="'head' has trainable parameters"):
        model, t = fit([LayerFreeze("backbone.*")], cache=cache)
    same(baseline, model)
    assert all(h["lookups"] == 0 for h in cache.history)
    assert "cache/hit_rate" not in t.callback_metrics  # no lookups: no rate logged


def test_freezeout_boundary_moves_extend_the_cache():
    make = lambda: FreezeOut(layers="backbone.*", t0=0.3)  # noqa: E731
    ref, _ = fit([make()], epochs=4)
    cache = FrozenPrefixCache()
    model, _ = fit([make()], cache=cache, epochs=4)
    same(ref, model)
    actions = [e["action"] for e in cache.events]
    assert actions.count("extend") == 2 and "invalidate" not in actions
    assert "(3 blocks)" in cache.history[-1]["cached"] and cache.history[-1]["hit_rate"] == 1.0


def test_thaw_invalidates():
    make = lambda: LayerFreeze("backbone.*", until_step=12)  # noqa: E731
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
        fit([LayerFreeze("backbone.*")], cache=cache, data=Augmented())
    ours = [w for w in caught if "FrozenPrefixCache switched off" in str(w.message)]
    assert len(ours) == 1 and "augmentation" in str(ours[0].message)
    assert cache.history[-1]["off"] and cache.cut is None and cache.history[1]["hits"] == 0
    assert cache.history[-1]["lookups"] == 0  # computed as usual afterwards


def test_resume_is_bit_identical_with_the_cache(tmp_path):
    make_model = lambda: Net("adam")  # noqa: E731
    full, _ = run_uninterrupted(make_model, lambda: [LayerFreeze("backbone.*")], tmp_path, max_epochs=3)
    resumed, t = run_interrupted(
        make_model,
        lambda: [LayerFreeze("backbone.*"), FrozenPrefixCache()],
        tmp_path,
        stop_at=11,
        max_epochs=3,
    )
    assert_same_weights(full, resumed)
    cache = next(c for c in t.callbacks if isinstance(c, FrozenPrefixCache))
    # nothing came from the checkpoint: the resumed run refilled the cache and served from it
    assert cache.history[0]["entries"] == 40 and cache.history[-1]["entries"] == 64
    assert cache.history[-1]["found"] == 40 and cache.history[-1]["off"] is None


def test_digits_cnn_rows_served_match_fresh_computation():
    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset

    data = Subset(DigitsDataset(), range(96))

    def run(cache):
        torch.manual_seed(0)
        model = DigitsClassifier(pretrained=False)
        cbs = [FreezeOut(layers="auto", t0=0.5)] + ([cache] if cache else [])
        t = trainer(max_epochs=3, callbacks=cbs, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"))
        t.fit(model, DataLoader(data, batch_size=16, shuffle=True))
        return snapshot(model)

    cache = FrozenPrefixCache(on_mismatch="off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = run(cache)
    assert not [w for w in caught if "FrozenPrefixCache" in str(w.message)]  # the checks found no difference
    off = run(None)
    assert all(torch.equal(on[k], off[k]) for k in on)
    # the check of freshly stored rows, and one more each time rows were carried over to a grown cut
    assert sum(h["verified"] for h in cache.history) >= 2 and cache.history[-1]["hit_rate"] == 1.0


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
            callbacks=[LayerFreeze("backbone.*")] + ([cache] if cache else []),
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
    make = lambda: FreezeOut(layers="auto", t0=0.3)  # noqa: E731
    ref, _ = fit([make()], epochs=3)
    cache = FrozenPrefixCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = fit([make()], cache=cache, epochs=3)
    same(ref, model)
    assert not [w for w in caught if "FrozenPrefixCache" in str(w.message)]
    assert "(3 blocks)" in cache.history[-1]["cached"]
    assert [e["action"] for e in cache.events if e["action"] != "record"] == ["extend", "extend", "drop"]
    assert cache.history[-1]["hits"] == 64


def test_a_step_where_the_frozen_prefix_did_not_change_does_not_plan_again():
    # The freezing engine counts its freezes and thaws: the cache plans again only when that count moves
    # (or when it dropped its rows), never on a step where nothing changed.
    cache = FrozenPrefixCache()
    plans = []
    refresh = cache._refresh
    cache._refresh = lambda pl_module: (plans.append(1), refresh(pl_module))[1]
    make = lambda: LayerFreeze("backbone.*", until_step=12)  # noqa: E731
    fit([make()], cache=cache)  # 24 steps, a thaw at step 12
    assert len(plans) == 2


# ---------------------------------------------------------------------------------------------- sample ids
class Indexed(Dataset):
    """``(x, y, index)`` samples (SplitRun's ``return_indices`` shape); ``change(i, x)`` may alter the input."""

    def __init__(self, change=None):
        self.base, self.change = make_data(64, 0), change

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (self.change(i, x) if self.change else x), y, i


class IdNet(Net):
    """Net whose batches are ``(x, y, ids)`` tuples or ``{"x", "y", "ids"}`` dicts."""

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        pass


def id_fit(cache, data=None, collate=None, epochs=4, callbacks=None):
    torch.manual_seed(0)
    model = IdNet()
    cbs = [*(callbacks or []), LayerFreeze("backbone.*")] + ([cache] if cache is not None else [])
    t = trainer(max_epochs=epochs, callbacks=cbs, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"))
    t.fit(model, DataLoader(data or Indexed(), batch_size=8, shuffle=True, collate_fn=collate))
    return model


@pytest.fixture(scope="module")
def id_baseline():
    return id_fit(None)


def test_sample_ids_key_the_rows_once_every_id_came_back_with_the_same_input(id_baseline):
    cache = FrozenPrefixCache(sample_ids=-1)
    same(id_baseline, id_fit(cache))
    hist = cache.history
    # epoch 0 hashes every input, epoch 1 hashes them again and compares each with its id's; from then on one
    # row per step is hashed and compared
    assert [h["hashed"] for h in hist] == [64, 64, 8, 8]
    assert all(h["hits"] == h["lookups"] == 64 for h in hist[1:])
    assert "ids_off" not in [e["action"] for e in cache.events]
    # hashing every row (sample_ids=None) serves the same rows
    hashing = FrozenPrefixCache(sample_ids=None)
    same(id_baseline, id_fit(hashing))
    assert [h["hashed"] for h in hashing.history] == [64] * 4


def test_sample_ids_follow_the_rows_when_freezeout_moves_the_boundary():
    def run(cache):
        torch.manual_seed(0)
        model = IdNet()
        cbs = [FreezeOut(layers="backbone.*", t0=0.3)] + ([cache] if cache else [])
        t = trainer(max_epochs=4, callbacks=cbs, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"))
        t.fit(model, DataLoader(Indexed(), batch_size=8, shuffle=True))
        return model

    cache = FrozenPrefixCache(sample_ids=-1)
    same(run(None), run(cache))
    actions = [e["action"] for e in cache.events]
    assert "extend" in actions and "ids_off" not in actions
    assert (
        cache.history[-1]["hit_rate"] == 1.0 and cache.history[-1]["hashed"] == 8
    )  # ids kept across the moves


def test_sample_ids_from_a_dict_batch_key_or_a_callable(id_baseline):
    def as_dict(samples):
        x, y, i = (
            torch.stack([s[k] for s in samples]) if k < 2 else torch.tensor([s[2] for s in samples])
            for k in range(3)
        )
        return {"x": x, "y": y, "ids": i}

    for source in ("ids", lambda batch: batch["ids"]):
        cache = FrozenPrefixCache(sample_ids=source)
        same(id_baseline, id_fit(cache, collate=as_dict))
        assert cache.history[-1]["hashed"] == 8 and cache.history[-1]["hit_rate"] == 1.0


def test_sample_ids_that_do_not_follow_the_inputs_fall_back_to_hashing(id_baseline):
    # every input changes for its id (random augmentation): found on the first revisit, before a row is served
    noisy = Indexed(change=lambda i, x: x + 0.01 * torch.randn_like(x))
    cache = FrozenPrefixCache(sample_ids=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        id_fit(cache, data=noisy, epochs=3)
    texts = [str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)]
    assert any("changed since it was first seen" in t for t in texts)
    assert any("switched off" in t for t in texts) and cache.history[1]["hits"] == 0
    assert [e["action"] for e in cache.events if e["action"] != "record"] == ["ids_off", "drop", "off"]
    # ids that do not name samples (the position in the batch): found, and hashing serves the right rows
    cache = FrozenPrefixCache(sample_ids=lambda batch: torch.arange(len(batch[0])))
    with pytest.warns(UserWarning, match="changed since it was first seen"):
        model = id_fit(cache)
    same(id_baseline, model)
    assert cache.history[-1]["hit_rate"] == 1.0 and cache.history[-1]["hashed"] == 64


class Scaled(Indexed):
    """Inputs scaled by ``factor`` (set between epochs: an input that changes after its first revisit)."""

    factor = 1.0

    def __getitem__(self, i):
        x, y, i = super().__getitem__(i)
        return x * self.factor, y, i


class ScaleFrom(pl.Callback):
    def __init__(self, data, epoch):
        self.data, self.epoch = data, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        self.data.factor = 2.0 if trainer.current_epoch >= self.epoch else 1.0


def test_an_input_that_changes_after_its_first_revisit_is_caught_before_it_is_served():
    data = Scaled()
    ref = id_fit(None, data=data, epochs=5, callbacks=[ScaleFrom(data, 3)])
    cache = FrozenPrefixCache(sample_ids=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = id_fit(cache, data=data, epochs=5, callbacks=[ScaleFrom(data, 3)])
    assert any("sample id" in str(w.message) and "changed" in str(w.message) for w in caught)
    same(ref, model)
    hist = cache.history
    assert hist[2]["hit_rate"] == 1.0 and hist[2]["hashed"] == 8  # served by id
    # epoch 3: the first step's sampled row differs, so every row is hashed and nothing stale is served; with all
    # inputs changed, the cache then switches off (min_hit_rate)
    assert hist[3]["hits"] == 0 and hist[3]["hashed"] == 64 and hist[4]["off"] and hist[4]["lookups"] == 0


def test_sample_ids_are_checked_at_construction_and_at_the_first_batch():
    with pytest.raises(ValueError, match="FrozenPrefixCache: sample_ids must be 'auto', None"):
        FrozenPrefixCache(sample_ids=1.5)
    with pytest.raises(ValueError, match="FrozenPrefixCache: sample_ids must be 'auto', None"):
        FrozenPrefixCache(sample_ids=True)
    with pytest.raises(ValueError, match=r"sample_ids=5 finds nothing in the training batch"):
        id_fit(FrozenPrefixCache(sample_ids=5), epochs=1)
    with pytest.raises(
        ValueError, match=r"sample_ids=0 must give one integer id per sample .* torch.float32"
    ):
        id_fit(FrozenPrefixCache(sample_ids=0), epochs=1)


def test_splitrun_return_indices_are_used_by_default():
    from lightning_freeze import SplitRunDataModule

    def run(cache):
        torch.manual_seed(0)
        model = IdNet()
        dm = SplitRunDataModule(make_data(80, 0), batch_size=8, return_indices=True, remainder="drop")
        cbs = [LayerFreeze("backbone.*")] + ([cache] if cache else [])
        t = trainer(max_epochs=3, callbacks=cbs, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"))
        t.fit(model, datamodule=dm)
        return model

    cache = FrozenPrefixCache()
    same(run(None), run(cache))
    n, steps = cache.history[0]["lookups"], cache.history[0]["steps"]
    assert n > 32 and [h["hashed"] for h in cache.history] == [n, n, steps]
    assert cache.history[-1]["hit_rate"] == 1.0


# ---------------------------------------------------------------------------------------------- rows without a copy
class WritesIntoFeatures(Net):
    """Writes into the frozen backbone's output in place (as a torchvision ResNet's ``relu(inplace=True)`` would)."""

    def forward(self, x):
        return self.head(self.backbone(x).mul_(0.5))


def test_a_batch_asked_for_in_stored_order_is_served_without_a_copy():
    base = fit([LayerFreeze("backbone.*")], shuffle=False)[0]
    cache = FrozenPrefixCache()
    same(base, fit([LayerFreeze("backbone.*")], cache=cache, shuffle=False)[0])
    assert [h["uncopied"] for h in cache.history] == [0, 64, 64] and cache.history[-1]["hit_rate"] == 1.0
    assert "copy_rows" not in [e["action"] for e in cache.events]
    # shuffled samples: the rows are gathered (copied)
    shuffled = FrozenPrefixCache()
    fit([LayerFreeze("backbone.*")], cache=shuffled)
    assert shuffled.history[-1]["uncopied"] < 64 and shuffled.history[-1]["hit_rate"] == 1.0


def test_a_forward_that_writes_into_rows_served_without_a_copy_gets_copies():
    def run(cache):
        torch.manual_seed(0)
        return fit(
            [LayerFreeze("backbone.*")], cache=cache, shuffle=False, model=WritesIntoFeatures(), epochs=4
        )[0]

    cache = FrozenPrefixCache()
    same(run(None), run(cache))
    events = [e for e in cache.events if e["action"] == "copy_rows"]
    assert len(events) == 1 and "in place" in events[0]["why"]
    hist = cache.history
    # the first served batch was written into: its rows are forgotten and computed again in epoch 2
    assert (
        hist[1]["uncopied"] == 8
        and hist[1]["hits"] == 64
        and hist[2]["hits"] == 56
        and hist[2]["stored"] == 8
    )
    assert hist[3]["hits"] == 64 and all(h["uncopied"] == 0 for h in hist[2:])


class SkipsABlockForSmallBatches(Net):
    """Calls its last frozen block only for batches of 8 or more: which blocks run depends on the data."""

    def __init__(self):
        super().__init__()
        blocks = list(self.backbone)
        del self.backbone
        self.b0, self.b1, self.b2 = blocks

    def forward(self, x):
        h = self.b1(self.b0(x))
        return self.head(self.b2(h) if len(x) >= 8 else h)


def test_a_prefix_that_calls_other_blocks_for_a_smaller_batch_switches_the_cache_off():
    # The check of a stored batch re-runs half of it; here that half calls fewer blocks than the recorded call,
    # so the cache cannot compute a sub-batch's rows: it switches off with its reason and training is unchanged.
    def run(cache):
        torch.manual_seed(0)
        return fit([LayerFreeze("re:b[012]")], cache=cache, model=SkipsABlockForSmallBatches())[0]

    cache = FrozenPrefixCache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = run(cache)
    same(run(None), on)
    off = [e for e in cache.events if e["action"] == "off"]
    assert len(off) == 1 and "stopped calling its frozen blocks as recorded" in off[0]["why"]
    assert sum(h["hits"] for h in cache.history) == 0


def test_the_ram_tensor_is_sized_for_an_epoch_at_the_first_store():
    rows = torch.randn(300, 32, 32, 8)  # 32 KiB rows: 256 of them fill the default first chunk
    keys = [i.to_bytes(16, "little") for i in range(300)]
    store = RowStore(ram_budget=1 << 30)
    store.expected_rows = 300
    store.insert("t", keys[:10], [rows[:10]])
    first = store.tables["t"].chunks[0].tensors[0]
    store.insert("t", keys[10:], [rows[10:]])
    assert (
        store.tables["t"].chunks[0].tensors[0] is first and store.tables["t"].capacity == 300
    )  # no regrowth
    assert torch.equal(store.gather("t", store.lookup("t", keys), torch.device("cpu"))[0], rows)
    capped = RowStore(ram_budget=100 * 32 * 32 * 8 * 4)  # within the budget only
    capped.expected_rows = 300
    assert capped.insert("t", keys, [rows]) == 100 and capped.full
