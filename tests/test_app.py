"""The Hydra app: every config group composes, the job runs end to end, typos fail clearly,
failures are recorded, and the search-path plugin serves our groups to a user's own app."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CONF_DIR, read_metrics, run_app
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_freeze.app.main import CONFIG_DIR, build_callbacks, format_result, train

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_config_dir_is_the_checkout_conf():
    assert Path(CONFIG_DIR) == CONF_DIR.resolve()


def test_expected_groups_exist():
    assert {"task", "freeze", "trainer", "split"} <= set(GROUPS)
    assert {("freeze", "none"), ("freeze", "layer_freeze"), ("task", "digits"), ("split", "holdout")} <= set(
        OPTIONS
    )
    assert {("trainer", "cpu"), ("trainer", "gpu"), ("trainer", "ddp_cpu")} <= set(OPTIONS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes(group: str, option: str):
    cfg = _compose(f"{group}={option}")
    assert OmegaConf.is_struct(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    node = cfg[group]
    if group == "freeze":
        for callback in build_callbacks(node):  # every freeze option builds real callbacks
            assert hasattr(callback, "setup")
    elif group == "trainer":
        assert node._target_ == "lightning.pytorch.Trainer"
        if option != "gpu":
            assert type(instantiate(node, logger=False, enable_checkpointing=False)).__name__ == "Trainer"
    elif group == "task":
        assert "_target_" in node.model and "_target_" in node.datamodule
    elif group == "split":
        assert not any(str(k).startswith("_target_") for k in node)  # flat datamodule kwargs


def test_defaults():
    cfg = _compose()
    assert cfg.freeze._target_ == "lightning_freeze.LayerFreeze"
    assert cfg.freeze.layers == "backbone.*"
    assert cfg.split.split == "holdout"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.seed == 0


def test_build_callbacks_forms():
    assert build_callbacks(None) == []
    assert build_callbacks(OmegaConf.create({})) == []
    single = build_callbacks(OmegaConf.create({"_target_": "lightning_freeze.LayerFreeze", "layers": "head"}))
    assert [type(c).__name__ for c in single] == ["LayerFreeze"]
    several = OmegaConf.create(
        {
            "a": {"_target_": "lightning_freeze.LayerFreeze", "layers": "head"},
            "skip": None,
            "b": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"},
        }
    )
    assert [type(c).__name__ for c in build_callbacks(several)] == ["LayerFreeze", "LearningRateMonitor"]
    with pytest.raises(TypeError, match=r"freeze\.a: expected a config node with _target_"):
        build_callbacks(OmegaConf.create({"a": {"layers": "head"}}))


@pytest.mark.parametrize(
    ("override", "key"),
    [("freeze.layerz=head", "layerz"), ("trainer.max_epoch=1", "max_epoch"), ("sed=1", "sed")],
)
def test_override_typo_is_a_clear_error_in_compose(override: str, key: str):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    message = f"{info.value} {info.value.__cause__}"
    assert f"Could not override '{override.split('=')[0]}'" in message
    assert f"Key '{key}' is not in struct" in message


def test_override_typo_fails_on_the_command_line(tmp_path: Path):
    proc = run_app("freeze.layerz=head", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not override 'freeze.layerz'" in proc.stderr
    assert "Key 'layerz' is not in struct" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing ran


def test_end_to_end_run(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_app(
        f"hydra.run.dir={run_dir}", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_metrics(run_dir)
    assert result["status"] == "ok" and result["error"] is None
    assert result["epochs"] == 2 and result["global_step"] > 0
    assert 0 < result["trainable_fraction"] < 0.05  # only the head trains
    assert result["trainable_params"] < result["total_params"]
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(result["metrics"])
    assert result["metrics"]["val/acc"] > 0.5
    assert result["wall_time_s"] > 0
    assert result["overrides"] == ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    assert result["choices"]["freeze"] == "layer_freeze" and result["choices"]["task"] == "digits"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "split_manifest.json").is_file()
    # the result table is printed at the end
    assert "trainable params" in proc.stdout and "val/acc" in proc.stdout and "status" in proc.stdout


def test_failed_run_records_the_error(tmp_path: Path):
    cfg = _compose(
        "freeze.layers=no_such_module.*", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"
    )
    with pytest.raises(Exception, match="no_such_module"):
        train(cfg, run_dir=tmp_path)
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["status"] == "failed"
    assert "no_such_module" in result["error"]
    assert "Traceback" in result["traceback"]
    assert "failed" in format_result(result)


def test_extra_callbacks_node(tmp_path: Path):
    cfg = _compose(
        "freeze=none",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "+callbacks.lr_monitor={_target_: lightning.pytorch.callbacks.LearningRateMonitor}",
    )
    result = train(cfg, run_dir=tmp_path)
    assert result["status"] == "ok"
    assert result["trainable_fraction"] == 1.0  # freeze=none: everything trains


def test_searchpath_plugin_serves_our_groups_to_a_user_app(tmp_path: Path):
    """A user's own Hydra app composes `freeze: layer_freeze` from lightning-freeze's configs."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "myapp.yaml").write_text(
        textwrap.dedent(
            """\
            defaults:
              - freeze: layer_freeze
              - _self_
            freeze:
              layers: head
            lr: 0.1
            """
        )
    )
    (tmp_path / "myapp.py").write_text(
        textwrap.dedent(
            """\
            import json
            import hydra
            from omegaconf import OmegaConf

            @hydra.main(version_base="1.3", config_path="conf", config_name="myapp")
            def main(cfg):
                print(json.dumps(OmegaConf.to_container(cfg, resolve=True)))

            main()
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "myapp.py", "hydra.run.dir=out", "freeze.until_epoch=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert cfg.lr == 0.1
    assert cfg.freeze._target_ == "lightning_freeze.LayerFreeze"
    assert cfg.freeze.layers == "head"  # the user's own value wins over ours
    assert cfg.freeze.until_epoch == 2 and cfg.freeze.norm == "eval"
    callback = instantiate(cfg.freeze)
    assert type(callback).__name__ == "LayerFreeze" and callback.until_epoch == 2
