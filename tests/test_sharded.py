"""The freezing callbacks under sharded strategies (DESIGN.md "Freezing semantics" 11), in real processes: 2 CPU
ranks with gloo, the tiny transformers BERT and GPT-2 of tests/hf_models.py.

One script run per (strategy, model) covers several callbacks (tests/ddp_scripts/sharded_matrix.py): for each,
an uninterrupted fit with the full state dict gathered after every step, a fit stopped with the strategy's own
checkpoint, and a resume from it. Checked here: frozen parameters bit-identical during every step in which they
were frozen, no optimizer state for them, no layer reported frozen while a parameter of it trains, every layer
trained in every step in which it was trainable (thawed layers train), the same events on both ranks and in the
resumed run, the resumed run bit-identical to the uninterrupted one, ``requires_grad`` handed back.

FrozenPrefixCache under FSDP2 (tests/ddp_scripts/sharded_cache.py): once warm no frozen module runs and no frozen
unit is all-gathered, bit-identical to the cache-off run; FSDP1 is refused with its reason.

Also: DeepSpeed is refused at fit start by every callback and the cache (without DeepSpeed installed: the
strategy is recognised by its class name), and FSDP1 with flat parameters (``use_orig_params=False``) refuses
layers that split a unit and freezes layers that are whole units exactly.
"""

from __future__ import annotations

import pytest
import torch
from ddp import run_ddp_script
from hf_models import FIXTURES
from lightning.pytorch.strategies import SingleDeviceStrategy
from models import trainer

from lightning_freeze import AdaptiveFreeze, FreezeOut, FrozenPrefixCache, LayerFreeze, ProgressiveUnfreezing
from lightning_freeze.engine.sharding import check_supported_strategy, clean_name, strategy_kind


def check_matrix(reports: list[dict]) -> dict[str, dict]:
    """Assert every check of the matrix script on every rank; returns rank 0's results."""
    first = reports[0]["results"]
    for report in reports:
        for name, r in report["results"].items():
            where = f"rank {report['rank']}, {name}"
            assert r["violations"] == [], where
            assert r["state_of_frozen"] == [], where
            assert r["resume_differs"] == [], f"{where}: resumed run differs from the uninterrupted one"
            assert r["not_handed_back"] == [], where
            assert r["events"], f"{where}: nothing froze or thawed"
            assert r["events"] == first[name]["events"], f"{where}: ranks transitioned differently"
            assert r["resumed_events"] == r["events"], where
            for layer, steps in r["trainable_steps"].items():
                missing = sorted(set(steps) - set(r["trained"].get(layer, [])))
                assert not missing, f"{where}: {layer} was trainable but did not train at steps {missing}"
            assert all("_fsdp_wrapped_module" not in n and "_flat_param" not in n for n in r["layers"]), where
    return first


FSDP2_BERT = ["LayerFreeze", "FreezeOut", "ProgressiveUnfreezing", "AdaptiveFreeze"]


@pytest.fixture(scope="module")
def fsdp2_bert_matrix(tmp_path_factory) -> dict[str, dict]:
    """The FSDP2 × BERT cell, run once: the matrix checks it and AdaptiveFreeze's comparison with DDP reads it."""
    out = tmp_path_factory.mktemp("fsdp2-bert")
    return check_matrix(run_ddp_script("sharded_matrix.py", out, "fsdp2", "bert", *FSDP2_BERT, timeout=900))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "strategy,kind,callbacks",
    [
        ("fsdp2", "bert", FSDP2_BERT),
        ("fsdp2", "gpt2", ["FreezeOut", "ProgressiveUnfreezing", "LayerSampling"]),
        ("fsdp1", "bert", ["LayerFreeze", "FreezeOut", "ProgressiveUnfreezing", "AdaptiveFreeze"]),
        ("fsdp1", "gpt2", ["LayerFreeze", "AdaptiveFreeze"]),
    ],
)
def test_every_callback_is_exact_and_resumes_under_sharding(request, tmp_path, strategy, kind, callbacks):
    if (strategy, kind) == ("fsdp2", "bert"):
        results = request.getfixturevalue("fsdp2_bert_matrix")
    else:
        results = check_matrix(
            run_ddp_script("sharded_matrix.py", tmp_path, strategy, kind, *callbacks, timeout=900)
        )
    assert sorted(results) == sorted(callbacks)


