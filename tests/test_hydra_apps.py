"""Other Hydra apps with lightning-freeze installed: an app that does not ask for our config groups is exactly
what it is without us (Hydra's structured-config tutorial app, a lightning-hydra-template-shaped app); an app
that asks (`hydra.searchpath: [lightning-freeze://]`) gets our groups, complete in themselves, next to its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TUTORIAL = """
from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore


@dataclass
class MySQLConfig:
    host: str = "localhost"
    port: int = 3306


cs = ConfigStore.instance()
cs.store(name="config", node=MySQLConfig)


@hydra.main(version_base=None, config_name="config")
def my_app(cfg: MySQLConfig) -> None:
    print(f"Host: {cfg.host}, port: {cfg.port}")


if __name__ == "__main__":
    my_app()
"""

TEMPLATE_APP = """
import json

import hydra
from omegaconf import OmegaConf


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg):
    print(json.dumps(OmegaConf.to_container(cfg, resolve=True)))


if __name__ == "__main__":
    main()
"""

TEMPLATE_CONFIGS = {
    "train.yaml": """
        defaults:
          - _self_
          - trainer: default
          - paths: default
        task_name: train
        seed: 12345
    """,
    "paths/default.yaml": """
        output_dir: ${hydra:runtime.output_dir}
    """,
    "trainer/default.yaml": """
        _target_: lightning.pytorch.trainer.Trainer
        default_root_dir: ${paths.output_dir}
        min_epochs: 1
        max_epochs: 10
        accelerator: cpu
        devices: 1
        check_val_every_n_epoch: 1
        deterministic: false
    """,
    "trainer/cpu.yaml": """
        defaults:
          - default
        accelerator: cpu
        devices: 1
    """,
    "trainer/ddp.yaml": """
        defaults:
          - default
        strategy: ddp
        accelerator: gpu
        devices: 4
        num_nodes: 1
        sync_batchnorm: True
    """,
}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def _run(app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, app.name, "hydra.run.dir=out", *args],
        cwd=app.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tutorial(tmp_path: Path) -> Path:
    app = tmp_path / "my_app.py"
    app.write_text(TUTORIAL)
    return app


@pytest.fixture
def template(tmp_path: Path) -> Path:
    app = tmp_path / "train.py"
    app.write_text(TEMPLATE_APP)
    _write(tmp_path / "configs", TEMPLATE_CONFIGS)
    return app


def test_hydra_structured_config_tutorial_app_is_unchanged(tutorial):
    proc = _run(tutorial)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "Host: localhost, port: 3306"
    help_text = _run(tutorial, "--help").stdout
    assert "freeze" not in help_text and "split" not in help_text and "lightning" not in help_text
    searchpath = _run(tutorial, "--info", "searchpath").stdout
    assert "lightning" not in searchpath


def test_template_app_that_does_not_ask_sees_nothing_of_ours(template):
    proc = _run(template, "trainer=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cfg["trainer"]["default_root_dir"].endswith("out") and "freeze" not in cfg
    missing = _run(template, "trainer=ddp_cpu")  # ours, but this app did not ask: the error Hydra gives alone
    assert missing.returncode != 0 and "Could not find 'trainer/ddp_cpu'" in missing.stderr
    help_text = _run(template, "--help").stdout
    assert (
        "trainer: cpu, ddp, default" in help_text and "freeze" not in help_text and "ddp_cpu" not in help_text
    )


def test_template_app_that_asks_gets_our_groups_complete_and_its_own_first(template):
    train_yaml = template.parent / "configs" / "train.yaml"
    train_yaml.write_text(train_yaml.read_text() + "hydra:\n  searchpath:\n    - lightning-freeze://\n")
    ours = _run(template, "trainer=ddp_cpu", "+freeze=layer_freeze", "+split=kfold", "split.fold=2")
    assert ours.returncode == 0, ours.stderr[-3000:]
    cfg = json.loads(ours.stdout.strip().splitlines()[-1])
    # our ddp_cpu alone: nothing of the app's trainer/cpu.yaml or trainer/default.yaml mixed in
    assert cfg["trainer"]["strategy"] == "ddp" and cfg["trainer"]["devices"] == 2
    assert "default_root_dir" not in cfg["trainer"] and "sync_batchnorm" not in cfg["trainer"]
    assert cfg["freeze"]["_target_"] == "lightning_freeze.LayerFreeze"
    assert cfg["split"] == {
        "_target_": "lightning_freeze.splitrun.KFold",
        "k": 5,
        "fold": 2,
        "stratify": False,
        "shuffle": True,
        "test_ratio": 0.0,
    }
    own = json.loads(_run(template, "trainer=cpu").stdout.strip().splitlines()[-1])
    assert own["trainer"]["default_root_dir"].endswith("out")  # the app's own trainer/cpu wins
    searchpath = _run(template, "--info", "searchpath").stdout
    assert searchpath.count("lightning-freeze://") == 1


def _ask_for_our_groups(template: Path, extra: str = "") -> None:
    train_yaml = template.parent / "configs" / "train.yaml"
    train_yaml.write_text(
        train_yaml.read_text() + extra + "hydra:\n  searchpath:\n    - lightning-freeze://\n"
    )


def test_the_help_of_an_app_that_asks_lists_our_groups_next_to_its_own(template):
    """Hydra lists `--help` groups from the search path it starts with, without the primary config's
    `hydra.searchpath`; our plugin adds lightning-freeze:// there for an app that asks, and only then."""
    _ask_for_our_groups(template)
    proc = _run(template, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = proc.stdout.split("== Config ==")[0].splitlines()
    groups = dict(line.split(": ", 1) for line in listed if ": " in line)
    assert (
        groups["trainer"] == "cpu, ddp, ddp_cpu, default, fsdp, fsdp_cpu, gpu"
    )  # the app's and ours, one list
    assert groups["freeze"].startswith("adaptive, backbone, freezeout, layer_freeze")
    assert "kfold" in groups["split"] and groups["task"] == "digits" and "none" in groups["cache"]
    assert groups["paths"] == "default"  # the app's own group
    # the composition itself is Hydra's: our source appears once in the search path a job uses
    assert _run(template, "--info", "searchpath").stdout.count("lightning-freeze://") == 1
    # asking on the command line instead of in the primary config works the same
    (template.parent / "configs" / "train.yaml").write_text(textwrap.dedent(TEMPLATE_CONFIGS["train.yaml"]))
    assert "freeze" not in _run(template, "--help").stdout
    asked = _run(template, "hydra.searchpath=[lightning-freeze://]", "--help").stdout
    assert "\nfreeze: adaptive" in asked


def test_the_plugin_costs_other_apps_no_torch_import():
    """Hydra imports every plugin module for every app: ours imports neither torch nor Lightning."""
    code = (
        "import sys, json\n"
        "import hydra_plugins.lightning_freeze_searchpath.searchpath as plugin\n"
        "print(json.dumps([plugin.conf_dir().name, sorted(m for m in ('torch', 'lightning') if m in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == ["conf", []]


def test_the_digits_task_works_in_another_app_without_top_level_keys(template):
    """`task: digits` needs no key of our primary config; it follows the app's split, split_seed and seed
    when the app has them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_freeze.splitrun import Holdout, KFold

    _ask_for_our_groups(template)
    train_yaml = template.parent / "configs" / "train.yaml"
    train_yaml.write_text(train_yaml.read_text().replace("seed: 12345\n", ""))  # no top-level key of ours
    with initialize_config_dir(config_dir=str(template.parent / "configs"), version_base="1.3"):
        alone = compose("train", overrides=["+task=digits"])
        with_ours = compose("train", overrides=["+task=digits", "+split=kfold", "split.fold=2", "+seed=7"])
    datamodule = instantiate(alone.task.datamodule)
    assert datamodule.splitter == Holdout() and datamodule.seed == 0 and datamodule.shuffle_seed == 0
    assert callable(instantiate(alone.task.model.optimizer))
    datamodule = instantiate(with_ours.task.datamodule)
    assert datamodule.splitter == KFold(k=5, fold=2) and datamodule.shuffle_seed == 7
    # and a real process of that app composes and resolves it
    proc = _run(template, "+task=digits", "trainer=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cfg["task"]["datamodule"]["split"] is None and cfg["task"]["datamodule"]["seed"] == 0
