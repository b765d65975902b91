"""Packaging: the wheel ships the Hydra configs and the lightning-freeze:// config source, and the app installed
from the wheel finds its configs without the source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO_ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob("lightning_freeze-*.whl")
    return wheel


def test_wheel_contains_configs_plugin_and_entry_point(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml"))
    assert (
        "lightning_freeze.yaml" in configs
        and "task/digits.yaml" in configs
        and "freeze/layer_freeze.yaml" in configs
    )
    assert "config.yaml" not in configs and "hydra/launcher/slurm.yaml" in configs
    missing = [c for c in configs if f"lightning_freeze/conf/{c}" not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    assert (
        "hydra_plugins/lightning_freeze_searchpath/searchpath.py" in names
    )  # the lightning-freeze:// source
    assert "hydra_plugins/__init__.py" not in names  # a namespace package shared with other plugins
    assert "lightning_freeze/py.typed" in names
    assert "lightning_freeze/tasks/digits.py" in names and "lightning_freeze/__main__.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/", ".dev/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lightning-freeze = lightning_freeze.app.main:main" in text


def test_wheel_metadata_has_extras_and_runtime_deps(wheel: Path):
    (metadata,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    for extra in ("dev", "examples", "bench"):
        assert f"Provides-Extra: {extra}" in text
    for dep in ("torch", "lightning", "torchmetrics", "hydra-core"):
        assert f"Requires-Dist: {dep}" in text


def test_installed_wheel_finds_its_configs(wheel: Path, tmp_path: Path):
    """Unpack the wheel as a site dir ahead of the checkout: the installed app composes its config
    from the wheel's lightning_freeze/conf (Hydra's `--info all` shows the search path and config)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_freeze", "--info", "all", "freeze=none"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel_conf = (site / "lightning_freeze" / "conf").resolve()
    (main_row,) = [line for line in proc.stdout.splitlines() if line.startswith("| main ")]
    assert f"file://{wheel_conf} " in main_row + " "
    assert str(REPO_ROOT / "conf") not in proc.stdout  # nothing comes from the checkout
    assert "lightning_freeze.tasks.digits.DigitsClassifier" in proc.stdout
    assert "_target_: lightning_freeze.splitrun.Holdout" in proc.stdout


def test_installed_wheel_leaves_other_hydra_apps_alone_and_serves_apps_that_ask(wheel: Path, tmp_path: Path):
    """Hydra's structured-config tutorial app (`config_name="config"`) runs as without us; an app that lists
    `lightning-freeze://` composes our groups from the wheel."""
    from test_hydra_apps import TUTORIAL

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    (tmp_path / "my_app.py").write_text(TUTORIAL)
    tutorial = run("my_app.py", "hydra.run.dir=out")
    assert tutorial.returncode == 0, tutorial.stderr[-3000:]
    assert tutorial.stdout.strip() == "Host: localhost, port: 3306"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text(
        "defaults:\n  - split: arms\n  - _self_\nhydra:\n  searchpath:\n    - lightning-freeze://\n"
    )
    (tmp_path / "mine.py").write_text(
        "import hydra\nfrom omegaconf import OmegaConf\n"
        "@hydra.main(version_base='1.3', config_path='conf', config_name='mine')\n"
        "def main(cfg):\n    print(OmegaConf.to_yaml(cfg))\nmain()\n"
    )
    mine = run("mine.py", "hydra.run.dir=out", "--info", "searchpath")
    assert mine.returncode == 0, mine.stderr[-3000:]
    assert "lightning-freeze://" in mine.stdout
    composed = run("mine.py", "hydra.run.dir=out")
    assert "_target_: lightning_freeze.splitrun.Arms" in composed.stdout, composed.stderr[-3000:]
