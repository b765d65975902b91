"""SplitRun: deterministic splits (holdout, k-fold, stratified, grouped, repeated, A/B arms), DDP shard
samplers, a resumable train loader, the SplitRunDataModule, and sweep aggregation
(``lightning-freeze-report <sweep_dir>``).

Names are imported on first use: the splitters and the statistics need neither torch nor Lightning, and
``from lightning_freeze.splitrun import KFold`` imports in milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_freeze._lazy import lazy_exports

_EXPORTS = {
    "MANIFEST_NAME": "lightning_freeze.splitrun.datamodule",
    "SplitManifestMismatch": "lightning_freeze.splitrun.datamodule",
    "SplitRunDataModule": "lightning_freeze.splitrun.datamodule",
    "EvalShardSampler": "lightning_freeze.splitrun.sampling",
    "ResumableDataLoader": "lightning_freeze.splitrun.sampling",
    "ShardSampler": "lightning_freeze.splitrun.sampling",
    "TrainShardSampler": "lightning_freeze.splitrun.sampling",
    "ExactResume": "lightning_freeze.callbacks.resume",
    "Arms": "lightning_freeze.splitrun.splitters",
    "GroupKFold": "lightning_freeze.splitrun.splitters",
    "Holdout": "lightning_freeze.splitrun.splitters",
    "KFold": "lightning_freeze.splitrun.splitters",
    "RepeatedKFold": "lightning_freeze.splitrun.splitters",
    "SplitParts": "lightning_freeze.splitrun.splitters",
    "SplitSpecError": "lightning_freeze.splitrun.splitters",
    "Splitter": "lightning_freeze.splitrun.splitters",
    "StratifiedGroupKFold": "lightning_freeze.splitrun.splitters",
}

__all__ = [
    "Arms",
    "EvalShardSampler",
    "ExactResume",
    "GroupKFold",
    "Holdout",
    "KFold",
    "MANIFEST_NAME",
    "RepeatedKFold",
    "ResumableDataLoader",
    "ShardSampler",
    "SplitManifestMismatch",
    "SplitParts",
    "SplitRunDataModule",
    "SplitSpecError",
    "Splitter",
    "StratifiedGroupKFold",
    "TrainShardSampler",
]

if TYPE_CHECKING:
    from lightning_freeze.callbacks.resume import ExactResume
    from lightning_freeze.splitrun.datamodule import MANIFEST_NAME, SplitManifestMismatch, SplitRunDataModule
    from lightning_freeze.splitrun.sampling import (
        EvalShardSampler,
        ResumableDataLoader,
        ShardSampler,
        TrainShardSampler,
    )
    from lightning_freeze.splitrun.splitters import (
        Arms,
        GroupKFold,
        Holdout,
        KFold,
        RepeatedKFold,
        SplitParts,
        SplitSpecError,
        Splitter,
        StratifiedGroupKFold,
    )


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