@pytest.mark.slow
@pytest.mark.ddp
def test_adaptive_freeze_decides_as_under_ddp(tmp_path, fsdp2_bert_matrix):
    """The per-layer gradient norm is summed over shards and ranks, so FSDP2 freezes at the steps DDP does."""
    ddp = check_matrix(run_ddp_script("sharded_matrix.py", tmp_path / "ddp", "ddp", "bert", "AdaptiveFreeze"))
    fsdp2 = fsdp2_bert_matrix
    steps = [(e["step"], e["layer"]) for e in ddp["AdaptiveFreeze"]["events"]]
    assert steps == [(e["step"], e["layer"]) for e in fsdp2["AdaptiveFreeze"]["events"]]


@pytest.mark.slow
@pytest.mark.ddp
def test_fsdp1_flat_params_refuse_split_units_and_freeze_whole_units(tmp_path):
    reports = run_ddp_script(
        "sharded_matrix.py", tmp_path, "fsdp1_flat", "bert", "refusal", "LayerFreezeBlocks", "FreezeOutBlocks"
    )
    for report in reports:
        message = report["results"].pop("refusal")
        assert message is not None, "layers='auto' splits the root unit: must be refused"
        assert "FSDP unit '<root>'" in message and "model.bert.embeddings" in message
        assert "use_orig_params=True" in message and "auto_wrap_policy" in message
    results = check_matrix(reports)
    assert results["LayerFreezeBlocks"]["layers"] == [f"model.bert.encoder.layer.{i}" for i in range(3)]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "kind,units",
    [
        ("bert", "model.bert.embeddings,model.bert"),  # the cut's root is an FSDP unit too
        ("resnet", "model.resnet.embedder"),  # BatchNorm in the frozen stage
    ],
)
def test_cache_under_fsdp2_never_gathers_the_frozen_units_once_warm(tmp_path, kind, units):
    """FSDP2, every block (BERT layer, ResNet stage) and the named ``units`` FSDP units, the embeddings and the
    bottom blocks frozen, each a unit of its own: from epoch 2 on no frozen module runs and no frozen unit is
    all-gathered, the losses and the final weights are those of the cache-off run bit for bit, and both ranks serve
    alike."""
    reports = run_ddp_script("sharded_cache.py", tmp_path, "fsdp2", kind, units, timeout=300)
    for report in reports:
        off, on = report["off"], report["on"]
        where = f"rank {report['rank']}"
        assert on["losses"] == off["losses"], where
        assert on["fingerprint"] == off["fingerprint"], where
        assert on["warnings"] == [], where
        assert [(h["hits"], h["lookups"]) for h in on["history"]] == [(0, 32), (32, 32), (32, 32)], where
        assert on["ran_last_epoch"] == {}, f"{where}: frozen modules ran once warm"
        frozen_units = on["frozen"]  # each frozen layer is a unit of its own here
        assert len(frozen_units) >= 2 and all(unit in off["gathers"][-1] for unit in frozen_units)
        for unit in frozen_units:
            assert all(epoch.get(unit, 0) > 0 for epoch in off["gathers"]), (
                f"{where}: {unit} without the cache"
            )
            assert on["gathers"][0].get(unit, 0) > 0, f"{where}: {unit} in the first (filling) epoch"
            assert all(unit not in epoch for epoch in on["gathers"][1:]), (
                f"{where}: {unit} gathered once warm"
            )
        trained = [unit for unit in off["gathers"][-1] if unit not in frozen_units]
        assert all(epoch[unit] == off["gathers"][-1][unit] for epoch in on["gathers"] for unit in trained), (
            where
        )


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Stands for Lightning's DeepSpeedStrategy (not installed here): the callbacks know it by its name."""


@pytest.mark.parametrize(
    "callback",
    [
        lambda: LayerFreeze(layers="auto[:-1]"),
        lambda: FreezeOut(),
        lambda: ProgressiveUnfreezing(),
        lambda: AdaptiveFreeze(),
        lambda: FrozenPrefixCache(),
    ],
    ids=["LayerFreeze", "FreezeOut", "ProgressiveUnfreezing", "AdaptiveFreeze", "FrozenPrefixCache"],
)
def test_deepspeed_is_refused_at_fit_start(callback):
    fixture = FIXTURES["bert"]
    model = fixture.model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(strategy=DeepSpeedStrategy(device=torch.device("cpu")), max_steps=2)
    t.callbacks.append(callback())
    with pytest.raises(ValueError, match=r"does not support DeepSpeedStrategy.*FSDP2, recommended"):
        t.fit(model, fixture.loader(16))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "nothing may train"
    assert all(p.requires_grad for p in model.parameters())


