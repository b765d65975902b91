"""The freezing callbacks' bad inputs for the table in test_bad_input.py: each builds a real Trainer and model and
fits (``fit`` stage: must raise before training) or must warn once (``warning`` stage)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from models import Net, loaders, trainer

from lightning_freeze import FreezeOut, FrozenPrefixCache, LayerFreeze, ProgressiveUnfreezing
from lightning_freeze.engine.layers import LayerSpecError
from lightning_freeze.rules.thawing import PhaseError


class StepCounter(pl.Callback):
    """Fails the case if a training step ran: the error must come before training."""

    def on_train_batch_end(self, trainer, *args):
        raise AssertionError("a training step ran before the bad input was refused")


def _fit(callbacks, tmp_path, model=None, val=True, **kw):
    torch.manual_seed(0)
    t = trainer(callbacks=[*callbacks], default_root_dir=tmp_path, **kw)
    train, val_loader = loaders()
    t.fit(model or Net(), train, val_loader if val else None)
    return t


def _refused(callbacks, tmp_path, **kw):
    _fit([*callbacks, StepCounter()], tmp_path, **kw)


class NoOptimizer(Net):
    def configure_optimizers(self):
        return None


def _checkpoint_of(callback, tmp_path):
    t = _fit([callback], tmp_path / "first", max_epochs=1)
    path = tmp_path / "first.ckpt"
    t.save_checkpoint(path)
    return str(path)


def _resume_with_another(tmp_path):
    ckpt = _checkpoint_of(LayerFreeze("backbone.*"), tmp_path)
    t = trainer(
        callbacks=[FreezeOut("backbone.*"), StepCounter()],
        default_root_dir=tmp_path,
        max_epochs=2,
    )
    t.fit(Net(), *loaders(), ckpt_path=ckpt)


def _resume_without(tmp_path):
    t = _fit([], tmp_path / "first", max_epochs=1)
    path = tmp_path / "plain.ckpt"
    t.save_checkpoint(path)
    t2 = trainer(
        callbacks=[LayerFreeze("backbone.*"), StepCounter()],
        default_root_dir=tmp_path,
        max_epochs=2,
    )
    t2.fit(Net(), *loaders(), ckpt_path=str(path))


def cases(Case):  # noqa: N803 - the table's own case type
    return [
        Case(
            "freeze-every-parameter",
            "fit",
            lambda p: _refused([LayerFreeze(["backbone", "head"])], p),
            ("every parameter of the model is frozen", "layers"),
            ValueError,
        ),
        Case(
            "freeze-all-until-epoch",
            "fit",
            lambda p: _refused([LayerFreeze("*", until_epoch=1)], p),
            ("nothing would train", "layers"),
            ValueError,
        ),
        Case(
            "configure-optimizers-returns-none",
            "fit",
            lambda p: _refused([LayerFreeze("backbone.*")], p, model=NoOptimizer()),
            ("configure_optimizers", "exactly one optimizer"),
            ValueError,
        ),
        Case(
            "layer-freeze-checkpoint-resumed-with-freezeout",
            "fit",
            _resume_with_another,
            ("saved with ['LayerFreeze']", "not with FreezeOut"),
            ValueError,
        ),
        Case(
            "plain-checkpoint-resumed-with-layer-freeze",
            "fit",
            _resume_without,
            ("saved without LayerFreeze",),
            ValueError,
        ),
        Case(
            "until-epoch-beyond-the-fit",
            "warning",
            lambda p: _fit([LayerFreeze("backbone.*", until_epoch=5)], p, max_epochs=2),
            ("LayerFreeze", "epoch 5", "max_epochs=2", "never happens"),
        ),
        Case(
            "until-step-beyond-the-fit",
            "warning",
            lambda p: _fit([LayerFreeze("backbone.*", until_step=100)], p, max_epochs=1),
            ("LayerFreeze", "step 100", "never happens"),
        ),
        Case(
            "phase-that-never-fires",
            "warning",
            lambda p: _fit(
                [
                    ProgressiveUnfreezing(
                        ["backbone.*", "head"], phases=[{"layers": "backbone.0", "at_epoch": 9}]
                    )
                ],
                p,
                max_epochs=2,
            ),
            ("ProgressiveUnfreezing", "['backbone.0'] thaw at epoch 9", "never happens"),
        ),
        Case(
            "monitor-without-validation",
            "fit",
            lambda p: _refused(
                [ProgressiveUnfreezing(["backbone.*", "head"], monitor="val_loss")], p, val=False
            ),
            ("monitor='val_loss'", "no validation"),
            ValueError,
        ),
        Case(
            "monitor-with-limit-val-batches-0",
            "fit",
            lambda p: _refused(
                [ProgressiveUnfreezing(["backbone.*", "head"], monitor="val_loss")], p, limit_val_batches=0
            ),
            ("monitor='val_loss'", "limit_val_batches=0"),
            ValueError,
        ),
        Case(
            "head-not-listed-last",
            "fit",
            lambda p: _refused([ProgressiveUnfreezing(["head", "backbone.*"])], p),
            ("layers=['head', 'backbone.*']", "the last layer is the head"),
            LayerSpecError,
        ),
        Case(
            "freezeout-layers-out-of-order",
            "fit",
            lambda p: _refused([FreezeOut(["backbone.2", "backbone.0"])], p),
            ("forward pass runs them in the order ['backbone.0', 'backbone.2']",),
            LayerSpecError,
        ),
        Case(
            "phase-names-a-missing-module",
            "fit",
            lambda p: _refused(
                [
                    ProgressiveUnfreezing(
                        ["backbone.*", "head"], phases=[{"layers": "encoder", "at_epoch": 1}]
                    )
                ],
                p,
            ),
            ("phase 0", "'encoder' matches no parameter-owning module"),
            PhaseError,
        ),
        Case(
            "layer-spec-matches-nothing",
            "fit",
            lambda p: _refused([LayerFreeze("encoder.*")], p),
            ("layers", "'encoder.*' matches no parameter-owning module", "Closest module names"),
            LayerSpecError,
        ),
        Case(
            "two-freezing-callbacks",
            "fit",
            lambda p: _refused([LayerFreeze("backbone.0"), FreezeOut("backbone.*")], p),
            ("one freezing callback per Trainer",),
            ValueError,
        ),
        Case(
            "two-callbacks-of-one-kind",
            "fit",
            lambda p: _refused([LayerFreeze("backbone.0"), LayerFreeze("backbone.1")], p),
            ("2 LayerFreeze callbacks in one Trainer", "Merge them into one", "backbone.1"),
            ValueError,
        ),
        Case(
            "freezeout-with-a-scheduler",
            "fit",
            lambda p: _refused([FreezeOut("backbone.*")], p, model=Net(scheduler="cosine")),
            ("FreezeOut sets every param group's learning rate itself", "configure_optimizers"),
            ValueError,
        ),
        Case(
            "cache-budget-neither-fraction-nor-bytes",
            "construction",
            lambda: FrozenPrefixCache(max_bytes=1.5),
            ("max_bytes=1.5", "fraction", "'2GB'"),
            ValueError,
        ),
    ]
