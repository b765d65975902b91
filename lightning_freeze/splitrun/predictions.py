"""PredictionRecorder: a callback that writes each validation (and test) pass's per-sample outputs with their
dataset indices, the raw material of out-of-fold (OOF) predictions and fold ensembles.

At the end of every validation pass (sanity checks excepted) and every test pass, rank 0 writes
``predictions.<stage>.npz`` in the run dir with the arrays

- ``index``: dataset indices, sorted (one row per sample of the part, each exactly once across DDP ranks);
- ``target``: the batch's targets, when the batch has them;
- ``output``: the model's per-sample output (logits, probabilities or values, as ``kind`` says);
- ``kind`` (``logits``/``probs``/``values``), ``part_sha256`` (the hash of ``index``, as in the split manifest),
  ``epoch``, ``global_step``.

Each pass overwrites the file, so after a run it holds the last pass: in the app, the final ``validate`` and
``test`` of the trained model. Where the output comes from, in order: what ``validation_step``/``test_step``
returns (a tensor with one row per sample, or a mapping with ``output``, ``preds``, ``probs`` or ``logits``),
else the LightningModule's own ``forward`` output in that step (``self(x)``; a ``logits`` field of a model
output is used), else the output of the last parameter-owning child it called (a wrapped
``self.model(**batch)``). Dataset indices come from the batch with ``SplitRunDataModule(return_indices=True)``,
else from the evaluation sampler's order (SplitRun's samplers, or any sequential sampler). Ranks' rows are gathered with
``all_gather_object``; SplitRun's evaluation shards hold every sample once, and a duplicate index is an error.

    trainer = Trainer(callbacks=[PredictionRecorder()])   # then: lightning_freeze.splitrun.oof_predictions(sweep)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import RandomSampler
from typing_extensions import override

from lightning_freeze.splitrun.prediction_files import predictions_path, write_predictions
from lightning_freeze.validation import check_bool, check_choice

__all__ = ["OutputKind", "PredictionRecorder", "batch_targets", "output_tensor"]

OutputKind = Literal["auto", "logits", "probs", "values"]
_STAGES = ("val", "test")
_OUTPUT_KEYS = ("output", "preds", "probs", "logits")
_TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def _as_numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach()
    if value.is_floating_point() and value.dtype != torch.float64:
        value = value.float()  # bf16/fp16 outputs as float32
    return value.cpu().numpy()


def output_tensor(value: Any) -> torch.Tensor | None:
    """A per-sample output tensor from a step's return value or a forward output, or None.

    Args:
        value: a tensor, a mapping with ``output``/``preds``/``probs``/``logits``, or a model output with
            ``.logits`` (transformers).
    """
    if isinstance(value, torch.Tensor):
        return value if value.ndim >= 1 else None
    if isinstance(value, Mapping):
        for key in _OUTPUT_KEYS:
            if isinstance(value.get(key), torch.Tensor):
                return value[key]
        return None
    logits = getattr(value, "logits", None)  # a transformers ModelOutput
    return logits if isinstance(logits, torch.Tensor) else None


def batch_targets(batch: Any) -> torch.Tensor | None:
    """The batch's targets: its second field, or a ``labels``/``label``/``targets``/``target``/``y`` entry.

    Args:
        batch: a tuple/list batch or a dict batch.
    """
    if isinstance(batch, Mapping):
        candidates = [batch.get(key) for key in _TARGET_KEYS]
    elif isinstance(batch, Sequence) and len(batch) >= 2:
        candidates = [batch[1]]
    else:
        candidates = []
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return value
    return None


class PredictionRecorder(Callback):
    """Write every validation/test pass's per-sample outputs, targets and dataset indices to the run dir.

    The sweep report merges the jobs' ``predictions.val.npz`` into out-of-fold predictions and averages the
    folds' ``predictions.test.npz`` into a fold ensemble (see :func:`lightning_freeze.splitrun.oof_predictions`).

    Args:
        stages: which passes to record: ``"val"``, ``"test"`` or both.
        kind: what the output is: ``"logits"``, ``"probs"`` (class probabilities), ``"values"`` (regression),
            or ``"auto"``: probabilities when every row of a 2-d output is non-negative and sums to 1, logits for
            other 2-d outputs, values for 1-d outputs.
        dirpath: where the files go (default: ``trainer.default_root_dir``, the job's dir in the app).
        during_fit: also record the validation passes inside ``fit`` (each overwrites the file); False records
            only ``trainer.validate()`` and ``trainer.test()``, as the app does (it validates after fit).

    >>> PredictionRecorder(stages=("val",)).stages
    ('val',)
    """

    def __init__(
        self,
        stages: Sequence[str] = _STAGES,
        kind: OutputKind = "auto",
        dirpath: str | os.PathLike[str] | None = None,
        during_fit: bool = True,
    ) -> None:
        if isinstance(stages, str):
            stages = (stages,)
        self.stages = tuple(
            check_choice(stage, "stages", _STAGES, where="PredictionRecorder") for stage in stages
        )
        self.kind = check_choice(
            kind, "kind", ("auto", "logits", "probs", "values"), where="PredictionRecorder"
        )
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.during_fit = check_bool(during_fit, "during_fit", where="PredictionRecorder")
        self._rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
        self._order: list[int] | None = None  # this rank's dataset indices in evaluation order
        self._taken = 0
        self._forward_output: Any = None  # the LightningModule's own forward output in this step
        self._child_output: Any = None  # else: the last per-sample output of a parameter-owning child
        self._hooks: list[Any] = []
        self._active = False

    # ------------------------------------------------------------------------------------------- Lightning hooks

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            "val" in self.stages
            and not trainer.sanity_checking
            and (self.during_fit or trainer.state.fn != TrainerFn.FITTING)
        ):
            self._start(trainer, pl_module, trainer.val_dataloaders)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._start(trainer, pl_module, trainer.test_dataloaders)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record(outputs, batch, dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record(outputs, batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, "val")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, "test")

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    # ------------------------------------------------------------------------------------------- recording

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Any) -> None:
        self._stop()
        self._rows, self._taken, self._forward_output, self._child_output = [], 0, None, None
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        sampler = getattr(loader, "sampler", None)
        # The evaluation order of this rank's samples; a random sampler has none (indices must then come from
        # the batch, via return_indices).
        self._order = None if sampler is None or isinstance(sampler, RandomSampler) else list(iter(sampler))
        self._hooks = [pl_module.register_forward_hook(self._keep_forward_output)]
        # A module that calls its wrapped model (self.model(**batch)) instead of self(x): that child's output.
        # Children without parameters (metrics, losses) are not models.
        self._hooks += [
            child.register_forward_hook(self._keep_child_output)
            for child in pl_module.children()
            if next(child.parameters(), None) is not None
        ]
        self._active = True

    def _keep_forward_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._forward_output = output

    def _keep_child_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if output_tensor(output) is not None:
            self._child_output = output

    def _stop(self) -> None:
        """Remove the forward hooks: nothing of ours stays on the model outside a recorded pass."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._active = False

    def _record(self, outputs: Any, batch: Any, dataloader_idx: int) -> None:
        if not self._active or dataloader_idx != 0:  # the first loader is the split's part
            return
        output = output_tensor(outputs)
        if output is None:
            output = output_tensor(self._forward_output)
        if output is None:
            output = output_tensor(self._child_output)
        self._forward_output = self._child_output = None
        if output is None:
            self._stop()
            raise RuntimeError(
                "PredictionRecorder: found no per-sample output in this step: return the outputs from "
                "validation_step/test_step (a tensor, or a dict with 'output', 'preds', 'probs' or 'logits'), or "
                "compute them with self(x) in the step"
            )
        rows = int(output.shape[0])
        target = batch_targets(batch)
        if target is not None and target.shape[0] != rows:
            self._stop()
            raise RuntimeError(
                f"PredictionRecorder: the step's output has {rows} rows but the batch holds {target.shape[0]} "
                "samples; return one output row per sample from validation_step/test_step"
            )
        indices = self._indices(batch, rows)
        self._rows.append((indices, None if target is None else _as_numpy(target), _as_numpy(output)))

    def _indices(self, batch: Any, rows: int) -> np.ndarray:
        """This batch's dataset indices: the next ``rows`` of the sampler's order, else the batch's last field."""
        if self._order is None:
            last = batch[-1] if isinstance(batch, Sequence) and len(batch) >= 2 else None
            if not (isinstance(last, torch.Tensor) and last.ndim == 1 and last.shape[0] == rows):
                self._stop()
                raise RuntimeError(
                    "PredictionRecorder: the evaluation loader's sampler has no fixed order, so the dataset "
                    "indices must come with the batch: use SplitRunDataModule(return_indices=True)"
                )
            return _as_numpy(last).astype(np.int64)
        taken = self._order[self._taken : self._taken + rows]
        if len(taken) != rows:
            self._stop()
            raise RuntimeError(
                f"PredictionRecorder: the loader yielded more samples than its sampler lists ({len(self._order)})"
            )
        self._taken += rows
        return np.asarray(taken, dtype=np.int64)

    def _finish(self, trainer: pl.Trainer, stage: str) -> None:
        self._stop()
        mine = _stack(self._rows)
        self._rows = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if trainer.is_global_zero:
            index, target, output = _merge([part for part in everyone if part is not None], stage)
            self._write(trainer, stage, index, target, output)

    def _write(
        self,
        trainer: pl.Trainer,
        stage: str,
        index: np.ndarray,
        target: np.ndarray | None,
        output: np.ndarray,
    ) -> None:
        write_predictions(
            predictions_path(self.dirpath or trainer.default_root_dir, stage),
            index=index,
            output=output,
            kind=self.kind if self.kind != "auto" else _infer_kind(output),
            stage=stage,
            target=target,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
        )


def _stack(
    rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
    if not rows:
        return None
    index = np.concatenate([r[0] for r in rows])
    targets = [r[1] for r in rows]
    target = None if any(t is None for t in targets) else np.concatenate(targets)  # type: ignore[arg-type]
    return index, target, np.concatenate([r[2] for r in rows])


def _merge(
    parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]], stage: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Every rank's rows in dataset-index order; a sample recorded twice is an error, never averaged."""
    if not parts:
        raise RuntimeError(f"PredictionRecorder: no {stage} batch was recorded on any rank")
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")
    index = index[order]
    repeated = index[1:][index[1:] == index[:-1]]
    if repeated.size:
        raise RuntimeError(
            f"PredictionRecorder: dataset indices {repeated[:5].tolist()} were evaluated more than once in the {stage} "
            "pass (a padding sampler such as DistributedSampler repeats samples); use SplitRunDataModule's loaders"
        )
    targets = [p[1] for p in parts]
    target = None if any(t is None for t in targets) else np.concatenate(targets)[order]  # type: ignore[arg-type]
    return index, target, np.concatenate([p[2] for p in parts])[order]


def _infer_kind(output: np.ndarray) -> str:
    if output.ndim == 2 and output.shape[1] >= 2:
        if np.all(output >= 0) and np.allclose(output.sum(axis=1), 1.0, atol=1e-4):
            return "probs"
        return "logits"
    return "values"
