"""SplitRunDataModule: a deterministic split of any map-style dataset, sharded across DDP ranks.

- The split comes from a splitter object (:class:`~lightning_freeze.splitrun.KFold`, ``Holdout``, ``Arms``
  ...) applied to ``(len(dataset), labels, groups, seed)``; every rank gets the same parts. It is computed
  when the module is made (or, for a dataset factory, in ``setup``): bad options fail before any training.
- Train batches come from a :class:`ResumableDataLoader` (equal batch count per rank, mid-epoch resume);
  val/test batches evaluate every sample of the part exactly once across ranks. The samplers subclass
  ``DistributedSampler``, so Lightning never replaces them.
- ``split_manifest.json`` goes to ``manifest_dir`` (default: ``trainer.default_root_dir``, the job's output
  dir in the Hydra app). The manifest also travels in checkpoints (``state_dict``): resuming a run whose data
  would now split differently is an error.
- ``setup`` adds an :class:`~lightning_freeze.ExactResume` to the Trainer when none is there, so a
  resumed run continues with exactly the batches and random draws of an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_freeze.callbacks.resume import ensure_exact_resume
from lightning_freeze.splitrun.sampling import EvalShardSampler, ResumableDataLoader, TrainShardSampler
from lightning_freeze.splitrun.splitters import Holdout, SplitParts, SplitSpecError, Splitter
from lightning_freeze.validation import check_bool, check_choice, check_int

__all__ = ["MANIFEST_NAME", "SplitManifestMismatch", "SplitRunDataModule"]

MANIFEST_NAME = "split_manifest.json"
_AUTO_LABEL_FIELDS = ("targets", "labels", "y")
_WHERE = "SplitRunDataModule"
# DataLoader arguments the module sets itself; everything else may come through ``loader_options``.
_OWN_LOADER_ARGS = ("dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "num_workers")


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


def _is_map_style(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _check_values(value: Any, option: str) -> Any:
    """``labels``/``groups``: None, a field name, a callable ``dataset -> array`` or one value per sample."""
    if value is None or isinstance(value, str) or callable(value):
        return value
    if isinstance(value, (bool, int, float)) or not hasattr(value, "__len__"):
        raise SplitSpecError(
            f"{_WHERE}: {option} must be a dataset field name, a callable dataset -> array, or one value per "
            f"sample; got {value!r}"
        )
    return value


def _check_loader_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise SplitSpecError(
            f"{_WHERE}: loader_options must be a mapping of DataLoader arguments, got {options!r}"
        )
    allowed = [
        p for p in inspect.signature(DataLoader.__init__).parameters if p not in ("self", *_OWN_LOADER_ARGS)
    ]
    unknown = [str(k) for k in options if k not in allowed]
    if unknown:
        own = [k for k in unknown if k in _OWN_LOADER_ARGS]
        hint = f"{own} are SplitRunDataModule's own arguments; " if own else ""
        raise SplitSpecError(
            f"{_WHERE}: loader_options has {unknown}, which the loaders do not take; {hint}allowed: {allowed}"
        )
    return dict(options)


class SplitRunDataModule(pl.LightningDataModule):
    """A deterministic split of a map-style dataset (any splitter), sharded for DDP.

    Args:
        dataset: a map-style dataset, or a zero-argument factory that returns one (called in ``setup``).
        split: the splitter (:class:`~lightning_freeze.splitrun.Holdout` when ``None``). Per-sample inputs it
            names by field (``Arms(by="column", column=...)``, ``TimeSeriesSplit(time=...)``) are read from the
            dataset here.
        seed: the split seed: the parts are a pure function of (data, splitter, seed).
        batch_size: the batch size of every loader (``eval_batch_size`` for val/test if given).
        num_workers: DataLoader worker processes of every loader.
        labels: one label per sample: a dataset field name, a callable ``dataset -> array`` or an array;
            ``"auto"`` reads ``dataset.targets``, ``.labels`` or ``.y`` when present. Stratified splitters
            need them; otherwise they only fill the manifest's per-class counts.
        groups: one group id per sample, in the same forms (grouped splitters need them).
        shuffle_seed: the train shuffle seed (default: ``seed``).
        eval_batch_size: the batch size of the val/test loaders (default: ``batch_size``).
        remainder: ``"drop"`` the ``len(train) % world_size`` leftover samples each epoch, or ``"pad"``.
        fixed_shards: under DDP, deal the training samples to ranks once and only shuffle within each rank's
            shard per epoch (a per-rank FrozenPrefixCache then holds about 1/world_size of the data).
        return_indices: append the dataset index to every sample (``(x, y) -> (x, y, index)``).
        manifest_dir: where ``split_manifest.json`` goes (default ``trainer.default_root_dir``).
        check_manifest: refuse to run when a manifest already in ``manifest_dir`` records another split.
        loader_options: further ``DataLoader`` arguments (``pin_memory``, ``persistent_workers``,
            ``collate_fn``, ``drop_last`` ...).

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lightning_freeze.splitrun import KFold
    >>> data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    >>> dm = SplitRunDataModule(data, split=KFold(k=4, fold=1, stratify=True), labels=data.tensors[1], seed=0)
    >>> dm.part("train").size, dm.part("val").size
    (30, 10)
    >>> dm.manifest["spec"]["kind"], dm.manifest["parts"]["val"]["class_counts"]
    ('KFold', {'0': 5, '1': 5})
    """

    def __init__(
        self,
        dataset: Any,
        split: Splitter | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        *,
        labels: Any = "auto",
        groups: Any = None,
        shuffle_seed: int | None = None,
        eval_batch_size: int | None = None,
        remainder: str = "drop",
        fixed_shards: bool = False,
        return_indices: bool = False,
        manifest_dir: str | os.PathLike[str] | None = None,
        check_manifest: bool = True,
        loader_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dataset is None or not (_is_map_style(dataset) or callable(dataset)):
            raise SplitSpecError(
                f"{_WHERE}: dataset must be a map-style dataset (__getitem__ and __len__) or a zero-argument "
                f"factory of one, got {type(dataset).__name__}"
            )
        split = Holdout() if split is None else split
        if not isinstance(split, Splitter):
            raise SplitSpecError(
                f"{_WHERE}: split must be a splitter object (Holdout, KFold, GroupKFold, StratifiedGroupKFold, "
                f"RepeatedKFold, Arms from lightning_freeze.splitrun), e.g. split=KFold(k=5, fold=0); got {split!r}"
            )
        self.splitter = split  # the `split` argument: it makes this run's SplitParts
        checks = {"where": _WHERE, "error": SplitSpecError}
        self.seed = check_int(seed, "seed", minimum=0, **checks)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1, **checks)
        self.num_workers = check_int(num_workers, "num_workers", minimum=0, **checks)
        self.labels = _check_values(labels, "labels")
        self.groups = _check_values(groups, "groups")
        self.shuffle_seed = check_int(
            seed if shuffle_seed is None else shuffle_seed, "shuffle_seed", minimum=0, **checks
        )
        self.eval_batch_size = check_int(
            batch_size if eval_batch_size is None else eval_batch_size, "eval_batch_size", minimum=1, **checks
        )
        self.remainder = check_choice(remainder, "remainder", ("drop", "pad"), **checks)
        self.fixed_shards = check_bool(fixed_shards, "fixed_shards", **checks)
        self.return_indices = check_bool(return_indices, "return_indices", **checks)
        self.check_manifest = check_bool(check_manifest, "check_manifest", **checks)
        self.manifest_dir = manifest_dir
        self.loader_options = _check_loader_options(loader_options)
        self._dataset_arg = dataset
        self.dataset: Dataset | None = dataset if _is_map_style(dataset) else None
        self._split_parts: SplitParts | None = None
        self._resumed_manifest: dict[str, Any] | None = None
        if self.dataset is not None:  # a concrete dataset: split now, so bad options fail here
            self._compute_split()

    # ------------------------------------------------------------------------------------------- the split

    def _resolve_dataset(self) -> Dataset:
        if self.dataset is None:
            ds = self._dataset_arg()
            if not _is_map_style(ds):
                raise SplitSpecError(
                    f"{_WHERE}: the dataset factory returned {type(ds).__name__}, which is not map-style "
                    "(__getitem__ and __len__)"
                )
            self.dataset = ds
        return self.dataset

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
                    f"{_WHERE}: {option}={value!r} names no attribute of {type(ds).__name__}; pass an array, a "
                    f"callable or an existing field name as `{option}`"
                )
            value = getattr(ds, value)
        if callable(value):
            value = value(ds)
        return np.asarray(value)

    def _compute_split(self) -> SplitParts:
        ds = self._resolve_dataset()
        splitter = self.splitter
        # Missing labels or groups are reported by the splitter (the one check, for direct calls too).
        labels = self._field(ds, self.labels, "labels")
        groups = self._field(ds, self.groups, "groups") if splitter.needs_groups else None
        extra = {name: self._field(ds, spec, name) for name, spec in splitter.per_sample_inputs().items()}
        parts = splitter.split(len(ds), labels=labels, groups=groups, seed=self.seed, **extra)
        for role in ("train", "val"):
            if not parts.has(role):
                raise SplitSpecError(
                    f"{_WHERE}: the split has no {role!r} part (parts: {sorted(parts.parts)})"
                )
        self._split_parts = parts
        return parts

    @property
    def split_parts(self) -> SplitParts:
        """The split's parts (computed once; pure, so every rank and process gets the same)."""
        return self._split_parts if self._split_parts is not None else self._compute_split()

    def part(self, role: str) -> np.ndarray:
        """Sorted dataset indices this run uses as ``role`` (this arm, this fold).

        Args:
            role: ``train``, ``val`` or ``test``.
        """
        return self.split_parts.role(role)

    @property
    def has_test(self) -> bool:
        """Whether the split has a ``test`` part."""
        return self.split_parts.has("test")

    @property
    def manifest(self) -> dict[str, Any]:
        """The split manifest with this run's roles and the dataset's class name."""
        parts = self.split_parts
        return {**parts.manifest, "roles": dict(parts.roles), "dataset": type(self.dataset).__name__}

    # ------------------------------------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, stage: str | None = None) -> None:
        """Split (calling a dataset factory), check a resumed manifest, write ``split_manifest.json`` on rank 0."""
        if self.trainer is not None:
            ensure_exact_resume(self.trainer)
        self.split_parts  # noqa: B018 - a dataset factory is called and split here
        if self._resumed_manifest is not None:
            self._compare(self._resumed_manifest, "the checkpoint being resumed")
        directory = self._manifest_dir()
        if directory is None:
            return
        self.check_run_dir(directory)
        path = directory / MANIFEST_NAME
        if self._world()[1] == 0:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
            os.replace(tmp, path)

    def check_run_dir(self, directory: str | os.PathLike[str]) -> None:
        """Refuse ``directory`` if a manifest there records another split (what ``setup`` checks, earlier).

        Args:
            directory: the run dir that would receive ``split_manifest.json``.
        """
        path = Path(directory) / MANIFEST_NAME
        if self.check_manifest and path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return
            self._compare(previous, str(path), file_check=True)

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

    def _compare(self, previous: Mapping[str, Any], where: str, file_check: bool = False) -> None:
        parts = self.split_parts
        old = {name: p.get("sha256") for name, p in previous.get("parts", {}).items()}
        old_roles = previous.get("roles")  # which parts that run trained and validated on (an arm's, say)
        if old == parts.hashes and (old_roles is None or old_roles == parts.roles):
            return
        changed = sorted(
            name for name in set(old) | set(parts.hashes) if old.get(name) != parts.hashes.get(name)
        )
        what = (
            f"parts {changed} differ" if changed else f"it trained on {old_roles}, this run on {parts.roles}"
        )
        fix = (
            "use a fresh output dir, restore the split options, or set `check_manifest=false`"
            if file_check
            else "restore the split options (splitter, seed, labels, groups) and the dataset"
        )
        raise SplitManifestMismatch(
            f"the data would now split differently from {where}: {what} "
            f"(then: spec={previous.get('spec')}, seed={previous.get('seed')}, n={previous.get('n')}; "
            f"now: spec={parts.spec}, seed={parts.seed}, n={parts.n}); {fix}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The split manifest, saved in checkpoints so that a resume can check the data splits the same."""
        if self._split_parts is None:
            return {}
        return {"split_manifest": self.manifest}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's manifest; the split is compared with it (now, or once it is computed)."""
        manifest = state_dict.get("split_manifest")
        if manifest is None:
            return
        self._resumed_manifest = manifest
        if self._split_parts is not None:
            self._compare(manifest, "the checkpoint being resumed")

    # ------------------------------------------------------------------------------------------- loaders

    def _source(self) -> Dataset:
        assert self.dataset is not None
        return _WithIndex(self.dataset) if self.return_indices else self.dataset

    def _loader_kwargs(self) -> dict[str, Any]:
        options = dict(self.loader_options)
        if self.num_workers == 0:  # these only apply to worker processes; DataLoader refuses them otherwise
            options.pop("persistent_workers", None)
            options.pop("prefetch_factor", None)
        return {"num_workers": self.num_workers, **options}

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        """This rank's shard of ``train``: equal batch counts on every rank, resumable mid-epoch."""
        world, rank = self._world()
        sampler = TrainShardSampler(
            self.part("train"),
            num_replicas=world,
            rank=rank,
            seed=self.shuffle_seed,
            remainder=self.remainder,
            fixed_shards=self.fixed_shards,
        )
        if len(sampler) == 0:
            raise SplitSpecError(
                f"{_WHERE}: the train part ({sampler.indices.size} samples) is smaller than the world size ({world})"
            )
        return ResumableDataLoader(
            self._source(),
            batch_size=self.batch_size,
            sampler=sampler,
            seed=self.shuffle_seed,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, role: str) -> DataLoader:
        world, rank = self._world()
        indices = self.part(role)
        if indices.size < world:
            raise SplitSpecError(
                f"{_WHERE}: the {role} part has {indices.size} samples, fewer than the {world} ranks: some rank "
                "would evaluate nothing; raise its ratio or use fewer devices"
            )
        sampler = EvalShardSampler(indices, num_replicas=world, rank=rank)
        options = {
            k: v for k, v in self._loader_kwargs().items() if k != "drop_last"
        }  # evaluate every sample
        return DataLoader(self._source(), batch_size=self.eval_batch_size, sampler=sampler, **options)

    @override
    def val_dataloader(self) -> DataLoader:
        """This rank's share of ``val``: every sample evaluated exactly once across ranks."""
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """This rank's share of ``test``: every sample evaluated exactly once across ranks."""
        return self._eval_loader("test")
