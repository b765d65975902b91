"""SplitRun: deterministic splits (holdout, k-fold, stratified, grouped, A/B arms), DDP shard samplers,
a resumable train loader, the SplitRunDataModule, and sweep aggregation (``python -m
lightning_freeze.splitrun.report <sweep_dir>``)."""

from lightning_freeze.splitrun.datamodule import MANIFEST_NAME, SplitManifestMismatch, SplitRunDataModule
from lightning_freeze.splitrun.sampling import (
    EvalShardSampler,
    ResumableDataLoader,
    ShardSampler,
    TrainShardSampler,
)
from lightning_freeze.splitrun.splits import (
    SplitPlan,
    SplitSpecError,
    arms_split,
    assign_folds,
    holdout_split,
    kfold_split,
    make_split,
    stratified_kfold,
)

__all__ = [
    "MANIFEST_NAME",
    "EvalShardSampler",
    "ResumableDataLoader",
    "ShardSampler",
    "SplitManifestMismatch",
    "SplitPlan",
    "SplitRunDataModule",
    "SplitSpecError",
    "TrainShardSampler",
    "arms_split",
    "assign_folds",
    "holdout_split",
    "kfold_split",
    "make_split",
    "stratified_kfold",
]
