"""Layer specs: globs, regexes, auto (forward order, slicing) and the errors."""

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_freeze import select_layers
from lightning_freeze.engine.layers import (
    ForwardOrderError,
    LayerSpecError,
    check_forward_order,
    is_repeated_container,
    layers_within,
)


class OutOfOrder(nn.Module):
    """Registers head, then decoder, then encoder; forward runs encoder -> decoder -> head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.decoder = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
        self.encoder = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6))
        self.unused = nn.Linear(2, 2)
        self.example_input_array = torch.zeros(1, 3)

    def forward(self, x):
        return self.head(self.decoder(self.encoder(x)))


class Wrapped(nn.Module):
    """A single-child wrapper is opened up: auto sees the inner blocks."""

    def __init__(self):
        super().__init__()
        self.model = OutOfOrder()
        self.example_input_array = torch.zeros(1, 3)

    def forward(self, x):
        return self.model(x)


def names(layers):
    return [layer.name for layer in layers]


def test_glob_takes_top_most_matches_in_registration_order():
    model = OutOfOrder()
    assert names(select_layers(model, "decoder.*")) == ["decoder.0", "decoder.2"]
    assert names(select_layers(model, "*coder")) == ["decoder", "encoder"]
    layer = select_layers(model, "decoder")[0]
    assert layer.modules == (model.decoder,)
    assert [id(p) for p in layer.params] == [id(p) for p in model.decoder.parameters()]
    assert layer.numel == sum(p.numel() for p in model.decoder.parameters())


def test_glob_character_class_and_list_spec():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    assert names(select_layers(model, "[0-3]")) == ["0", "1", "2", "3"]
    assert names(select_layers(model, ["4", "re:[05]"])) == ["4", "0", "5"]


def test_regex_is_a_full_match():
    model = OutOfOrder()
    assert names(select_layers(model, r"re:(en|de)coder\.\d")) == [
        "decoder.0",
        "decoder.2",
        "encoder.0",
        "encoder.1",
    ]
    with pytest.raises(LayerSpecError, match="matches no"):
        select_layers(model, "re:coder")


def test_auto_follows_forward_order_not_registration_order():
    # encoder (Linear, LayerNorm) holds no repeated container: one block; decoder repeats Linear: opened
    model = OutOfOrder()
    assert names(select_layers(model, "auto")) == ["encoder", "decoder.0", "decoder.2", "head"]


def test_auto_slices_and_single_index():
    model = OutOfOrder()
    assert names(select_layers(model, "auto[:-1]")) == ["encoder", "decoder.0", "decoder.2"]
    assert names(select_layers(model, "auto[1:3]")) == ["decoder.0", "decoder.2"]
    assert names(select_layers(model, "auto[-1]")) == ["head"]
    assert names(select_layers(model, "auto[::2]")) == ["encoder", "decoder.2"]
    with pytest.raises(LayerSpecError, match="out of range"):
        select_layers(model, "auto[7]")


def test_auto_opens_single_child_wrappers_and_leaves_modes_and_rng_alone():
    model = Wrapped()
    model.train()
    model.model.encoder.eval()
    state = torch.get_rng_state()
    assert names(select_layers(model, "auto"))[0] == "model.encoder"
    assert torch.equal(state, torch.get_rng_state())
    assert model.training and not model.model.encoder.training and model.model.head.training


def test_auto_without_example_input_says_what_to_set():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(LayerSpecError, match="example_input_array"):
        select_layers(model, "auto")
    assert names(select_layers(model, "auto", example_input=torch.zeros(1, 2))) == ["0", "1"]


def test_no_match_names_the_closest_modules():
    with pytest.raises(LayerSpecError) as err:
        select_layers(OutOfOrder(), "decodr.*")
    assert "'decodr.*' matches no" in str(err.value)
    assert "decoder" in str(err.value)


def test_overlapping_specs_are_an_error():
    with pytest.raises(LayerSpecError, match="'decoder.0' and 'decoder' contain the same module"):
        select_layers(OutOfOrder(), ["decoder", "decoder.0"])
    with pytest.raises(LayerSpecError, match="more than once"):
        select_layers(OutOfOrder(), ["head", "head"])


def test_tied_parameters_may_belong_to_two_layers():
    """A tie (one tensor held by two separate modules) is no overlap: each module is its own layer."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight
    layers = select_layers(model, "*")
    assert names(layers) == ["0", "1"]
    assert layers[0].params[0] is layers[1].params[0]
    assert names(select_layers(model, "auto", example_input=torch.zeros(1, 2))) == ["0", "1"]


def test_bad_specs():
    with pytest.raises(LayerSpecError, match="bad regex"):
        select_layers(OutOfOrder(), "re:(")
    with pytest.raises(LayerSpecError, match="layer spec"):
        select_layers(OutOfOrder(), [])


