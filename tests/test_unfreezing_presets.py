"""The presets conf/freeze/progressive.yaml and conf/freeze/backbone.yaml: they compose into the callback with
the documented settings and run from the command line (`python -m lightning_freeze freeze=...`)."""

import json

import pytest
from conftest import CONF_DIR, read_metrics, run_app
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_freeze import ProgressiveUnfreezing


def _freeze_node(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("lightning_freeze", overrides=list(overrides)).freeze


def test_backbone_preset_has_backbone_finetuning_defaults():
    cb = instantiate(_freeze_node("freeze=backbone"))
    assert isinstance(cb, ProgressiveUnfreezing)
    assert cb.layer_spec == ["backbone", "head"]
    assert [(p.spec, p.at_epoch, p.lr_ratio) for p in cb.phases] == [(("backbone",), 10, 0.1)]
    assert (cb.lr_growth, cb.lr_decay, cb.norm) == (2.0, 1.0, "train")


def test_progressive_preset_thaws_one_block_per_epoch_at_the_head_lr():
    cb = instantiate(_freeze_node("freeze=progressive", "freeze.warmup_steps=5"))
    assert (cb.every_n_epochs, cb.lr_decay, cb.warmup_steps, cb.phases) == (1, 1.0, 5, None)
    assert cb.lr_decay == ProgressiveUnfreezing().lr_decay  # the preset follows the Python default


def test_ulmfit_preset_is_the_progressive_preset_with_discriminative_lrs():
    ulmfit = instantiate(_freeze_node("freeze=ulmfit"))
    progressive = instantiate(_freeze_node("freeze=progressive"))
    assert ulmfit.lr_decay == 2.6
    assert (ulmfit.layer_spec, ulmfit.every_n_epochs, ulmfit.phases, ulmfit.plot) == (
        progressive.layer_spec,
        progressive.every_n_epochs,
        progressive.phases,
        progressive.plot,
    )


@pytest.mark.parametrize(
    "overrides, thaws",
    [
        (["freeze=progressive"], ["backbone.2", "backbone.1"]),
        (["freeze=ulmfit"], ["backbone.2", "backbone.1"]),
        (["freeze=backbone", "freeze.phases.0.at_epoch=1"], ["backbone"]),
    ],
    ids=["progressive", "ulmfit", "backbone"],
)
def test_presets_run_from_the_command_line(overrides, thaws, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        *overrides,
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_metrics(run_dir)
    assert result["status"] == "ok" and result["choices"]["freeze"] == overrides[0].split("=")[1]
    timeline = json.loads(next(run_dir.rglob("freeze_timeline.json")).read_text())
    assert [e["layer"] for e in timeline["events"]] == thaws
    assert result["metrics"]["val/acc"] > 0.5
