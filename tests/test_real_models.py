"""The callbacks on third-party architectures (transformers ResNet, ViT, ConvNeXt, BERT, GPT-2), wrapped in plain
LightningModules the way users write them: ``auto`` without ``example_input_array``, exact freezing, FreezeOut and
progressive unfreezing, tied weights, the model handed back after fit, exact resume with dropout, compiled models
and the Trainer features users turn on."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from ddp import run_ddp_script
from hf_models import FIXTURES
from models import AtTrainEnd, trainer
from resume import assert_same_weights, run_interrupted, run_uninterrupted

from lightning_freeze import FreezeOut, LayerFreeze, ProgressiveUnfreezing, select_layers
from lightning_freeze.engine.layers import LayerSpecError

AUTO = {
    "resnet": [
        "model.resnet.embedder",
        "model.resnet.encoder.stages.0",
        "model.resnet.encoder.stages.1",
        "model.classifier",
    ],
    "vit": [
        "model.vit.embeddings",
        *[f"model.vit.layers.{i}" for i in range(3)],
        "model.vit.layernorm",
        "model.classifier",
    ],
    "convnext": [
        "model.convnext.embeddings",
        "model.convnext.encoder.stages.0",
        "model.convnext.encoder.stages.1",
        "model.convnext.layernorm",
        "model.classifier",
    ],
    "bert": [
        "model.bert.embeddings",
        *[f"model.bert.encoder.layer.{i}" for i in range(3)],
        "model.bert.pooler",
        "model.classifier",
    ],
    "gpt2": [
        "model.transformer.wte",
        "model.transformer.wpe",
        *[f"model.transformer.h.{i}" for i in range(3)],
        "model.transformer.ln_f",
        "model.lm_head",
    ],
}
KINDS = list(AUTO)


def fit(kind, callbacks, steps=8, model=None, **kw):
    torch.manual_seed(0)
    model = model if model is not None else FIXTURES[kind].model()
    t = trainer(max_steps=steps, max_epochs=-1, callbacks=callbacks, **kw)
    t.fit(model, FIXTURES[kind].loader(32, batch_size=4))
    return model, t


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def no_override_left(model: torch.nn.Module) -> bool:
    return not any("train" in m.__dict__ or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_auto_follows_the_repeated_blocks_without_example_input_array(kind):
    """LayerFreeze("auto[:-1]") resolves auto on the first training samples: everything but the head freezes."""
    model = FIXTURES[kind].model()
    assert getattr(model, "example_input_array", None) is None
    batch = next(iter(FIXTURES[kind].loader(4)))
    assert [layer.name for layer in select_layers(model, "auto", example_input=batch)] == AUTO[kind]
    freeze = LayerFreeze("auto[:-1]")
    before = snapshot(model)
    fit(kind, [freeze], model=model)
    assert [layer.name for layer in freeze.layers] == AUTO[kind][:-1]
    after = snapshot(model)
    # everything outside the head (weights, biases, BN statistics) is bit-identical
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if (
        kind == "gpt2"
    ):  # the head is lm_head, whose weight is wte's (tied): it trains, so wte's weight changes
        assert changed == {"model.lm_head.weight", "model.transformer.wte.weight"}
    else:
        assert changed and all(k.startswith(AUTO[kind][-1] + ".") for k in changed), changed


@pytest.mark.parametrize("kind", KINDS)
def test_freezeout_and_progressive_unfreezing_defaults_run_and_hand_the_model_back(kind):
    for make in (lambda: FreezeOut(), lambda: ProgressiveUnfreezing(every_n_steps=2)):
        callback, probe = make(), AtTrainEnd()
        model, _ = fit(kind, [callback, probe])
        names = [layer.name for layer in callback.layers]
        assert names == AUTO[kind]
        actions = [e["action"] for e in callback.events]
        if isinstance(callback, FreezeOut):
            assert actions and set(actions) == {"freeze"}
            assert AUTO[kind][-1] not in [e["layer"] for e in callback.events]  # the head never freezes early
            first = AUTO[kind][1] if kind == "gpt2" else AUTO[kind][0]  # gpt2's wte is tied to the head
            assert probe.frozen(first + ".")
        else:
            assert [e["layer"] for e in callback.events] == list(reversed(AUTO[kind][:-1]))[:3]
            assert set(actions) == {"thaw"}
        # handed back as it was given: everything trains again, no hook or mode override of ours is left
        assert all(p.requires_grad for p in model.parameters())
        assert no_override_left(model)


def test_tied_weights_freeze_only_when_every_user_is_frozen():
    """GPT-2: lm_head shares wte's weight. Freezing the transformer leaves the shared tensor training (lm_head
    uses it), says so once naming the tie, and training goes on; wpe and the blocks stay bit-identical."""
    model = FIXTURES["gpt2"].model()
    before = snapshot(model)
    probe = AtTrainEnd()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit("gpt2", [LayerFreeze("model.transformer"), probe], model=model)
    ties = [str(w.message) for w in caught if "tied weights" in str(w.message)]
    assert len(ties) == 1 and "'model.transformer.wte.weight'" in ties[0] and "model.lm_head" in ties[0]
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.transformer.wte.weight", "model.lm_head.weight"}
    assert (
        probe.requires_grad["model.transformer.wte.weight"]
        and not probe.requires_grad["model.transformer.wpe.weight"]
    )


def test_freezeout_keeps_the_tied_head_training_to_the_end():
    freezeout = FreezeOut()
    model = FIXTURES["gpt2"].model()
    wte = model.model.transformer.wte.weight
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append((trainer.global_step, wte.requires_grad, wte.detach().clone()))

    fit("gpt2", [freezeout, Watch()], model=model)
    froze_wte = next(e["step"] for e in freezeout.events if e["layer"] == "model.transformer.wte")
    assert froze_wte < 8 and all(trains for _, trains, _ in seen)
    # the tied tensor keeps changing after wte's freeze time: the head (lm_head) still trains it
    after = [w for step, _, w in seen if step > froze_wte]
    assert any(not torch.equal(a, b) for a, b in zip(after, after[1:], strict=False))


def test_two_stage_fine_tuning_trains_the_backbone_in_stage_two():
    """Stage 1: backbone frozen (LayerFreeze). Stage 2: a plain Trainer trains everything, BN statistics too."""
    kind = "resnet"
    model = FIXTURES[kind].model()
    backbone = "model.resnet."
    stage0 = snapshot(model)
    fit(kind, [LayerFreeze("model.resnet")], model=model)
    stage1 = snapshot(model)
    assert all(torch.equal(stage0[k], stage1[k]) for k in stage0 if k.startswith(backbone))
    assert no_override_left(model) and all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())  # model.train() reaches BatchNorm again
    fit(kind, [], model=model)
    stage2 = snapshot(model)
    changed = [k for k in stage1 if k.startswith(backbone) and not torch.equal(stage1[k], stage2[k])]
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.endswith("convolution.weight") for k in changed)


def test_a_second_layer_freeze_can_thaw_what_the_first_froze():
    kind = "bert"
    model = FIXTURES[kind].model()
    fit(kind, [LayerFreeze("model.bert")], model=model)
    before = snapshot(model)
    fit(kind, [LayerFreeze("model.classifier")], model=model)
    after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.bert.encoder"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.classifier"))


class FailAt(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            raise RuntimeError("a failure in the middle of the fit")


def test_retry_after_a_failed_fit_starts_clean():
    kind = "vit"
    model = FIXTURES[kind].model()
    freeze = LayerFreeze("auto[:-1]")
    with pytest.raises(RuntimeError, match="failure in the middle"):
        fit(kind, [freeze, FailAt()], model=model)
    assert all(p.requires_grad for p in model.parameters()) and no_override_left(model)
    before = snapshot(model)
    fit(kind, [freeze], model=model)  # the same callback object, a new Trainer
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.classifier") for k in changed)


def test_layers_out_of_forward_order_are_a_clear_error():
    with pytest.raises(LayerSpecError, match="the forward pass runs them in the order"):
        fit("bert", [FreezeOut(["model.classifier", "model.bert"])])


@pytest.mark.parametrize("stop_at", [6, 8], ids=["mid-epoch", "epoch-end"])
def test_resume_with_dropout_is_bit_identical(stop_at, tmp_path):
    """BERT with its dropout (0.1) in the trainable layers and FreezeOut: every rank's random generators are part of
    the checkpoint, so the resumed run draws the same dropout masks (4 batches per epoch, validation every epoch)."""
    fixture = FIXTURES["bert"]

    def make_model():
        return fixture.model(dropout=0.1)

    def make_callbacks():
        return [FreezeOut()]

    import resume

    data = resume.data
    resume.data = lambda: (
        resume.ResumableDataLoader(fixture.data(32, 0), batch_size=8, shuffle=True, seed=3),
        fixture.loader(16, seed=1),
    )
    try:
        full, _ = run_uninterrupted(make_model, make_callbacks, tmp_path, max_epochs=3)
        resumed, t = run_interrupted(make_model, make_callbacks, tmp_path, stop_at, max_epochs=3)
    finally:
        resume.data = data
    assert t.global_step == 12
    assert_same_weights(full, resumed)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "bert"])
def test_ddp_freezeout_auto_and_resume_with_dropout(kind, tmp_path):
    reports = run_ddp_script("real_models_ddp.py", tmp_path, kind, timeout=300)
    assert all(r["replicas_equal"] for r in reports)
    assert reports[0]["events"] == reports[1]["events"] and reports[0]["layers"] == AUTO[kind]
    assert reports[0]["ddp_params"] == reports[1]["ddp_params"]
    counts = [n for _, n, _ in reports[0]["ddp_params"]]
    assert (
        counts == sorted(counts, reverse=True) and counts[-1] < counts[0]
    )  # frozen layers leave the all-reduce
    assert all(r["resume_differs"] == [] for r in reports)


def test_compiled_inner_model_recompiles_at_most_once_per_transition():
    """FreezeOut on ``self.model = torch.compile(...)``: specs need no ``_orig_mod.``; the frozen part's mode and
    requires_grad change only at a freeze, so dynamo recompiles at most once per transition."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = FIXTURES["bert"].model()
    model.model = torch.compile(model.model, backend="eager")  # dynamo's guards, without code generation
    freezeout = FreezeOut(["model.bert.embeddings", "model.bert.encoder", "model.bert.pooler"], t0=0.5)
    fit("bert", [freezeout], steps=12, model=model, limit_val_batches=0)
    transitions = len({e["step"] for e in freezeout.events})
    graphs = counters["stats"]["unique_graphs"]
    assert transitions == 3
    # the first compile, and at most one more per transition
    assert graphs <= 1 + transitions, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    "feature",
    [
        dict(precision="bf16-mixed"),
        dict(accumulate_grad_batches=2),
        dict(gradient_clip_val=0.5),
        "gradient_checkpointing",
    ],
    ids=["bf16-mixed", "accumulate", "clip", "hf-checkpointing"],
)
def test_trainer_features_work_with_every_callback(feature):
    for make in (
        lambda: LayerFreeze("auto[:-1]"),
        lambda: FreezeOut(),
        lambda: ProgressiveUnfreezing(every_n_steps=2),
    ):
        model = FIXTURES["bert"].model()
        kw = {}
        if feature == "gradient_checkpointing":
            model.model.gradient_checkpointing_enable()
        else:
            kw = feature
        callback, probe = make(), AtTrainEnd()
        before = snapshot(model)
        fit("bert", [callback, probe], model=model, **kw)
        after = snapshot(model)
        assert any(not torch.equal(before[k], after[k]) for k in before)
        if isinstance(callback, LayerFreeze):
            assert all(
                torch.equal(before[k], after[k]) for k in before if not k.startswith("model.classifier")
            )
