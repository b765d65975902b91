"""Every freezing callback on peft adapters (LoRA, IA3, LoHa) on the tiny transformers BERT and GPT-2.

peft freezes the base model and leaves the adapters (and ``modules_to_save``) trainable. The callbacks must
never make a base weight trainable, during or after fit, must hand the model back with peft's flags, and must
treat a block with nothing trainable in it as frozen from the start: not a decision of theirs, not a head
that could train, and servable by the cache.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_models import FIXTURES
from models import trainer
from peft_models import BLOCKS, AdaptedText, FrozenWeightsProbe, adapter_blocks

from lightning_freeze import (
    AdaptiveFreeze,
    FreezeOut,
    FrozenPrefixCache,
    LayerFreeze,
    LayerSampling,
    ProgressiveUnfreezing,
)

pytest.importorskip("peft")

STEPS_PER_EPOCH = 4  # 32 samples, batches of 8


def _fit(model, callbacks, epochs: int = 4, n: int = 32):
    kind = "gpt2" if "GPT2" in type(model.model.base_model.model).__name__ else "bert"
    t = trainer(callbacks=callbacks, max_epochs=epochs)
    t.fit(model, FIXTURES[kind].loader(n=n))
    return t


CALLBACKS = {
    "LayerFreeze": lambda kind: LayerFreeze(BLOCKS[kind].replace(r"\d+", "[01]")),
    "FreezeOut": lambda kind: FreezeOut(),
    "ProgressiveUnfreezing": lambda kind: ProgressiveUnfreezing(
        BLOCKS[kind], every_n_epochs=None, every_n_steps=4
    ),
    "AdaptiveFreeze": lambda kind: AdaptiveFreeze(check_every_n_steps=2, min_steps=2, percentile=60),
    "LayerSampling": lambda kind: LayerSampling(n_layers=1, interval=3, seed=0),
}
ADAPTERS = [("bert", "lora"), ("gpt2", "lora"), ("bert", "ia3"), ("bert", "loha")]


@pytest.mark.parametrize("kind,adapter", ADAPTERS, ids=[f"{a}-{k}" for k, a in ADAPTERS])
@pytest.mark.parametrize("callback", list(CALLBACKS))
def test_base_weights_stay_frozen_and_bit_identical(callback, kind, adapter):
    torch.manual_seed(0)
    model = AdaptedText(kind, adapter)
    probe = FrozenWeightsProbe(model)
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cb = CALLBACKS[callback](kind)
    _fit(model, [cb, probe])
    assert probe.steps == 4 * STEPS_PER_EPOCH and not probe.violations, probe.violations[:5]
    probe.check(model, -1)  # after fit: handed back as peft left it
    assert not probe.violations
    assert {n: p.requires_grad for n, p in model.named_parameters()} == probe.flags
    trained = {
        n
        for n, p in model.named_parameters()
        if n in adapters_before and not torch.equal(p, adapters_before[n])
    }
    assert trained, "no adapter weight was trained"
    adapted = adapter_blocks(model, cb.layers)
    # Only blocks that carry an adapter are ever frozen or thawed by a decision of the callback.
    assert {e["layer"] for e in cb.events} <= set(adapted)
    if callback == "LayerFreeze":  # the adapters of blocks 0 and 1 never train, block 2's do
        frozen = [n for n in adapters_before if any(f"{s}.0." in n or f"{s}.1." in n for s in ("layer", "h"))]
        assert frozen and not (set(frozen) & trained)
        assert any(".2." in n for n in trained)
    if callback == "LayerSampling":
        assert cb.middle == adapted and all(set(c["layers"]) <= set(adapted) for c in cb.choices)


def test_freezeout_on_lora_without_a_head_trains_to_the_end():
    # peft without task_type freezes the classifier: the last adapted block is the head and never freezes
    # (before, FreezeOut froze it at 85% of the fit and the next backward failed).
    torch.manual_seed(0)
    model = AdaptedText("bert", "lora")
    freezeout = FreezeOut()
    with pytest.warns(UserWarning, match="nothing is trainable in .*classifier.*task_type"):
        t = _fit(model, [freezeout])
    blocks = [f"model.base_model.model.bert.encoder.layer.{i}" for i in range(3)]
    assert list(freezeout.layer_times()) == blocks and freezeout.layer_times()[blocks[-1]] == 1.0
    assert [e["layer"] for e in freezeout.events] == blocks[:2]
    assert t.global_step == 16


def test_adaptive_freeze_never_counts_untrainable_layers_as_decisions():
    torch.manual_seed(0)
    model = AdaptedText("bert", "lora")
    adaptive = AdaptiveFreeze(check_every_n_steps=2, min_steps=2, percentile=60)
    _fit(model, [adaptive])
    layers = [layer.name for layer in adaptive.layers]
    assert layers[0].endswith("embeddings") and layers[-1].endswith("classifier")
    frozen = [e["layer"] for e in adaptive.events]
    assert frozen and all(".encoder.layer." in name for name in frozen)
    assert "encoder.layer.2" not in " ".join(frozen)  # the last adapted block is the head
    # The untrainable embeddings, pooler and classifier were frozen (eval mode) from the start, not decided.
    assert set(adaptive._frozen_at_start) == {layers[0], layers[-2], layers[-1]}


@pytest.mark.parametrize(
    "make",
    [lambda: LayerFreeze("auto"), lambda: ProgressiveUnfreezing()],
    ids=["LayerFreeze", "ProgressiveUnfreezing"],
)
def test_setup_errors_say_what_peft_left_trainable(make):
    model = AdaptedText("bert", "lora")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        _fit(model, [make()])
    text = str(err.value)
    assert "peft left trainable" in text and "encoder.layer.2" in text
    assert "nothing is trainable in" in text and "classifier" in text
    assert "task_type" in text and "modules_to_save=['classifier']" in text
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_progressive_unfreezing_thaws_adapters_top_down_with_discriminative_lrs():
    torch.manual_seed(0)
    model = AdaptedText("bert", "lora", head=True)
    unfreeze = ProgressiveUnfreezing(every_n_epochs=1, lr_decay=2.0)
    lrs = {}

    class GroupLRs(FrozenWeightsProbe):
        def on_train_end(self, trainer, pl_module):
            lrs.update({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    probe = GroupLRs(model)
    _fit(model, [unfreeze, probe], epochs=4)
    assert not probe.violations
    thawed = [e["layer"].rsplit(".", 1)[-1] for e in unfreeze.events]
    assert thawed == ["2", "1", "0"]  # blocks only: the untrainable pooler and embeddings are not thaws
    block = "model.base_model.model.bert.encoder.layer."
    assert lrs[block + "2"] == pytest.approx(2 * lrs[block + "1"]) == pytest.approx(4 * lrs[block + "0"])


def test_transitions_reassert_the_intended_requires_grad_set():
    # Something flips flags between two transitions (as peft's set_adapter can): a base weight and a waiting
    # block's adapter become trainable. The next transition puts both back and says so.
    torch.manual_seed(0)
    model = AdaptedText("bert", "lora")
    sampling = LayerSampling(n_layers=1, interval=3, seed=0)
    base = "model.base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    state = {}

    class Flipper(FrozenWeightsProbe):
        def on_train_batch_end(self, trainer, pl_module, *args):
            params = dict(pl_module.named_parameters())
            if trainer.global_step == 4:
                waiting = next(n for n in sampling.middle if sampling.engine.is_frozen(n))
                state["adapter"] = next(n for n in params if n.startswith(waiting + ".") and "lora_A" in n)
                params[base].requires_grad_(True)
                params[state["adapter"]].requires_grad_(True)
            # the transition at the start of step 6 (interval 2) re-asserted the flags
            if trainer.global_step == 7:
                block = state["adapter"].split(".attention")[0]
                state["after"] = params[base].requires_grad
                state["adapter_ok"] = params[state["adapter"]].requires_grad == (
                    not sampling.engine.is_frozen(block)
                )

    flipper = Flipper(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, [sampling, flipper], epochs=2)
    assert state["after"] is False and state["adapter_ok"]
    assert any("changed outside the freezing callback" in str(w.message) for w in caught)
    assert not model.get_parameter(base).requires_grad


def test_cache_serves_the_prefix_without_adapters_bit_exactly():
    # LoRA on the top two blocks only: the embeddings and block 0 carry no adapter, so they are a frozen prefix
    # from the start and the cache computes them once per sample.
    def run(with_cache: bool):
        torch.manual_seed(0)
        model = AdaptedText("bert", "lora", head=True, top_blocks=2)
        freeze = LayerFreeze("auto[:2]")  # the embeddings and block 0: peft left nothing trainable
        _fit(model, [freeze, FrozenPrefixCache()] if with_cache else [freeze], epochs=3)
        return model, next((cb for cb in model.trainer.callbacks if isinstance(cb, FrozenPrefixCache)), None)

    cached, cache = run(True)
    plain, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), plain.state_dict().values()))
    assert cache.history[0]["hits"] == 0 and cache.history[1]["hits"] == cache.history[1]["lookups"] == 32


def test_a_block_peft_froze_is_kept_in_eval_mode_so_the_cache_serves_it():
    # The case: the embeddings carry no adapter (peft froze them) and have dropout. A module frozen by
    # someone else used to stay in training mode, so its dropout made every row different and the cache served
    # nothing; the engine now keeps it in eval mode like any frozen layer, and it is served bit-exactly.
    def run(with_cache: bool):
        torch.manual_seed(0)
        model = AdaptedText("bert", "lora", dropout=0.1)
        cache = FrozenPrefixCache(module="model.base_model.model.bert.embeddings")
        callbacks = [FreezeOut(), cache] if with_cache else [FreezeOut()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(model, callbacks, epochs=3)
        return model, cache

    cached, cache = run(True)
    plain, _ = run(False)
    assert [(h["lookups"], h["hits"]) for h in cache.history] == [(32, 0), (32, 32), (32, 32)]
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), plain.state_dict().values()))


def test_the_cache_serves_gpt2s_frozen_bottom_under_lora_bit_exactly():
    # GPT-2 with LoRA on the top blocks and the un-adapted bottom (wte, wpe, block 0) frozen. wpe's output has no
    # batch dimension, so it is never skipped and runs as glue; the cache used to count its call among the calls
    # it intercepts, so its own check of a stored batch saw "block 0" where it expected wpe and switched off.
    def run(with_cache: bool):
        torch.manual_seed(0)
        model = AdaptedText("gpt2", "lora", head=True, top_blocks=2)
        freeze = LayerFreeze(r"re:.*transformer\.(wte|wpe|h\.0)")
        cache = FrozenPrefixCache() if with_cache else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(model, [freeze, cache] if cache else [freeze], epochs=3)
        return model, cache

    cached, cache = run(True)
    plain, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), plain.state_dict().values()))
    assert "off" not in [e["action"] for e in cache.events]
    assert [(h["hits"], h["lookups"]) for h in cache.history] == [(0, 32), (32, 32), (32, 32)]
    assert cache.history[0]["verified"] == 1  # the check of a stored batch ran, and found the rows exact
