"""The Hydra app: every config group composes and builds, the job runs end to end, typos fail clearly,
failures are recorded, splitters come from `_target_` nodes, and the help says what the app does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, read_metrics, run_app
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_freeze.app.main import CONFIG_DIR, CONFIG_NAME, build_callbacks, job_value, train
from lightning_freeze.app.results import format_result
from lightning_freeze.splitrun import Arms, Holdout, KFold, RepeatedKFold, Splitter

GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"
)  # conf/hydra: Hydra's groups
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.logger=false"]


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=list(overrides))


def test_config_dir_and_name():
    assert Path(CONFIG_DIR) == CONF_DIR.resolve()
    assert CONFIG_NAME == "lightning_freeze" and (CONF_DIR / "lightning_freeze.yaml").is_file()
    assert not (CONF_DIR / "config.yaml").exists()  # a name every Hydra tutorial app uses


def test_expected_groups_exist():
    assert {"task", "freeze", "trainer", "split", "checkpoint"} <= set(GROUPS)
    assert {("freeze", "none"), ("freeze", "layer_freeze"), ("task", "digits"), ("split", "holdout")} <= set(
        OPTIONS
    )
    assert {("trainer", "cpu"), ("trainer", "gpu"), ("trainer", "ddp_cpu"), ("trainer", "ddp")} <= set(
        OPTIONS
    )
    assert {("split", "repeated_kfold"), ("split", "stratified_group_kfold")} <= set(OPTIONS)


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
        if node.accelerator == "cpu":
            assert type(instantiate(node, enable_checkpointing=False, logger=False)).__name__ == "Trainer"
    elif group == "task":
        assert "_target_" in node.model and "_target_" in node.datamodule
    elif group == "split":
        assert isinstance(instantiate(node), Splitter)  # `instantiate(cfg.split)` works in any app
    elif group == "checkpoint" and node:
        assert type(instantiate(node)).__name__ == "ModelCheckpoint"


def test_defaults():
    cfg = _compose()
    assert cfg.freeze._target_ == "lightning_freeze.LayerFreeze" and cfg.freeze.layers == "backbone.*"
    assert instantiate(cfg.split) == Holdout(stratify=True)
    assert cfg.trainer.accelerator == "cpu" and cfg.seed == 0 and cfg.split_seed == 0
    assert cfg.resume is None and cfg.ckpt_path is None and cfg.optimized_metric is None
    dm = instantiate(cfg.task.datamodule)
    assert dm.splitter == Holdout(stratify=True) and dm.seed == 0 and dm.has_test


def test_split_overrides_reach_the_splitter():
    kfold = instantiate(_compose("split=stratified_kfold", "split.fold=3", "split.k=4").split)
    assert kfold == KFold(k=4, fold=3, stratify=True)
    repeated = instantiate(_compose("split=repeated_kfold", "split.repeat=1", "split.n_repeats=3").split)
    assert repeated == RepeatedKFold(k=5, n_repeats=3, repeat=1, fold=0, stratify=True)


@pytest.mark.parametrize(
    ("override", "ratios"),
    [
        (
            "split.ratios={train: 0.7, val: 0.3}",
            {"train": 0.7, "val": 0.3},
        ),  # replaces, no test: 0.1 merged in
        ("split.ratios=[0.6, 0.3, 0.1]", {"train": 0.6, "val": 0.3, "test": 0.1}),  # the list form
    ],
)
def test_ratios_given_replace_the_presets(override, ratios):
    cfg = _compose(override)
    assert instantiate(cfg.split).ratios == ratios
    dm = instantiate(cfg.task.datamodule)
    assert dm.has_test == ("test" in ratios)


def test_label_arms_through_hydra_on_the_digits_labels():
    """The documented example, through Hydra's instantiate (DictConfig/ListConfig all the way)."""
    cfg = _compose("split=arms", "split.arms={A: [0, 1], B: [2, 3, 4]}", "split.arm=B")
    splitter = instantiate(cfg.split)
    assert splitter == Arms(arms={"A": [0, 1], "B": [2, 3, 4]}, arm="B")
    dm = instantiate(cfg.task.datamodule)
    labels = dm.dataset.labels
    assert set(labels[dm.part("train")]) == {2, 3, 4} and set(labels[dm.part("val")]) == {2, 3, 4}


def test_trainer_group_lists_the_arguments_users_set():
    names = ["num_nodes=1", "precision=bf16-mixed", "accumulate_grad_batches=2", "gradient_clip_val=1.0"]
    names += [
        "val_check_interval=0.5",
        "limit_train_batches=0.5",
        "limit_val_batches=3",
        "limit_test_batches=3",
    ]
    names += ["log_every_n_steps=5", "max_time=00:00:10:00", "logger=false"]
    cfg = _compose(*[f"trainer.{n}" for n in names])  # no `+` needed for any of them
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.accumulate_grad_batches == 2


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
    [
        ("freeze.layerz=head", "layerz"),
        ("trainer.max_epoch=1", "max_epoch"),
        ("sed=1", "sed"),
        ("split.kk=3", "kk"),
    ],
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


