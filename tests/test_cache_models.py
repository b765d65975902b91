"""FrozenPrefixCache on third-party models (tiny random transformers models from tests/hf_models.py) and the digits
CNN, measured from outside: forward hooks on every frozen module count the calls in training steps. From the second
epoch on none may run, and losses and weights must be bit-identical to the same fit without the cache."""

from __future__ import annotations

import tempfile
import warnings

import lightning.pytorch as pl
import pytest
import torch
from hf_models import FIXTURES
from models import snapshot, trainer
from torch.utils.data import DataLoader, Subset

from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze
from lightning_freeze.engine.layers import named_modules

FROZEN = {
    "resnet": ["model.resnet.embedder", "model.resnet.encoder.stages.0"],
    "vit": ["model.vit.embeddings", "model.vit.layers.0", "model.vit.layers.1"],
    "convnext": ["model.convnext.embeddings", "model.convnext.encoder.stages.0"],
    "bert": ["model.bert.embeddings", "model.bert.encoder.layer.0", "model.bert.encoder.layer.1"],
}


class FrozenRuns(pl.Callback):
    """Counts, per epoch, the forward calls of every module inside ``names`` made during training steps, and
    records each step's loss."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.calls, self.losses, self.handles = names, {}, [], []
        self.epoch: int | None = None

    def on_train_start(self, trainer, pl_module):
        modules = named_modules(pl_module)  # without torch.compile's _orig_mod
        for name in self.names:
            for sub in modules[name].modules():
                self.handles.append(sub.register_forward_hook(self._count))

    def _count(self, *_):
        if self.epoch is not None:
            self.calls[self.epoch] = self.calls.get(self.epoch, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epoch = None
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()


def fit_fixture(kind, freezer, cache=None, epochs=2, validate=False, **kw):
    """24 training samples in batches of 8, shuffled; validation (16 samples) only if asked."""
    torch.manual_seed(0)
    fixture = FIXTURES[kind]
    model = fixture.model()
    runs = FrozenRuns(FROZEN.get(kind, []))
    callbacks = [freezer, runs] + ([cache] if cache is not None else [])
    t = trainer(max_epochs=epochs, callbacks=callbacks, limit_val_batches=1.0 if validate else 0, **kw)
    t.fit(model, fixture.loader(24, 0, 8, shuffle=True), fixture.loader(16, 1, 8) if validate else None)
    return model, runs


def assert_same(a, runs_a, b, runs_b):
    assert runs_a.losses == runs_b.losses
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("kind", sorted(FROZEN))
def test_no_frozen_module_runs_once_the_cache_is_warm(kind):
    cache = FrozenPrefixCache(max_disk_bytes=0)
    validate = kind == "bert"  # validation batches are never looked up nor stored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on, runs_on = fit_fixture(kind, LayerFreeze(FROZEN[kind]), cache, validate=validate)
    assert not [str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)]
    off, runs_off = fit_fixture(kind, LayerFreeze(FROZEN[kind]), validate=validate)
    assert_same(on, runs_on, off, runs_off)
    assert runs_on.calls[0] > 0 and 1 not in runs_on.calls  # from the second epoch on, no frozen module runs
    assert runs_off.calls[1] == runs_off.calls[0]  # without the cache they run every epoch
    assert cache.history[1]["hits"] == cache.history[1]["lookups"] == 24 and cache.history[1]["entries"] == 24
    assert cache.history[-1]["cached"].endswith(f"inside 'model.{kind}'")  # cut inside the transformers model


def test_digits_cnn_no_frozen_module_runs_once_warm():
    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset

    data = Subset(DigitsDataset(), range(48))

    def run(cache):
        torch.manual_seed(0)
        runs = FrozenRuns(["backbone"])
        callbacks = [LayerFreeze("backbone"), runs] + ([cache] if cache else [])
        model = DigitsClassifier(pretrained=False)
        trainer(max_epochs=2, callbacks=callbacks).fit(model, DataLoader(data, batch_size=16, shuffle=True))
        return model, runs

    cache = FrozenPrefixCache(max_disk_bytes=0)
    on, runs_on = run(cache)
    off, runs_off = run(None)
    assert_same(on, runs_on, off, runs_off)
    assert runs_on.calls[0] > 0 and 1 not in runs_on.calls
    assert [h["cached"] for h in cache.history] == ["module 'backbone'"] * 2


def test_gpt2_tied_embedding_is_not_cached_and_says_why():
    # wte is frozen but tied to lm_head, which trains: wte's weight keeps requires_grad=True, so nothing that
    # depends on it may be cached, and lm_head (which holds the same tensor) is never a candidate.
    cache = FrozenPrefixCache(max_disk_bytes=0)
    frozen = ["model.transformer.wte", "model.transformer.wpe", "model.transformer.h.0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on, runs_on = fit_fixture("gpt2", LayerFreeze(frozen), cache, validate=True)
    ours = [str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)]
    assert len(ours) == 1 and "'model.transformer.wte'" in ours[0] and "tied to ['model.lm_head']" in ours[0]
    assert all(h["lookups"] == 0 and h["entries"] == 0 and h["hit_rate"] is None for h in cache.history)
    off, runs_off = fit_fixture("gpt2", LayerFreeze(frozen), validate=True)
    assert_same(on, runs_on, off, runs_off)


def test_freezeout_on_resnet_carries_rows_through_each_newly_frozen_stage():
    make = lambda: FreezeOut(layers="auto", t0=0.3)  # noqa: E731
    cache = FrozenPrefixCache(max_disk_bytes=0)
    on, runs_on = fit_fixture("resnet", make(), cache, epochs=3)
    off, runs_off = fit_fixture("resnet", make(), epochs=3)
    assert_same(on, runs_on, off, runs_off)
    actions = [e["action"] for e in cache.events]
    assert "extend" in actions and "invalidate" not in actions and cache.history[-1]["off"] is None
    assert "'model.resnet.encoder.stages.1'" in cache.history[-1]["cached"]
    assert cache.history[-1]["hit_rate"] == 1.0


def test_rows_are_stored_in_the_dtype_autocast_produces():
    # Under bf16 autocast the prefix hands the suffix bf16 activations: stored as such, half the bytes of fp32,
    # and the fit is bit-identical to the uncached one.
    kind = "resnet"
    cache = FrozenPrefixCache(max_disk_bytes=0)
    on, runs_on = fit_fixture(kind, LayerFreeze(FROZEN[kind]), cache, precision="bf16-mixed")
    off, runs_off = fit_fixture(kind, LayerFreeze(FROZEN[kind]), precision="bf16-mixed")
    assert_same(on, runs_on, off, runs_off)
    assert cache.history[-1]["rows"] == ["torch.bfloat16[8, 4, 4]"] and cache.history[-1]["hit_rate"] == 1.0
    fp32 = FrozenPrefixCache(max_disk_bytes=0)
    fit_fixture(kind, LayerFreeze(FROZEN[kind]), fp32, epochs=1)
    assert fp32.history[-1]["rows"] == ["torch.float32[8, 4, 4]"]
    assert cache.history[-1]["used_bytes"] * 2 == fp32.history[-1]["used_bytes"]


@pytest.mark.slow
def test_compiled_inner_model_is_served_without_recompiling_per_batch():
    from torch._dynamo.utils import counters

    kind = "resnet"

    def run(cache):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        fixture = FIXTURES[kind]
        model = fixture.model()
        model.model = torch.compile(model.model, backend="aot_eager")
        runs = FrozenRuns(FROZEN[kind])
        callbacks = [LayerFreeze(FROZEN[kind]), runs] + ([cache] if cache else [])
        trainer(max_epochs=3, callbacks=callbacks).fit(model, fixture.loader(24, 0, 8, shuffle=True))
        return model, runs, sum(counters["stats"].values()), dict(counters["stats"])["unique_graphs"]

    cache = FrozenPrefixCache(max_disk_bytes=0)
    on, runs_on, _, graphs_on = run(cache)
    off, runs_off, _, graphs_off = run(None)
    assert_same(on, runs_on, off, runs_off)
    assert 1 not in runs_on.calls and 2 not in runs_on.calls and cache.history[-1]["hit_rate"] == 1.0
    # a graph per piece between the skipped blocks, compiled once: no recompilation per batch or per epoch
    assert graphs_on <= graphs_off + 8


def test_named_module_with_keyword_arguments_is_keyed_on_all_of_them():
    # BERT's embeddings are called with keyword arguments only (input_ids=..., ...): a named-module cut keys
    # on every tensor argument and serves them.
    cache = FrozenPrefixCache(module="model.bert.embeddings", max_disk_bytes=0)
    on, runs_on = fit_fixture("bert", LayerFreeze(FROZEN["bert"]), cache)
    off, runs_off = fit_fixture("bert", LayerFreeze(FROZEN["bert"]))
    assert_same(on, runs_on, off, runs_off)
    assert (
        cache.history[-1]["cached"] == "module 'model.bert.embeddings'"
        and cache.history[-1]["hit_rate"] == 1.0
    )


def test_training_step_that_calls_the_frozen_layers_itself_falls_back():
    from models import Net, make_data

    class Direct(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.backbone[1](self.backbone[0](x))  # never through self.backbone
            loss = torch.nn.functional.cross_entropy(self.head(self.backbone[2](h)), y)
            self.losses.append(loss.item())
            return loss

    def run(cache):
        torch.manual_seed(0)
        model = Direct()
        callbacks = [LayerFreeze(["backbone.0", "backbone.1"])] + ([cache] if cache else [])
        t = trainer(max_epochs=3, callbacks=callbacks, default_root_dir=tempfile.mkdtemp(prefix="lf-cache-"))
        t.fit(model, DataLoader(make_data(32, 0), batch_size=8, shuffle=True))
        return model

    cache = FrozenPrefixCache(max_disk_bytes=0)
    with pytest.warns(
        UserWarning, match="'backbone'.*was not called in a training step.*caching module 'backbone.0'"
    ):
        on = run(cache)
    off = run(None)
    assert on.losses == off.losses and all(
        torch.equal(a, b) for a, b in zip(snapshot(on).values(), snapshot(off).values())
    )
    # the first step found the root unused; from then on backbone.0 is cached, and served once all is stored
    assert cache.history[-1]["cached"] == "module 'backbone.0'" and cache.history[-1]["hit_rate"] == 1.0
