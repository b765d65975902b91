"""AdaptiveFreeze on a real Trainer: front-to-back freezing from the gradients, guards, exact resume, logging,
the timeline with the signal curves, the Hydra preset, and 2-process DDP."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from ddp import run_ddp_script
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from models import AtTrainEnd, Net, loaders, snapshot, trainer
from omegaconf import OmegaConf
from resume import assert_same_weights, run_interrupted, run_uninterrupted

from lightning_freeze import AdaptiveFreeze

CONF = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")
LAYERS = ["backbone.0", "backbone.1", "backbone.2", "head"]


def make(**kw):
    settings = dict(check_every_n_steps=2, percentile=90, min_steps=4)
    return AdaptiveFreeze(**{**settings, **kw})


def fit(callbacks, tmp_path=None, model=None, **kw):
    torch.manual_seed(0)
    model = model or Net(dropout=0.0)
    t = trainer(
        callbacks=callbacks, max_epochs=3, **({"default_root_dir": tmp_path} if tmp_path else {}), **kw
    )
    t.fit(model, *loaders())
    return model, t


def test_freezes_a_front_prefix_at_check_steps_after_min_steps_and_never_the_head(tmp_path):
    adaptive, probe = make(), AtTrainEnd()
    fit([adaptive, probe])
    assert [layer.name for layer in adaptive.layers] == LAYERS
    frozen = [e["layer"] for e in adaptive.events]
    assert frozen and frozen == LAYERS[: len(frozen)] and "head" not in frozen
    assert all(e["step"] >= 4 and e["step"] % 2 == 0 and e["action"] == "freeze" for e in adaptive.events)
    assert all("gradient-norm change" in e["reason"] and "percentile" in e["reason"] for e in adaptive.events)
    for name in frozen:
        assert probe.frozen(name + ".")


def test_frozen_layers_stay_bit_identical_from_their_freeze_on():
    adaptive = make()
    weights = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights[trainer.global_step] = snapshot(pl_module.backbone)

    fit([adaptive, Record()])
    for event in adaptive.events:
        index = event["layer"].split(".")[1]
        at = weights[event["step"]]
        for step, later in weights.items():
            if step >= event["step"]:
                assert all(torch.equal(at[k], later[k]) for k in at if k.startswith(index + ".")), (
                    event,
                    step,
                )


def test_max_frozen_and_min_steps_guard():
    adaptive = make(max_frozen=1, min_steps=0.5)  # 8 steps x 3 epochs: nothing before step 12
    fit([adaptive])
    assert [e["layer"] for e in adaptive.events] in ([], ["backbone.0"])
    assert all(e["step"] >= 12 for e in adaptive.events)
    with pytest.raises(ValueError, match="at most 3 can freeze"):
        fit([make(max_frozen=4)])
    # the head outside the layers: every listed layer may freeze
    everything = make(layers="backbone.*", percentile=99, min_steps=0)
    fit([everything])
    assert everything._max_frozen == 3


def test_monitor_guard_stops_freezing_while_the_metric_gets_worse():
    class WorseEveryTime(Net):
        def on_validation_epoch_end(self):
            self.calls = getattr(self, "calls", 0) + 1
            self.log("score", float(self.calls))  # mode=min: every validation is worse than the one before

    runs = {}
    for monitor in ("score", None):
        torch.manual_seed(0)
        model = WorseEveryTime(dropout=0.0)
        runs[monitor] = make(monitor=monitor, min_steps=0, percentile=50)
        fit([runs[monitor]], model=model, val_check_interval=2, num_sanity_val_steps=0)
    unguarded = [(e["layer"], e["step"]) for e in runs[None].events]
    guarded = [(e["layer"], e["step"]) for e in runs["score"].events]
    # validations after steps 2, 4, 6, ...: the one after step 4 is the first that got worse, so nothing freezes
    # after step 4 with the guard, while the same run without it goes on freezing
    assert any(step > 4 for _, step in unguarded)
    assert guarded == [(name, step) for name, step in unguarded if step <= 4]
    with pytest.raises(ValueError, match="monitor='score'.*no validation"):
        fit([make(monitor="score")], limit_val_batches=0)


def test_logs_each_layer_score_and_the_threshold_and_plots_the_signals(tmp_path):
    adaptive = AdaptiveFreeze(check_every_n_steps=2, percentile=90, min_steps=4, plot=True)
    logged = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.update(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("adaptive/")}
            )

    fit([adaptive, Keep()], tmp_path, log_every_n_steps=1)
    assert "adaptive/threshold" in logged and any(k.startswith("adaptive/score/backbone") for k in logged)
    data = json.loads((tmp_path / "freeze_timeline.json").read_text())
    assert data["callback"] == "AdaptiveFreeze" and data["signal_steps"] == list(range(2, 25, 2))
    assert set(data["signals"]) == set(LAYERS) and len(data["threshold"]) == 12
    assert (tmp_path / "freeze_timeline.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "stop_at", [5, 8, 13], ids=["between-checks", "at-a-check-epoch-end", "after-freezes"]
)
def test_resume_between_decisions_is_bit_identical(stop_at, tmp_path):
    def callbacks():
        return [make()]

    full, t_full = run_uninterrupted(lambda: Net(dropout=0.1), callbacks, tmp_path, max_epochs=3)
    resumed, t = run_interrupted(lambda: Net(dropout=0.1), callbacks, tmp_path, stop_at, max_epochs=3)
    assert_same_weights(full, resumed)
    a, b = t_full.callbacks[0], t.callbacks[0]
    assert a.events == b.events and a.signals == b.signals and a.events


def test_hydra_preset_composes_and_sweeps_against_the_other_strategies():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("lightning_freeze", overrides=["freeze=adaptive", "freeze.check_every_n_steps=5"])
    callback = instantiate(cfg.freeze)
    assert isinstance(callback, AdaptiveFreeze) and callback.check_every_n_steps == 5
    assert callback.layer_spec == "auto" and callback.criterion == "grad_norm_change"


@pytest.mark.ddp
def test_ddp_every_rank_freezes_alike_and_frozen_layers_leave_the_all_reduce(tmp_path):
    reports = run_ddp_script("adaptive_ddp.py", tmp_path)
    assert all(r["replicas_equal"] for r in reports)
    assert reports[0]["events"] == reports[1]["events"] and reports[0]["events"]
    assert reports[0]["ddp_params"] == reports[1]["ddp_params"]
    counts = [n for _, n, _ in reports[0]["ddp_params"]]
    assert counts[-1] < counts[0] and counts == sorted(counts, reverse=True)


def test_no_warning_flood():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([make()])
    assert not [w for w in caught if "AdaptiveFreeze" in str(w.message)]


def test_defaults_are_the_benchmarked_setting_a_check_every_half_epoch():
    adaptive = AdaptiveFreeze()
    assert (adaptive.check_every_n_steps, adaptive.percentile, adaptive.min_steps) == (None, 30.0, 0.2)
    fit([adaptive])  # 8 batches per epoch, 3 epochs: a check every 4 optimizer steps
    assert adaptive.signals.step == [4, 8, 12, 16, 20, 24]
    assert all(e["step"] >= 0.2 * 24 and e["step"] % 4 == 0 for e in adaptive.events)
    with open(CONF + "/freeze/adaptive.yaml") as fh:  # the app runs the same algorithm
        cfg = instantiate(OmegaConf.load(fh))
    assert (cfg.check_every_n_steps, cfg.percentile, cfg.min_steps, cfg.plot) == (None, 30.0, 0.2, True)