class WithOwnParams(nn.Module):
    """Direct parameters of an opened module form their own block, without its children."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.example_input_array = torch.zeros(1, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x * self.scale


def test_auto_gives_direct_parameters_a_block_of_their_own():
    model = WithOwnParams()
    layers = select_layers(model, "auto")
    assert names(layers) == ["<root>", "blocks.0", "blocks.1"]
    assert layers[0].params == (model.scale,) and layers[0].modules == ()


def test_layers_within_gives_a_word_the_meaning_it_has_in_select_layers():
    """One layer-spec language: ``decoder`` is the module decoder, so it covers the managed layers in it."""
    model = OutOfOrder()
    managed = select_layers(model, ["decoder.*", "encoder", "head"])
    assert names(managed) == ["decoder.0", "decoder.2", "encoder", "head"]
    assert layers_within(model, "decoder", managed) == ["decoder.0", "decoder.2"]
    assert layers_within(model, "decoder.*", managed) == ["decoder.0", "decoder.2"]
    assert layers_within(model, ["head", r"re:en\w+"], managed) == ["encoder", "head"]
    with pytest.raises(LayerSpecError, match=r"phase 1: 'encoder.0' covers only part of the layer 'encoder'"):
        layers_within(model, "encoder.0", managed, where="phase 1")
    with pytest.raises(LayerSpecError, match="phase 0: 'unused' covers none of the managed layers"):
        layers_within(model, "unused", managed, where="phase 0")
    with pytest.raises(LayerSpecError, match="phase 0: 'dekoder' matches no parameter-owning module"):
        layers_within(model, "dekoder", managed, where="phase 0")


class Stages(nn.Module):
    """A stem, a repeated container whose elements hold repeated parts themselves, and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)) for _ in range(3)]
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 4 * 4, 2))

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def test_auto_stops_at_the_elements_of_the_outermost_repeated_container():
    model = Stages()
    layers = select_layers(model, "auto", example_input=torch.zeros(2, 1, 6, 6))
    assert names(layers) == ["stem", "stages.0", "stages.1", "stages.2", "head"]
    assert layers[-1].modules == (model.head,)  # the head keeps its dropout under management


def test_is_repeated_container():
    assert is_repeated_container(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    assert not is_repeated_container(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    assert not is_repeated_container(nn.ModuleList([nn.Linear(2, 2)]))
    assert not is_repeated_container(nn.Linear(2, 2))
    assert is_repeated_container(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 3)}))


class NoForward(pl.LightningModule):
    """A LightningModule that never implements forward: training_step calls self.net directly."""

    def __init__(self):
        super().__init__()
        self.net = OutOfOrder()


def test_auto_runs_the_example_the_ways_models_are_called():
    model = Wrapped()
    x = torch.zeros(2, 3)
    expected = ["model.encoder", "model.decoder.0", "model.decoder.2", "model.head"]
    model.example_input_array = None
    assert names(select_layers(model, "auto", example_input=(x, torch.zeros(2)))) == expected  # (x, y) batch
    # no forward of its own: its one child is called; a dict batch goes in as keyword arguments
    assert names(select_layers(NoForward(), "auto", example_input=(x,)))[0] == "net.encoder"
    with pytest.raises(ForwardOrderError, match="could not run the model once"):
        select_layers(model, "auto", example_input={"pixels": x})


def test_auto_leaves_every_random_generator_alone():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 3))
    model.train()
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    select_layers(model, "auto", example_input=torch.ones(4, 3))
    assert torch.equal(states[0], torch.get_rng_state())
    assert (states[1] == np.random.get_state()[1]).all() and states[2] == random.getstate()


def test_compiled_submodules_are_named_without_orig_mod():
    model = nn.Module()
    model.backbone = torch.compile(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)))
    model.head = nn.Linear(3, 1)
    model.forward = lambda x: model.head(model.backbone(x))
    assert names(select_layers(model, "backbone.*")) == ["backbone.0", "backbone.2"]
    assert names(select_layers(model, "auto", example_input=torch.zeros(2, 3))) == [
        "backbone.0",
        "backbone.2",
        "head",
    ]


def test_forward_order_check_names_both_orders():
    model = OutOfOrder()
    layers = select_layers(model, ["head", "encoder"])
    with pytest.raises(LayerSpecError, match=r"lists the layers in the order \['head', 'encoder'\]"):
        check_forward_order(model, layers, torch.zeros(1, 3), ["head", "encoder"], "FreezeOut")
    check_forward_order(model, list(reversed(layers)), torch.zeros(1, 3), ["encoder", "head"], "FreezeOut")
