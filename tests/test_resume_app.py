"""Resume and interruption from the command line: Ctrl+C is recorded as `interrupted` with the checkpoint to
resume from; `resume=last` and `ckpt_path=` continue bit-exactly (same final weights as an uninterrupted run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, read_metrics
from hydra import compose, initialize_config_dir

from lightning_freeze.app.main import CONFIG_NAME, train

TESTS = Path(__file__).parent
RUN = [
    "trainer.max_epochs=3",
    "checkpoint.every_n_train_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.logger=false",
]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=list(overrides))


@pytest.fixture
def sigint_restored():
    """Lightning ignores SIGINT after it handled a KeyboardInterrupt; give the test process its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "not bit-identical after resume"


@pytest.mark.parametrize("freeze", ["none", "layer_freeze"])
def test_interrupt_then_resume_last_and_ckpt_path_continue_bit_exactly(tmp_path, freeze, sigint_restored):
    sys.path.insert(0, str(TESTS))  # app_callbacks, for the `_target_` below
    base = [f"freeze={freeze}", *RUN]
    full = train(_compose(*base), run_dir=tmp_path / "full")
    assert full["status"] == "ok" and full["global_step"] == 36  # 3 epochs x 12 batches

    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into SystemExit(1) after its own cleanup
        train(
            _compose(*base, "+callbacks.stop={_target_: app_callbacks.InterruptAt, step: 17}"),
            run_dir=stopped,
        )
    record = read_metrics(stopped)
    assert record["status"] == "interrupted" and (record["epochs"], record["global_step"]) == (1, 17)
    assert record["resume_from"] == str(stopped / "checkpoints" / "last.ckpt")  # written at step 15
    assert "resume=last" in record["resume_hint"]
    copy = tmp_path / "step15.ckpt"
    shutil.copy(record["resume_from"], copy)

    resumed = train(_compose(*base, "resume=last"), run_dir=stopped)
    assert resumed["status"] == "ok" and resumed["resumed_from"] == record["resume_from"]
    assert resumed["global_step"] == 36 and read_metrics(stopped)["status"] == "ok"
    _assert_same(
        _weights(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _weights(stopped / "checkpoints" / "last.ckpt"),
    )
    assert resumed["metrics"] == full["metrics"]

    elsewhere = train(_compose(*base, f"ckpt_path={copy}"), run_dir=tmp_path / "elsewhere")
    assert elsewhere["resumed_from"] == str(copy)
    _assert_same(
        _weights(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        _weights(tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"),
    )


def test_resume_last_without_a_checkpoint_starts_fresh(tmp_path):
    """The first attempt of an auto-requeued job: resume=last and nothing to resume from yet."""
    result = train(_compose("freeze=none", "trainer.max_steps=3", *RUN[2:], "resume=last"), run_dir=tmp_path)
    assert result["status"] == "ok" and result["resumed_from"] is None and result["global_step"] == 3


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_is_recorded_with_the_checkpoint_to_resume_from(tmp_path):
    """A real SIGINT to a running `python -m lightning_freeze`: exit code and metrics.json agree, and the
    record names the checkpoint that `resume=last` continues from (resuming is tested in-process above)."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "lightning_freeze", "freeze=none", f"hydra.run.dir={run_dir}", *RUN[1:]]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        [*args, "trainer.max_epochs=400"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell starts background jobs with SIGINT ignored, and the child would inherit that: give it the
        # disposition a terminal gives, so Python turns the signal into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while (
        not (run_dir / "checkpoints" / "last.ckpt").exists()
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["global_step"] >= 5, out[-3000:]
    assert record["epochs"] is not None and record["error"].startswith(("SystemExit", "KeyboardInterrupt"))
    assert (
        record["resume_from"] == str(run_dir / "checkpoints" / "last.ckpt")
        and "resume=last" in record["resume_hint"]
    )
