"""SplitRunDataModule: a deterministic split of any map-style dataset, sharded across DDP ranks.

    dm = SplitRunDataModule(dataset=DigitsDataset(), split="kfold", k=5, fold=0, stratify=True,
                            labels="labels", seed=0, batch_size=64)
    trainer.fit(model, datamodule=dm)

- The split is computed once in ``setup`` from ``(len(dataset), labels, groups, spec, seed)``; every rank gets
  the same plan. Bad options raise :class:`SplitSpecError` there, before any training step.
- Train batches come from a :class:`ResumableDataLoader` (equal batch count per rank, mid-epoch resume);
  val/test batches evaluate every sample of the part exactly once across ranks. The samplers subclass
  ``DistributedSampler``, so Lightning never replaces them; ``use_distributed_sampler`` needs no change.
- ``split_manifest.json`` goes to ``manifest_dir`` (default: ``trainer.default_root_dir``, the job's output
  dir in the Hydra app). The manifest hashes also travel in checkpoints (``state_dict``): resuming a run
  whose data would now split differently is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from lightning_freeze.splitrun.sampling import EvalShardSampler, ResumableDataLoader, TrainShardSampler
from lightning_freeze.splitrun.splits import KINDS, SplitPlan, SplitSpecError, make_split

__all__ = ["MANIFEST_NAME", "SplitManifestMismatch", "SplitRunDataModule"]

MANIFEST_NAME = "split_manifest.json"
_AUTO_LABEL_FIELDS = ("targets", "labels", "y")


class SplitManifestMismatch(SplitSpecError):
    """The data would split differently from the run being resumed (or the manifest already in the run dir)."""


class _WithIndex(Dataset):
    """Appends the dataset index to every sample: ``(x, y) -> (x, y, index)``; ``x -> (x, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)


