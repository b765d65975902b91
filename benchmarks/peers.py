"""The freezing contenders as callback factories, configured once for every comparison that uses them.

Each factory takes the :class:`benchmarks.lit.BenchModule` about to be fitted (whose prefix is
``backbone``) and returns the callbacks for its Trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keeps `import benchmarks.peers` free of Lightning (memory workers for plain PyTorch)
    from benchmarks.lit import BenchModule

NOTES = {
    "layer_freeze": 'LayerFreeze(layers="backbone", plot=False); optimizer gets self.parameters() unfiltered',
    "backbone_finetuning": "frozen phase (unfreeze_backbone_at_epoch=10000); optimizer filtered on requires_grad "
    "as its docs ask; its freeze keeps BatchNorm trainable (train_bn=True), so gradients "
    "still flow through the backbone",
    "finetuning_scheduler": "explicit schedule (phase 0 = trunk + head), epoch_transitions_only, restore_best=False; "
    "frozen BatchNorm stays in train mode, so running statistics keep changing",
}


def layer_freeze(module: BenchModule) -> list:
    from lightning_freeze import LayerFreeze

    return [LayerFreeze(layers="backbone", plot=False)]


def backbone_finetuning(module: BenchModule) -> list:
    from lightning.pytorch.callbacks import BackboneFinetuning

    return [BackboneFinetuning(unfreeze_backbone_at_epoch=10_000)]


def fts_schedule(module: BenchModule, max_transition_epoch: int = 10_000) -> dict:
    """An explicit finetuning-scheduler schedule: phase 0 trains trunk + head, phase 1 thaws the backbone.

    ``max_transition_epoch`` far beyond the measured steps keeps the run in phase 0.
    """
    names = [n for n, _ in module.named_parameters()]
    return {
        0: {
            "params": [n for n in names if not n.startswith("backbone.")],
            "max_transition_epoch": max_transition_epoch,
        },
        1: {
            "params": [n for n in names if n.startswith("backbone.")],
            "max_transition_epoch": max_transition_epoch + 1,
        },
    }


def finetuning_scheduler(module: BenchModule) -> list:
    from finetuning_scheduler import FinetuningScheduler

    return [
        FinetuningScheduler(
            ft_schedule=fts_schedule(module),
            epoch_transitions_only=True,
            restore_best=False,
            logging_level=40,
        )
    ]