def test_strategy_kinds_and_clean_names():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    assert strategy_kind(ModelParallelStrategy()) == "fsdp2"
    assert strategy_kind(FSDPStrategy()) == "fsdp1"
    assert strategy_kind(DDPStrategy()) == "ddp"
    assert strategy_kind(DeepSpeedStrategy(device=torch.device("cpu"))) == "deepspeed"
    assert strategy_kind(SingleDeviceStrategy(device=torch.device("cpu"))) == "other"
    for sharded in (ModelParallelStrategy(), FSDPStrategy()):
        check_supported_strategy(sharded, "FreezeOut")  # the freezing callbacks work there
    check_supported_strategy(ModelParallelStrategy(), "FrozenPrefixCache", fsdp1_refused="why")
    with pytest.raises(
        ValueError, match=r"FrozenPrefixCache does not support FSDPStrategy \(FSDP1\): why\. Use "
    ):
        check_supported_strategy(FSDPStrategy(), "FrozenPrefixCache", fsdp1_refused="why")
    name = "model._fsdp_wrapped_module.bert.encoder.layer.0._fsdp_wrapped_module._checkpoint_wrapped_module.x"
    assert clean_name(name) == "model.bert.encoder.layer.0.x"


@pytest.mark.parametrize("option", ["fsdp", "fsdp_cpu"])
def test_app_trainer_options_wrap_one_unit_per_transformer_block(option):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_freeze.app.main import CONFIG_NAME
    from lightning_freeze.fsdp import CPUFSDPStrategy, KeepWrapperFSDPStrategy

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=[f"trainer={option}"])
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy) is (CPUFSDPStrategy if option == "fsdp_cpu" else KeepWrapperFSDPStrategy)
    assert isinstance(strategy, FSDPStrategy) and not cfg.trainer.enable_model_summary
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    model = FIXTURES["bert"].model().model
    wrapped = {type(m).__name__ for m in model.modules() if policy._lambda_fn(m)}
    assert wrapped == {"BertLayer"}
    if option == "fsdp_cpu":
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2
        assert strategy._process_group_backend == "gloo"


@pytest.mark.slow
@pytest.mark.ddp
def test_app_fits_then_validates_and_tests_under_fsdp_cpu(tmp_path):
    """``python -m lightning_freeze trainer=fsdp_cpu``: 2 CPU ranks fit, then validate and test on the same Trainer
    through the FSDP wrapper the fit made; the parameter counts are whole (summed over the shards), as under DDP."""
    import json

    from conftest import run_app

    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
    short += ["trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "trainer.logger=false"]
    records = {}
    for option in ("fsdp_cpu", "ddp_cpu"):
        run_dir = tmp_path / option
        proc = run_app(f"hydra.run.dir={run_dir}", f"trainer={option}", *short, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records[option] = json.loads((run_dir / "metrics.json").read_text())
    fsdp, ddp = records["fsdp_cpu"], records["ddp_cpu"]
    assert fsdp["status"] == "ok" and fsdp["global_step"] == 3
    assert {"val/loss", "val/acc"} <= set(fsdp["val"]) and {"test/loss", "test/acc"} <= set(fsdp["test"])
    assert 0 < fsdp["val"]["val/acc"] <= 1 and fsdp["test"]["test/loss"] > 0
    assert (fsdp["trainable_params"], fsdp["total_params"]) == (ddp["trainable_params"], ddp["total_params"])


@pytest.mark.slow
@pytest.mark.ddp
def test_metric_driven_thaw_and_checkpoint_in_the_same_validation_resume_exactly_under_fsdp2(tmp_path):
    """ProgressiveUnfreezing decides a thaw in the validation in which ModelCheckpoint saves a distributed
    checkpoint. The thaw is applied at the next training batch (the decision is saved as pending), so the checkpoint
    holds the frozen set its optimizer state belongs to: the strategy's strict load works and the resumed run is
    bit-identical to the uninterrupted one, thaws included."""
    reports = run_ddp_script("sharded_monitor.py", tmp_path, timeout=300)
    for report in reports:
        events = [(e["step"], e["layer"]) for e in report["events"]]
        assert events == [(8, "model.bert.pooler"), (16, "model.bert.encoder.layer.2")], report["rank"]
        assert sorted(report["resumed"]) == ["16", "8"]
        for step, run in report["resumed"].items():
            assert [(e["step"], e["layer"]) for e in run["events"]] == events, step
            assert run["differs"] == [], f"rank {report['rank']}: resumed from step {step} differs"
