"""FrozenPrefixCache on classic vision architectures written the way torchvision writes them (tests/cache_fixtures.py):
in-place ReLU modules called between frozen modules, ``+=`` residuals, ``nn.MultiheadAttention`` blocks, inverted
residuals with ``Hardswish(inplace=True)``, concatenating dense blocks.

Measured from outside, as in tests/test_cache_models.py: forward hooks on every frozen module count their calls in
training steps. From the second epoch on none may run, and losses and weights must be bit-identical to the same fit
without the cache; also with FreezeOut moving the boundary."""

from __future__ import annotations

import warnings

import pytest
import torch
from cache_fixtures import FREEZEOUT_LAYERS, FROZEN, ClassicModule, loader
from models import trainer
from test_cache_models import FrozenRuns, assert_same

from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze

# The ViT is served whole when the class token and the position embedding are frozen too: ``auto[:9]`` are the
# root's own parameters (class token), conv_proj, the encoder's own (position embedding) and two encoder blocks.
VIT_WHOLE = "auto[:9]"
SERVED = {
    "resnet18": "1 output(s) of 'model.conv1'..'model.layer3' (5 blocks) inside 'model'",
    "vit": "1 output(s) of 'model.conv_proj'..'model.encoder.layers.encoder_layer_1' (3 blocks) inside 'model'",
    "mobilenet": "1 output(s) of 'model.features.0'..'model.features.3' (4 blocks) inside 'model.features'",
    "densenet": "1 output(s) of 'model.features.conv0'..'model.features.transition1' (4 blocks) inside 'model.features'",
}


def fit(kind, make_freezer, cache=None, epochs=2):
    """24 training samples in batches of 8, shuffled every epoch."""
    torch.manual_seed(0)
    model = ClassicModule(kind)
    runs = FrozenRuns(FROZEN[kind])
    callbacks = [make_freezer(), runs] + ([cache] if cache is not None else [])
    trainer(max_epochs=epochs, callbacks=callbacks, limit_val_batches=0).fit(model, loader(24))
    return model, runs


@pytest.mark.parametrize("kind", sorted(FROZEN))
def test_whole_frozen_prefix_is_served_and_bit_identical(kind):
    spec = VIT_WHOLE if kind == "vit" else FROZEN[kind]
    make = lambda: LayerFreeze(spec)  # noqa: E731
    cache = FrozenPrefixCache(max_disk_bytes=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on, runs_on = fit(kind, make, cache)
    assert not [str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)]
    off, runs_off = fit(kind, make)
    assert_same(on, runs_on, off, runs_off)
    assert runs_on.calls[0] > 0 and 1 not in runs_on.calls  # from the second epoch on, no frozen module runs
    assert runs_off.calls[1] == runs_off.calls[0]
    last = cache.history[-1]
    assert last["hits"] == last["lookups"] == 24 and last["cached"] == SERVED[kind]


def test_vit_with_trainable_tokens_says_what_stops_the_cut():
    # conv_proj and two encoder blocks frozen, the class token and position embedding still training: every
    # block after conv_proj reads the class token, so only conv_proj's output can be served, and one message
    # says so and what to freeze.
    make = lambda: LayerFreeze(FROZEN["vit"])  # noqa: E731
    cache = FrozenPrefixCache(max_disk_bytes=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on, runs_on = fit("vit", make, cache)
    ours = [str(w.message) for w in caught if "FrozenPrefixCache" in str(w.message)]
    stop = (
        "'model.encoder.layers.encoder_layer_0': its input depends on the trainable parameter 'model.class_token' "
        "(freeze 'model.class_token' too to cache more)"
    )
    assert ours == [
        f"FrozenPrefixCache: caching 1 output(s) of 'model.conv_proj' inside 'model', not the whole frozen prefix; "
        f"the cut stops at {stop}."
    ]
    assert cache.events[0]["stop"] == stop
    assert cache.history[-1]["hits"] == 24
    off, runs_off = fit("vit", make)
    assert_same(on, runs_on, off, runs_off)


@pytest.mark.parametrize("kind", sorted(FROZEN))
def test_freezeout_moving_the_boundary_stays_bit_identical(kind):
    make = lambda: FreezeOut(layers=FREEZEOUT_LAYERS[kind], t0=0.5)  # noqa: E731
    cache = FrozenPrefixCache(max_disk_bytes=0)
    on, runs_on = fit(kind, make, cache, epochs=4)
    off, runs_off = fit(kind, make, epochs=4)
    assert_same(on, runs_on, off, runs_off)
    assert cache.history[-1]["off"] is None and sum(h["hits"] for h in cache.history) > 0
