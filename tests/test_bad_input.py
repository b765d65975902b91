"""Bad input, one table: every case names the input, the stage it must be refused at, and the words of the
message that name the option to change. Nothing trains, nothing earlier is lost.

Stages (each a helper below; a case's ``given`` is what that helper runs):

- ``construction``: ``given()`` builds an object (a splitter, the datamodule, a loader) or runs a pure
  function; it must raise ``error``.
- ``compose``: ``given`` is a tuple of Hydra overrides; composing the app's config must fail.
- ``before training``: ``given`` is a tuple of overrides that compose; ``train(cfg)`` must fail before any
  optimizer step: ``metrics.json`` says ``failed`` with no step, and no checkpoint exists.
- ``end of job``: like ``before training``, but the error can only be known once the run's metrics exist;
  the job fails (exit code and ``metrics.json`` agree) instead of the sweep later.
- ``cli``: ``given`` is a tuple of command-line arguments of ``python -m lightning_freeze``, run in a real
  process; it must exit non-zero, say why on stderr (Hydra's job error report), and record no trained step.
- ``report``: ``given(tmp_path)`` returns the arguments of ``lightning-freeze-report``; it must exit with
  status 2, name the problem, and write nothing.
- ``fit``: ``given(tmp_path)`` runs a real ``Trainer.fit`` that must raise ``error`` (for callback-side
  cases: build the Trainer and model inside ``given``; assert "before training" there if it matters).
- ``warning``: ``given(tmp_path)`` must emit exactly one warning whose text contains the words.

To add a case, append ``Case(id, stage, given, words, error)`` to ``CASES``, or return it from a module of
your own like ``tests/bad_callback_input.py`` (``cases(Case) -> list``) added below; to add a stage, add a
helper ``def _stage(case, ctx) -> str`` (it returns the message the words are looked for in) to ``STAGES``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bad_callback_input import cases as callback_cases
from conftest import CONF_DIR, read_metrics, run_app
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from torch.utils.data import TensorDataset

from lightning_freeze.app.main import CONFIG_NAME, train
from lightning_freeze.splitrun import (
    Arms,
    GroupKFold,
    Holdout,
    KFold,
    RepeatedKFold,
    ResumableDataLoader,
    SplitRunDataModule,
    SplitSpecError,
)
from lightning_freeze.splitrun.report import cli as report_cli

QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.logger=false")


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    given: Any
    words: tuple[str, ...]
    error: type[BaseException] = Exception


@dataclass
class Context:
    tmp_path: Path
    capsys: pytest.CaptureFixture[str]


def _message(err: BaseException) -> str:
    """The error and its causes: Hydra wraps the constructor's error in its own."""
    parts = []
    seen: BaseException | None = err
    while seen is not None and len(parts) < 5:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=list(overrides))


def _data(n: int = 100, labels: bool = False) -> TensorDataset:
    data = TensorDataset(torch.randn(n, 3))
    if labels:
        data.targets = np.arange(n) % 4
    return data


def _file(tmp_path: Path, kind: str) -> str:
    """A checkpoint file that is not one: missing, empty, truncated, text, a directory."""
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        good = tmp_path / "good.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "loops": {}}, good)
        path.write_bytes(good.read_bytes()[:2000])
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    return str(path)


# ----------------------------------------------------------------------------------------------- stages


def _construction(case: Case, ctx: Context) -> str:
    with pytest.raises(case.error) as info:
        case.given()
    return _message(info.value)


def _compose_stage(case: Case, ctx: Context) -> str:
    with pytest.raises(ConfigCompositionException) as info:
        _compose(*case.given)
    return _message(info.value)


def _run_train(case: Case, ctx: Context) -> tuple[str, dict]:
    overrides = [o(ctx.tmp_path) if callable(o) else o for o in case.given]
    run_dir = ctx.tmp_path / "run"
    with pytest.raises(case.error) as info:
        train(_compose(*QUIET, *overrides), run_dir=run_dir)
    return _message(info.value), read_metrics(run_dir)


def _before_training(case: Case, ctx: Context) -> str:
    message, record = _run_train(case, ctx)
    assert record["status"] == "failed" and record["global_step"] is None, record
    assert not (ctx.tmp_path / "run" / "checkpoints").exists()
    return message + "\n" + record["error"]


def _end_of_job(case: Case, ctx: Context) -> str:
    message, record = _run_train(case, ctx)
    assert record["status"] == "failed", record
    return message + "\n" + record["error"]


def _cli(case: Case, ctx: Context) -> str:
    args = [a(ctx.tmp_path) if callable(a) else a for a in case.given]
    run_dir = ctx.tmp_path / "run"
    proc = run_app(*QUIET, *args, f"hydra.run.dir={run_dir}", cwd=ctx.tmp_path)
    assert proc.returncode != 0
    if (run_dir / "metrics.json").exists():
        record = read_metrics(run_dir)
        assert record["status"] == "failed" and not record["global_step"]
    return proc.stderr