def test_help_says_what_the_app_does_and_lists_the_groups(tmp_path: Path):
    proc = run_app("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("lightning-freeze: fine-tune a pretrained model with a layer-freezing strategy")
    for group in GROUPS:
        assert f"\n{group}: " in out
    assert "split: arms, group_kfold, holdout, kfold, nested_kfold, repeated_kfold" in out
    assert "resume=last" in out and "optimized_metric" in out


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
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(result["metrics"])
    assert result["metrics"]["val/acc"] > 0.5
    assert 0 < result["fit_time_s"] < result["wall_time_s"]  # the wall time includes setup (pretraining)
    assert result["overrides"] == ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    assert result["choices"]["freeze"] == "layer_freeze" and result["choices"]["split"] == "holdout"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "split_manifest.json").is_file()
    assert "trainable params" in proc.stdout and "val/acc" in proc.stdout and "status" in proc.stdout
    # the app's checkpoints load with torch's default weights_only=True: plain containers only
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == result["global_step"]
    assert last["hyper_parameters"]["pretrained"] is True and "ExactResume" in last["callbacks"]


def test_failed_run_records_the_error(tmp_path: Path):
    cfg = _compose("freeze.layers=no_such_module.*", "trainer.max_epochs=1", *QUIET)
    with pytest.raises(Exception, match="no_such_module"):
        train(cfg, run_dir=tmp_path)
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["status"] == "failed" and "no_such_module" in result["error"]
    assert "Traceback" in result["traceback"] and "failed" in format_result(result)


def test_extra_callbacks_node(tmp_path: Path):
    cfg = _compose(
        "freeze=none",
        "trainer.max_epochs=1",
        *QUIET[:2],  # LearningRateMonitor needs a logger
        "+callbacks.lr_monitor={_target_: lightning.pytorch.callbacks.LearningRateMonitor}",
    )
    result = train(cfg, run_dir=tmp_path)
    assert result["status"] == "ok" and result["trainable_fraction"] == 1.0  # freeze=none: everything trains


def test_optimized_metric_is_the_value_the_job_returns(tmp_path: Path):
    cfg = _compose("freeze=none", "trainer.max_steps=3", *QUIET, "optimized_metric=val/acc")
    result = train(cfg, run_dir=tmp_path)
    value = job_value(cfg, result)
    assert type(value) is float and value == result["metrics"]["val/acc"]
    assert job_value(_compose(), result) == result  # no optimized_metric: the whole result


def test_a_refused_rerun_never_destroys_the_earlier_result(tmp_path: Path):
    """Re-running into a run dir with another split is refused, and the earlier metrics.json stays."""
    first = train(_compose("freeze=none", "trainer.max_steps=3", *QUIET), run_dir=tmp_path)
    assert first["status"] == "ok"
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(ValueError, match="split differently"):
        train(_compose("freeze=none", "trainer.max_steps=3", *QUIET, "split_seed=1"), run_dir=tmp_path)
    assert (tmp_path / "metrics.json").read_text() == before
    refused = json.loads((tmp_path / "metrics.failed.json").read_text())
    assert (
        refused["status"] == "failed"
        and "split differently" in refused["error"]
        and refused["global_step"] is None
    )


def test_hydra_tutorial_app_and_user_app_can_use_our_groups(tmp_path: Path):
    """A user's own app asks for our groups with `hydra.searchpath: [lightning-freeze://]`."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "myapp.yaml").write_text(
        "defaults:\n  - freeze: layer_freeze\n  - split: stratified_kfold\n  - _self_\n"
        "hydra:\n  searchpath:\n    - lightning-freeze://\nfreeze:\n  layers: head\nlr: 0.1\n"
    )
    (tmp_path / "myapp.py").write_text(
        "import json, hydra\nfrom omegaconf import OmegaConf\n\n"
        "@hydra.main(version_base='1.3', config_path='conf', config_name='myapp')\n"
        "def main(cfg):\n    print(json.dumps(OmegaConf.to_container(cfg, resolve=True)))\n\nmain()\n"
    )
    proc = subprocess.run(
        [sys.executable, "myapp.py", "hydra.run.dir=out", "freeze.until_epoch=2", "split.fold=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert cfg.lr == 0.1 and cfg.freeze.layers == "head"  # the user's own value wins over ours
    assert cfg.freeze.until_epoch == 2 and cfg.freeze.norm == "eval"
    assert type(instantiate(cfg.freeze)).__name__ == "LayerFreeze"
    assert instantiate(cfg.split) == KFold(k=5, fold=3, stratify=True)


def test_build_trainer_adds_every_configured_callback_in_order(tmp_path: Path):
    from lightning.pytorch.callbacks import Timer

    from lightning_freeze.app.main import build_trainer

    cfg = _compose("cache=frozen_prefix", *QUIET)
    extra = Timer()  # a callback the caller adds (the app adds its parameter counter)
    trainer = build_trainer(cfg, tmp_path, [extra])
    names = [type(c).__name__ for c in trainer.callbacks]
    # freeze, cache, the `callbacks` node's, ExactResume, then the caller's; Lightning moves checkpoints last
    expected = ["LayerFreeze", "FrozenPrefixCache"]
    expected += [type(c).__name__ for c in build_callbacks(cfg.callbacks, "callbacks")]
    assert names == [*expected, "ExactResume", "Timer", "ModelCheckpoint"]
    assert extra in trainer.callbacks
    assert trainer.default_root_dir == str(tmp_path)
    assert trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


def test_metrics_json_keeps_its_keys(tmp_path: Path):
    """The result record is a dataclass; metrics.json keeps the keys users' tooling reads."""
    from lightning_freeze.app.results import RunResult

    keys = set(RunResult(run_dir=str(tmp_path)).to_dict())
    assert {
        "status", "error", "metrics", "val", "test", "wall_time_s", "fit_time_s", "trainable_fraction",
        "trainable_params", "total_params", "epochs", "global_step", "resumed_from", "seed", "overrides",
        "choices", "run_dir", "run_id", "traceback", "resume_from", "resume_hint", "written_to",
    } == keys  # fmt: skip