class SplitRunDataModule(pl.LightningDataModule):
    """Deterministic holdout / k-fold / A/B-arm splits of a map-style dataset, sharded for DDP.

    Args:
        dataset: a map-style dataset, a zero-argument factory, or a Hydra node with ``_target_``.
        split: ``holdout`` | ``kfold`` | ``arms``.
        k, fold: number of folds and the fold used for validation (``kfold``).
        stratify: keep class proportions in every part (needs labels).
        groups: group ids (array, callable ``dataset -> array``, or dataset field name); whole groups stay
            in one part.
        seed: the split seed (also the shuffle seed unless ``shuffle_seed`` is given).
        labels: like ``groups``; ``"auto"`` reads ``dataset.targets``, ``.labels`` or ``.y`` when present.
        ratios: holdout part ratios, e.g. ``{train: 0.8, val: 0.1, test: 0.1}``.
        test_ratio: a fixed test part carved before the folds (``kfold``) or arms (``arms``).
        arms, arm, by, column, val_ratio, shared_val: A/B arms (see :func:`~.splits.arms_split`); ``arm`` is
            the arm this run trains on.
        fixed_shards: under DDP, deal the training samples to ranks once and only shuffle within each
            rank's shard per epoch (a rank then sees the same samples every epoch: a FrozenPrefixCache per
            rank holds about 1/world_size of the data). Default: reshuffle across ranks every epoch.
        return_indices: append the dataset index to every sample (off by default; the batch format is
            otherwise the dataset's own).
        manifest_dir: where ``split_manifest.json`` goes (default ``trainer.default_root_dir``).
        check_manifest: refuse to run when a manifest already in ``manifest_dir`` records another split.
    """

    def __init__(
        self,
        dataset: Any = None,
        split: str = "kfold",
        k: int = 5,
        fold: int = 0,
        stratify: bool = True,
        groups: Any = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        *,
        labels: Any = "auto",
        ratios: Mapping[str, float] | list[float] | None = None,
        test_ratio: float = 0.0,
        arms: Mapping[str, Any] | None = None,
        arm: str | None = None,
        by: str | None = None,
        column: Any = None,
        val_ratio: float = 0.2,
        shared_val: bool = False,
        shuffle: bool = True,
        shuffle_seed: int | None = None,
        remainder: str = "drop",
        fixed_shards: bool = False,
        drop_last: bool = False,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        return_indices: bool = False,
        manifest_dir: str | os.PathLike[str] | None = None,
        check_manifest: bool = True,
    ) -> None:
        super().__init__()
        if split not in KINDS:
            raise SplitSpecError(f"unknown split {split!r}; set `split` to one of {list(KINDS)}")
        if split == "arms" and not arms:
            raise SplitSpecError("split=arms needs `arms` (arm name -> ratio, label list or predicate)")
        if remainder not in ("drop", "pad"):
            raise SplitSpecError(f"`remainder` must be 'drop' or 'pad', got {remainder!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SplitSpecError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        self._dataset_arg = dataset
        self.split = split
        self.k, self.fold, self.stratify, self.seed = k, fold, bool(stratify), seed
        self.groups, self.labels, self.column = groups, labels, column
        self.ratios, self.test_ratio = ratios, test_ratio
        self.arms, self.arm, self.by = arms, arm, by
        self.val_ratio, self.shared_val = val_ratio, shared_val
        self.batch_size, self.num_workers = batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle, self.remainder, self.drop_last = shuffle, remainder, drop_last
        self.fixed_shards = bool(fixed_shards)
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.pin_memory, self.persistent_workers, self.collate_fn = pin_memory, persistent_workers, collate_fn
        self.return_indices = return_indices
        self.manifest_dir = manifest_dir
        self.check_manifest = check_manifest
        self.dataset: Dataset | None = None
        self.plan: SplitPlan | None = None
        self._resumed_manifest: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- the split

    def _resolve_dataset(self) -> Dataset:
        ds = self._dataset_arg
        if ds is None:
            raise SplitSpecError("SplitRunDataModule needs `dataset` (a map-style dataset or a factory)")
        if isinstance(ds, Mapping) and "_target_" in ds:
            from hydra.utils import instantiate

            ds = instantiate(ds)
        elif callable(ds) and not hasattr(ds, "__getitem__"):
            ds = ds()
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise SplitSpecError(
                f"`dataset` must be map-style (__getitem__ and __len__), got {type(ds).__name__}"
            )
        return ds

    def _field(self, ds: Dataset, value: Any, option: str) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, str):
            if value == "auto" and option == "labels":
                for name in _AUTO_LABEL_FIELDS:
                    if hasattr(ds, name):
                        return np.asarray(getattr(ds, name))
                return None
            if not hasattr(ds, value):
                raise SplitSpecError(
                    f"`{option}={value!r}` names no attribute of {type(ds).__name__}; pass an array, a callable "
                    f"or an existing field name as `{option}`"
                )
            value = getattr(ds, value)
        if callable(value):
            value = value(ds)
        return np.asarray(value)

    def make_plan(self) -> SplitPlan:
        """Compute (once) and return the split plan; pure, so every rank and process gets the same one."""
        if self.plan is not None:
            return self.plan
        ds = self.dataset if self.dataset is not None else self._resolve_dataset()
        self.dataset = ds
        labels = self._field(ds, self.labels, "labels")
        if self.stratify and labels is None:
            raise SplitSpecError(
                f"stratify=true needs labels, and {type(ds).__name__} has none of the fields "
                f"{list(_AUTO_LABEL_FIELDS)}; set `labels` (array, callable or field name) or `stratify=false`"
            )
        groups = self._field(ds, self.groups, "groups")
        common: dict[str, Any] = {
            "labels": labels,
            "groups": groups,
            "seed": self.seed,
            "stratify": self.stratify,
        }
        if self.split == "kfold":
            plan = make_split(
                len(ds), "kfold", k=self.k, fold=self.fold, test_ratio=self.test_ratio, **common
            )
        elif self.split == "holdout":
            plan = make_split(len(ds), "holdout", ratios=self.ratios, **common)
        else:
            plan = make_split(
                len(ds),
                "arms",
                arms=dict(self.arms or {}),
                by=self.by,
                column=self._field(ds, self.column, "column"),
                val_ratio=self.val_ratio,
                shared_val=self.shared_val,
                test_ratio=self.test_ratio,
                **common,
            )
            names = sorted({p.split("/")[0] for p in plan.parts if "/" in p})
            if self.arm not in names:
                raise SplitSpecError(
                    f"`arm` must name the arm this run trains on, one of {names}; got {self.arm!r}"
                )
        for part in ("train", "val"):
            if self._part_name(part) not in plan.parts:
                raise SplitSpecError(
                    f"the split has no {part!r} part (parts: {sorted(plan.parts)}); add it to `ratios`"
                )
        self.plan = plan
        return plan

    def _part_name(self, part: str) -> str:
        if self.split == "arms" and not (part == "val" and self.shared_val) and part != "test":
            return f"{self.arm}/{part}"
        return part

    def part(self, name: str) -> np.ndarray:
        """Sorted dataset indices of ``train`` | ``val`` | ``test`` for this run (this arm, this fold)."""
        plan = self.make_plan()
        key = self._part_name(name)
        if key not in plan.parts:
            hint = "add a test entry to `ratios`" if self.split == "holdout" else "set `test_ratio` > 0"
            raise SplitSpecError(f"the split has no {name!r} part (parts: {sorted(plan.parts)}); {hint}")
        return plan.parts[key]

    @property
    def has_test(self) -> bool:
        return self._part_name("test") in self.make_plan().parts

    @property
    def manifest(self) -> dict[str, Any]:
        manifest = dict(self.make_plan().manifest)
        manifest["dataset"] = type(self.dataset).__name__
        if self.split == "arms":
            manifest["arm"] = self.arm
        return manifest

    # ------------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        self.make_plan()
        if self._resumed_manifest is not None:
            self._compare(self._resumed_manifest, "the checkpoint being resumed")
        directory = self._manifest_dir()
        if directory is None:
            return
        path = directory / MANIFEST_NAME
        if self.check_manifest and path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous is not None:
                self._compare(previous, str(path), file_check=True)
        if self._global_rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")
            os.replace(tmp, path)

    def _manifest_dir(self) -> Path | None:
        if self.manifest_dir is not None:
            return Path(self.manifest_dir)
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "default_root_dir", None):
            return Path(trainer.default_root_dir)
        return None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _global_rank(self) -> int:
        return self._world()[1]

    def _compare(self, previous: Mapping[str, Any], where: str, file_check: bool = False) -> None:
        old = {name: p.get("sha256") for name, p in previous.get("parts", {}).items()}
        new = self.plan.hashes if self.plan is not None else {}
        if old == new:
            return
        changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        fix = (
            "use a fresh output dir, restore the split options, or set `check_manifest=false`"
            if file_check
            else "restore the split options (split, k, fold, seed, ratios, labels, groups) and the dataset"
        )
        raise SplitManifestMismatch(
            f"the data would now split differently from {where}: parts {changed} differ "
            f"(then: spec={previous.get('spec')}, seed={previous.get('seed')}, n={previous.get('n')}; "
            f"now: spec={self.plan.spec if self.plan else None}, seed={self.seed}, "
            f"n={self.plan.n if self.plan else None}); {fix}"
        )

    def state_dict(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        return {"split_manifest": {k: v for k, v in self.manifest.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        manifest = state_dict.get("split_manifest")
        if manifest is None:
            return
        self._resumed_manifest = manifest
        if self.plan is not None:
            self._compare(manifest, "the checkpoint being resumed")

    # ------------------------------------------------------------------------------------------- loaders

    def _source(self) -> Dataset:
        assert self.dataset is not None
        return _WithIndex(self.dataset) if self.return_indices else self.dataset

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "collate_fn": self.collate_fn,
        }

    def train_dataloader(self) -> ResumableDataLoader:
        world, rank = self._world()
        sampler = TrainShardSampler(
            self.part("train"),
            num_replicas=world,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.shuffle_seed,
            remainder=self.remainder,
            fixed_shards=self.fixed_shards,
        )
        if len(sampler) == 0:
            raise SplitSpecError(
                f"the train part ({sampler.indices.size} samples) is smaller than the world size ({world})"
            )
        return ResumableDataLoader(
            self._source(),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, name: str) -> DataLoader:
        world, rank = self._world()
        indices = self.part(name)
        if indices.size < world:
            raise SplitSpecError(
                f"the {name} part has {indices.size} samples, fewer than the {world} ranks: some rank would "
                f"evaluate nothing; raise its ratio or use fewer devices"
            )
        sampler = EvalShardSampler(indices, num_replicas=world, rank=rank)
        return DataLoader(
            self._source(), batch_size=self.eval_batch_size, sampler=sampler, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