def _report(case: Case, ctx: Context) -> str:
    argv = case.given(ctx.tmp_path)
    before = sorted(p.name for p in ctx.tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        report_cli(argv)
    assert info.value.code == 2
    assert sorted(p.name for p in ctx.tmp_path.rglob("*")) == before  # nothing written
    return ctx.capsys.readouterr().err


def _fit(case: Case, ctx: Context) -> str:
    with pytest.raises(case.error) as info:
        case.given(ctx.tmp_path)
    return _message(info.value)


def _warning(case: Case, ctx: Context) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case.given(ctx.tmp_path)
    relevant = [str(w.message) for w in caught if all(word in str(w.message) for word in case.words)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    return relevant[0]


STAGES: dict[str, Callable[[Case, Context], str]] = {
    "construction": _construction,
    "compose": _compose_stage,
    "before training": _before_training,
    "end of job": _end_of_job,
    "cli": _cli,
    "report": _report,
    "fit": _fit,
    "warning": _warning,
}


# ----------------------------------------------------------------------------------------------- the cases

E = SplitSpecError
CASES: list[Case] = [
    # splitters: parameters refused when the object is made
    Case("kfold k=1", "construction", lambda: KFold(k=1), ("KFold", "k must be an integer >= 2"), E),
    Case("kfold k=2.5", "construction", lambda: KFold(k=2.5), ("k must be an integer",), E),
    Case("kfold fold=k", "construction", lambda: KFold(k=5, fold=5), ("fold must be", "0 to k-1 = 4"), E),
    Case("kfold stratify='yes'", "construction", lambda: KFold(stratify="yes"), ("stratify must be true or false",), E),
    Case("kfold test_ratio=1", "construction", lambda: KFold(test_ratio=1.0), ("test_ratio must be a number in [0, 1)",), E),
    Case("holdout ratios sum", "construction", lambda: Holdout(ratios={"train": 0.9, "val": 0.2}), ("ratios must sum to 1",), E),
    Case("holdout zero ratio", "construction", lambda: Holdout(ratios={"train": 1.0, "val": 0.0}), ("ratios.val must be a positive number",), E),
    Case("holdout no train part", "construction", lambda: Holdout(ratios={"tr": 0.5, "val": 0.5}), ("ratios must name the parts 'train' and 'val'",), E),
    Case("holdout one-entry list", "construction", lambda: Holdout(ratios=[1.0]), ("ratios as a list needs 2",), E),
    Case("holdout ratios string", "construction", lambda: Holdout(ratios="0.8/0.2"), ("ratios must map part names",), E),
    Case("repeated repeat=n_repeats", "construction", lambda: RepeatedKFold(n_repeats=2, repeat=2), ("repeat must be", "n_repeats-1 = 1"), E),
    Case("repeated n_repeats=0", "construction", lambda: RepeatedKFold(n_repeats=0), ("n_repeats must be a positive integer",), E),
    Case("arms overlap", "construction", lambda: Arms(arms={"A": [0, 1], "B": [1]}), ("arms 'A' and 'B' both take label 1", "disjoint"), E),
    Case("arms ratios sum", "construction", lambda: Arms(arms={"A": 0.5, "B": 0.6}), ("arms must sum to 1",), E),
    Case("arms name with /", "construction", lambda: Arms(arms={"A/x": 0.5, "B": 0.5}), ("without '/'",), E),
    Case("arms unknown arm", "construction", lambda: Arms(arm="C"), ("arm='C' is not supported", "['A', 'B']"), E),
    Case("arms unknown by", "construction", lambda: Arms(by="site"), ("by='site' is not supported",), E),
    Case("arms by column without column", "construction", lambda: Arms(arms={"A": [0]}, by="column"), ("needs `column`",), E),
    Case("arms val_ratio=0", "construction", lambda: Arms(val_ratio=0), ("val_ratio must be a number in (0, 1)",), E),
    Case("arms empty", "construction", lambda: Arms(arms={}), ("arms must map arm names",), E),
    # splits that cannot be made from the data
    Case("class smaller than k", "construction", lambda: KFold(k=5, stratify=True).split(12, labels=[0] * 10 + [1] * 2), ("at least k=5 members per class", "lower `k`"), E),
    Case("arms name absent labels", "construction", lambda: Arms(arms={"A": [5, 6], "B": [7]}).split(50, labels=np.arange(50) % 5), ("names label value(s) [5, 6] that no sample has", "[0, 1, 2, 3, 4]"), E),
    Case("split seed negative", "construction", lambda: KFold().split(10, seed=-1), ("seed must be a non-negative integer",), E),
    # the datamodule: refused when it is made (a concrete dataset is split right away)
    Case("dm k > n", "construction", lambda: SplitRunDataModule(_data(100), split=KFold(k=200)), ("k=200 folds is more than the 100 samples", "lower `k`"), E),
    Case("dm stratify without labels", "construction", lambda: SplitRunDataModule(_data(), split=KFold(stratify=True)), ("KFold needs labels", "set `labels`"), E),
    Case("dm grouped without groups", "construction", lambda: SplitRunDataModule(_data(), split=GroupKFold()), ("GroupKFold needs groups", "set `groups`"), E),
    Case("dm split as a string", "construction", lambda: SplitRunDataModule(_data(), split="kfold"), ("split must be a splitter object", "KFold(k=5, fold=0)"), E),
    Case("dm batch_size=0", "construction", lambda: SplitRunDataModule(_data(), batch_size=0), ("batch_size must be a positive integer",), E),
    Case("dm seed=-1", "construction", lambda: SplitRunDataModule(_data(), seed=-1), ("seed must be a non-negative integer",), E),
    Case("dm unknown labels field", "construction", lambda: SplitRunDataModule(_data(), split=KFold(stratify=True), labels="no_such_field"), ("labels='no_such_field' names no attribute",), E),
    Case("dm loader option it owns", "construction", lambda: SplitRunDataModule(_data(), loader_options={"shuffle": True}), ("loader_options has ['shuffle']",), E),
    Case("dm unknown remainder", "construction", lambda: SplitRunDataModule(_data(), remainder="wrap"), ("remainder='wrap' is not supported",), E),
    Case("dm dataset not map-style", "construction", lambda: SplitRunDataModule(42), ("dataset must be a map-style dataset",), E),
    Case("loader batch_sampler", "construction", lambda: ResumableDataLoader(_data(), batch_sampler=[[0, 1]]), ("pass batch_size, not batch_sampler",), ValueError),
    # Hydra: a misspelt key or option fails when the config is composed
    Case("unknown split key", "compose", ("split.kk=3",), ("Could not override 'split.kk'", "Key 'kk' is not in struct")),
    Case("unknown trainer key", "compose", ("trainer.max_epoch=1",), ("Key 'max_epoch' is not in struct",)),
    Case("unknown split option", "compose", ("split=bootstrap",), ("Could not find 'split/bootstrap'",)),
    Case("ratios key into null", "compose", ("split.ratios.train=0.7",), ("split.ratios",)),
    # the app: refused before anything is built or trained
    Case("max_epochs=abc", "before training", ("trainer.max_epochs=abc",), ("trainer.max_epochs must be an int or None", "'abc'")),
    Case("seed=abc", "before training", ("seed=abc",), ("seed must be a non-negative integer", "'abc'")),
    Case("split_seed=-3", "before training", ("split_seed=-3",), ("split_seed must be a non-negative integer",)),
    Case("max_epochs=0", "before training", ("trainer.max_epochs=0",), ("trainer.max_epochs=0 trains nothing",)),
    Case("max_steps=0", "before training", ("trainer.max_steps=0",), ("trainer.max_steps=0 trains nothing",)),
    Case("limit_train_batches=0", "before training", ("trainer.limit_train_batches=0",), ("trainer.limit_train_batches=0 trains nothing",)),
    Case("precision=bf17", "before training", ("trainer.precision=bf17",), ("trainer.precision must be", "'bf16-mixed'")),
    Case("accumulate 1.5", "before training", ("trainer.accumulate_grad_batches=1.5",), ("trainer.accumulate_grad_batches must be an int",)),
    Case("checkpoint every abc", "before training", ("checkpoint.every_n_train_steps=abc",), ("checkpoint.every_n_train_steps must be an int",)),
    Case("resume=first", "before training", ("resume=first",), ("resume='first' is not supported", "[None, 'last']")),
    Case("ckpt_path missing", "before training", (lambda t: f"ckpt_path={t / 'nope.ckpt'}",), ("ckpt_path=", "no such file")),
    Case("ckpt_path truncated", "before training", (lambda t: f"ckpt_path={_file(t, 'truncated')}",), ("ckpt_path=", "truncated or corrupt")),
    Case("ckpt_path text", "before training", (lambda t: f"ckpt_path={_file(t, 'text')}",), ("ckpt_path=", "not a complete PyTorch checkpoint")),
    Case("ckpt_path empty", "before training", (lambda t: f"ckpt_path={_file(t, 'empty')}",), ("ckpt_path=", "is empty")),
    Case("ckpt_path directory", "before training", (lambda t: f"ckpt_path={_file(t, 'directory')}",), ("ckpt_path=", "is a directory")),
    Case("ckpt_path and resume", "before training", ("ckpt_path=x.ckpt", "resume=last"), ("set ckpt_path or resume, not both",)),
    Case("resume without checkpoints", "before training", ("resume=last", "trainer.enable_checkpointing=false"), ("resume='last' needs checkpoints", "enable_checkpointing=false")),
    Case("fold out of range", "before training", ("split=kfold", "split.fold=7"), ("KFold: fold must be", "0 to k-1 = 4")),
    Case("ratios do not sum", "before training", ("split.ratios={train: 0.9, val: 0.2}",), ("ratios must sum to 1",)),
    Case("arms with absent labels", "before training", ("split=arms", "split.arms={A: [5, 6], B: [7, 8, 9]}"), ("that no sample has", "[0, 1, 2, 3, 4]")),
    Case("grouped split, no groups", "before training", ("split=group_kfold",), ("GroupKFold needs groups", "set `groups`")),
    Case("datamodule batch_size=0", "before training", ("task.datamodule.batch_size=0",), ("batch_size must be a positive integer",)),
    Case("optimizer lr=-1", "before training", ("task.model.optimizer.lr=-1",), ("task.model.optimizer.lr=-1", "Invalid learning rate")),
    Case("optimizer betas", "before training", ("+task.model.optimizer.betas=[0.9,1.5]",), ("task.model.optimizer.betas=", "beta parameter")),
    Case("optimizer lr=abc", "before training", ("task.model.optimizer.lr=abc",), ("task.model.optimizer.lr must be a number",)),
    Case("optimizer SGD nesterov", "before training", ("task.model.optimizer._target_=torch.optim.SGD", "+task.model.optimizer.nesterov=true"), ("task.model.optimizer.nesterov=True", "Nesterov momentum")),
    Case("optimizer not partial", "before training", ("task.model.optimizer._partial_=false",), ("task.model.optimizer", "_partial_: true")),
    Case("scheduler factor", "before training", ("task.model.scheduler={_target_: torch.optim.lr_scheduler.ReduceLROnPlateau, _partial_: true, factor: 2.0}",), ("task.model.scheduler.factor=2.0", "Factor should be < 1.0")),
    Case("cli optimizer lr=-1", "cli", ("task.model.optimizer.lr=-1",), ("task.model.optimizer.lr=-1",)),
    Case("optimized_metric absent", "end of job", ("freeze=none", "trainer.max_steps=2", "optimized_metric=val/accuracy"), ("optimized_metric='val/accuracy' is not a metric of this run", "val/acc")),
    # the command line, in real processes: the same errors, a non-zero exit code and metrics.json agree
    Case("cli max_epochs=abc", "cli", ("trainer.max_epochs=abc",), ("trainer.max_epochs must be an int or None",)),
    Case("cli corrupt checkpoint", "cli", (lambda t: f"ckpt_path={_file(t, 'truncated')}",), ("truncated or corrupt",)),
    # lightning-freeze-report
    Case("report missing dir", "report", lambda t: [str(t / "no_such_sweep")], ("no sweep dir", "hydra.sweep.dir")),
    Case("report empty dir", "report", lambda t: [str(t)], ("holds no job of a sweep",)),
    Case("report unknown baseline", "report", lambda t: [str(_two_job_sweep(t)), "--baseline", "freeze=bogus"], ("baseline 'freeze=bogus' matches no condition", "fix --baseline")),
]  # fmt: skip


CASES += callback_cases(Case)  # the freezing callbacks' own cases (tests/bad_callback_input.py)


def _two_job_sweep(tmp_path: Path) -> Path:
    """A sweep dir as the app leaves it: two jobs (freeze=none and freeze=layer_freeze), no summary yet."""
    import json

    sweep = tmp_path / "sweep"
    for num, freeze in enumerate(("none", "layer_freeze")):
        job = sweep / str(num)
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(
            json.dumps({"status": "ok", "metrics": {"val/acc": 0.9}, "overrides": [f"freeze={freeze}"]})
        )
    return sweep


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_at_its_stage_naming_the_option(case: Case, tmp_path: Path, capsys):
    message = STAGES[case.stage](case, Context(tmp_path, capsys))
    missing = [word for word in case.words if word not in message]
    assert not missing, f"{case.stage}: {missing} not in:\n{message[-3000:]}"
    if case.stage == "report":
        assert "Traceback" not in message  # a usage error, not a Python traceback


def test_the_table_is_large_and_covers_every_stage_it_uses():
    assert len(CASES) >= 40
    assert {c.stage for c in CASES} <= set(STAGES)
    assert len({c.id for c in CASES}) == len(CASES)


def test_the_report_console_script_answers_without_a_traceback(tmp_path: Path):
    exe = Path(sys.executable).with_name("lightning-freeze-report")
    proc = subprocess.run([str(exe), str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no sweep dir" in proc.stderr and "Traceback" not in proc.stderr
