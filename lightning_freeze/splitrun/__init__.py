"""SplitRun: deterministic splits (holdout, k-fold, stratified, grouped, repeated, nested, time-ordered, A/B
arms), DDP shard samplers, a resumable train loader, the SplitRunDataModule, and sweep aggregation
(``lightning-freeze-report <sweep_dir>``) that ends in a decision: out-of-fold predictions
(:class:`PredictionRecorder`, :func:`oof_predictions`), fold ensembles (:func:`fold_ensemble`), nested CV and the
best condition.

Names are imported on first use: the splitters and the statistics need neither torch nor Lightning, and
``from lightning_freeze.splitrun import KFold`` imports in milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_freeze._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_freeze.callbacks.resume import (
        ExactResume as ExactResume,
    )
    from lightning_freeze.splitrun.datamodule import (
        MANIFEST_NAME as MANIFEST_NAME,
    )
    from lightning_freeze.splitrun.datamodule import (
        SplitManifestMismatch as SplitManifestMismatch,
    )
    from lightning_freeze.splitrun.datamodule import (
        SplitRunDataModule as SplitRunDataModule,
    )
    from lightning_freeze.splitrun.ensemble import (
        EnsembleError as EnsembleError,
    )
    from lightning_freeze.splitrun.ensemble import (
        FoldEnsemble as FoldEnsemble,
    )
    from lightning_freeze.splitrun.ensemble import (
        checkpoint_ensemble as checkpoint_ensemble,
    )
    from lightning_freeze.splitrun.ensemble import (
        fold_ensemble as fold_ensemble,
    )
    from lightning_freeze.splitrun.oof import (
        IncompleteOOFError as IncompleteOOFError,
    )
    from lightning_freeze.splitrun.oof import (
        OOFPredictions as OOFPredictions,
    )
    from lightning_freeze.splitrun.oof import (
        oof_predictions as oof_predictions,
    )
    from lightning_freeze.splitrun.predictions import (
        PredictionRecorder as PredictionRecorder,
    )
    from lightning_freeze.splitrun.sampling import (
        EvalShardSampler as EvalShardSampler,
    )
    from lightning_freeze.splitrun.sampling import (
        ResumableDataLoader as ResumableDataLoader,
    )
    from lightning_freeze.splitrun.sampling import (
        ShardSampler as ShardSampler,
    )
    from lightning_freeze.splitrun.sampling import (
        TrainShardSampler as TrainShardSampler,
    )
    from lightning_freeze.splitrun.splitters import (
        Arms as Arms,
    )
    from lightning_freeze.splitrun.splitters import (
        GroupKFold as GroupKFold,
    )
    from lightning_freeze.splitrun.splitters import (
        Holdout as Holdout,
    )
    from lightning_freeze.splitrun.splitters import (
        KFold as KFold,
    )
    from lightning_freeze.splitrun.splitters import (
        NestedKFold as NestedKFold,
    )
    from lightning_freeze.splitrun.splitters import (
        RepeatedKFold as RepeatedKFold,
    )
    from lightning_freeze.splitrun.splitters import (
        SplitParts as SplitParts,
    )
    from lightning_freeze.splitrun.splitters import (
        SplitSpecError as SplitSpecError,
    )
    from lightning_freeze.splitrun.splitters import (
        Splitter as Splitter,
    )
    from lightning_freeze.splitrun.splitters import (
        StratifiedGroupKFold as StratifiedGroupKFold,
    )
    from lightning_freeze.splitrun.splitters import (
        TimeSeriesSplit as TimeSeriesSplit,
    )


__all__, __getattr__, __dir__ = lazy_exports(globals())