def _message_text(line: str) -> str:
    """A printed line without the logging format around it (Hydra's `[date][name][LEVEL] - `, `INFO: `)."""
    line = re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - ", "", line)
    return re.sub(r"^(INFO|WARNING|ERROR|DEBUG): ", "", line).strip()


def test_a_run_prints_each_message_once_and_warnings_say_warning(tmp_path: Path):
    """Lightning's messages once, in Hydra's format (also in the job's log file); warnings with their
    category; nothing printed twice (the result table's rules aside)."""
    run_dir = tmp_path / "run"
    proc = run_app(
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "freeze.until_epoch=5",  # beyond the fit: the callback warns
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [_message_text(line) for line in (proc.stdout + proc.stderr).splitlines()]
    messages = [line for line in lines if any(c.isalnum() for c in line)]
    repeated = sorted({m for m in messages if messages.count(m) > 1})
    assert not repeated, f"printed more than once: {repeated}"
    everything = proc.stdout + proc.stderr
    assert everything.count("GPU available") == 1 and "INFO: GPU available" not in everything
    assert "][lightning.pytorch.utilities.rank_zero][INFO] - GPU available" in proc.stdout
    assert "GPU available" in (run_dir / "lightning-freeze.log").read_text()  # Hydra's job log has it too
    (warning,) = [line for line in proc.stderr.splitlines() if "the layers thaw at epoch 5" in line]
    assert re.search(r"\w+Warning: LayerFreeze: the layers thaw at epoch 5", warning), warning


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children()]


def _seconds_until_dead(pid: int, timeout: float = 30) -> float:
    """How long until ``pid`` has exited: gone, or a zombie (an orphan's new parent, e.g. a container's
    init process, may reap it much later; ``psutil.wait`` would count that delay)."""
    import time

    import psutil

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.ddp
def test_ranks_exit_with_their_launcher_and_leave_no_rank_config(tmp_path: Path):
    """SIGKILL rank 0 (the launcher) mid-training: rank 1 exits at once (the kernel's parent-death signal,
    not gloo noticing a missing peer seconds later), and the run dir holds no rank config."""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "lightning_freeze", f"hydra.run.dir={run_dir}", "trainer=ddp_cpu"]
    command += ["trainer.max_epochs=1000", "checkpoint.every_n_train_steps=3", *QUIET]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("*step=3*.ckpt")):  # both ranks are training
            assert launcher.poll() is None and time.monotonic() < deadline, (
                "the DDP job did not start training"
            )
            time.sleep(0.2)
        (rank_1,) = _children(launcher.pid)
        os.kill(launcher.pid, signal.SIGKILL)
        lingered = _seconds_until_dead(rank_1)
    finally:
        launcher.kill()
        launcher.wait()
    assert lingered < 1.0, f"rank 1 outlived its launcher by {lingered:.2f} s"
    assert not list(run_dir.glob(".rank_config*")) and not list(run_dir.glob("*.tmp"))


def test_the_launcher_watchdog_alone_ends_an_orphaned_rank(tmp_path: Path):
    """Where there is no parent-death signal (not Linux), the watchdog thread ends a rank whose launcher died."""

    rank = (
        "import os, time\n"
        "from lightning_freeze.app.launch import exit_with_launcher\n"
        "exit_with_launcher(os.getppid(), parent_death_signal=False, poll_s=0.1)\n"
        "print('watching', flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {rank!r}])\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "watching"  # printed by the rank
        (orphan,) = _children(proc.pid)
        proc.kill()
        assert _seconds_until_dead(orphan) < 1.0  # polled every 0.1 s
    finally:
        proc.kill()
        proc.wait()
