"""The README runs as written: the quickstart's two commands, its Python blocks, its app commands,
the example script, and the CI entry point."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, read_metrics

from lightning_freeze.app.main import CONFIG_NAME

README = (REPO_ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def _commands(block: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def test_quickstart_is_exactly_two_commands():
    first = _blocks(_section("Quickstart"), "bash")[0]
    assert _commands(first) == ["make run", "make test"]


def test_readme_config_table_matches_conf():
    """The app section's table lists every config group and option, and its defaults are the real ones."""
    from hydra import compose, initialize_config_dir

    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| `(\w+)` \|$", _section("The Hydra app"), flags=re.M)
    conf = REPO_ROOT / "conf"
    documented = {group: re.findall(r"`(\w+)`(?![^(]*\))", options) for group, options, _ in rows}
    # conf/hydra holds options of Hydra's own groups (hydra/launcher=slurm), documented with the cluster recipe
    actual = {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in conf.iterdir()
        if d.is_dir() and d.name != "hydra"
    }
    assert {g: sorted(o) for g, o in documented.items()} == actual
    assert all(f"hydra/launcher={p.stem}" in README for p in (conf / "hydra" / "launcher").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(CONFIG_NAME, return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert {group: default for group, _, default in rows} == {group: choices[group] for group, _, _ in rows}


def test_readme_links_to_files_that_exist():
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", README) if not t.startswith(("http://", "https://"))]
    assert links, "expected links to docs/ and benchmarks/results/"
    assert [t for t in links if not (REPO_ROOT / t).exists()] == []


def test_ci_runs_the_readme_test_command():
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in script
    assert re.search(r"^make test$", script, flags=re.M)
    assert os.access(REPO_ROOT / ".ci" / "run", os.X_OK)
    dry = subprocess.run(
        ["make", "-n", "test", f"VENV={sys.prefix}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0 and "-m pytest" in dry.stdout


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the app does for this tiny model; threads only slow it down
    try:
        for block in _blocks(README, "python"):
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    finally:
        torch.set_num_threads(threads)
    assert namespace["trainer"].current_epoch == 2
    from lightning_freeze.tasks.digits import DigitsClassifier

    pretrained = DigitsClassifier().backbone.state_dict()  # the cached pretrained backbone
    trained = namespace["model"].backbone.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in pretrained.items())  # the frozen backbone did not move


def test_plain_trainer_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    import runpy

    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO_ROOT / "examples" / "plain_trainer.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", capsys.readouterr().out).group(1))
    assert accuracy > 0.9


@pytest.mark.slow
def test_readme_app_commands_run(tmp_path: Path):
    """Every `lightning-freeze` command of the app section, shortened to one epoch.

    Single runs go through Hydra's own override parser (compose) and `train` in this process; the
    sweep runs as a real `lightning-freeze -m` process.
    """
    from hydra import compose, initialize_config_dir

    from lightning_freeze.app.main import CONFIG_DIR, train

    commands = _commands(_blocks(_section("The Hydra app"), "bash")[0])
    assert commands and all(c.startswith("lightning-freeze") for c in commands)
    short = [
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    for i, command in enumerate(commands):
        args = shlex.split(command)[1:]
        if "-m" in args:
            exe = Path(sys.executable).with_name("lightning-freeze")
            assert exe.exists(), "the console script is not installed"
            sweep = tmp_path / f"sweep{i}"
            proc = subprocess.run(
                [str(exe), *args, *short, f"hydra.sweep.dir={sweep}"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
            runs = sorted(sweep.glob("*/metrics.json"))
            assert len(runs) == 6 and all(read_metrics(r.parent)["status"] == "ok" for r in runs)
            continue
        cfg_only = "--cfg" in args
        overrides = [a for a in args if a not in ("--cfg", "job")]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=overrides if cfg_only else [*overrides, *short])
        if cfg_only:
            assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
            continue
        result = train(cfg, run_dir=tmp_path / f"run{i}")
        assert result["status"] == "ok", command


def _copy_checkout(dest: Path) -> None:
    """What a fresh clone holds: tracked and untracked-but-not-ignored files (uncommitted included)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.slow
def test_make_run_on_a_fresh_copy(tmp_path: Path):
    """`make run` as a new user runs it, in a copy of the checkout, reusing this venv (VENV=...)."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    clone = tmp_path / "clone"
    _copy_checkout(clone)
    assert not (clone / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_FREEZE_CACHE"}  # a new user's defaults
    env["VENV"] = sys.prefix
    # the Makefile must not reinstall into this venv (that would point its editable install at the copy)
    up_to_date = subprocess.run(["make", "-q", "setup"], cwd=clone, env=env, capture_output=True, timeout=60)
    if up_to_date.returncode != 0:
        pytest.skip(
            f"{sys.prefix} was not set up by `make setup` for this pyproject/constraints; run `make setup`"
        )
    proc = subprocess.run(["make", "run"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "status" in proc.stdout and "val/acc" in proc.stdout and "trainable params" in proc.stdout
    (metrics,) = (clone / "outputs").glob("*/*/metrics.json")
    result = read_metrics(metrics.parent)
    assert result["status"] == "ok" and result["metrics"]["val/acc"] > 0.9
    assert Path(result["run_dir"]).resolve() == metrics.parent.resolve()
    assert list((clone / "outputs" / ".cache").glob("digits_pretrained_*.pt"))  # the pretrain cache
