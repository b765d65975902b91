"""The built-in demo task: transfer learning on scikit-learn's 8x8 digits (no download).

A small CNN (``backbone``: three conv blocks with BatchNorm and dropout; ``head``: dropout +
linear) is pretrained on digits 0-4, and the pretrained backbone is fine-tuned on digits 5-9
(labels remapped to 0-4). The pretrained weights are cached on disk, keyed by a hash of the
pretraining settings, so repeated runs and parallel multirun jobs pretrain only once.

Example::

    from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset
    dataset = DigitsDataset(classes=[5, 6, 7, 8, 9])   # map-style, has a ``labels`` array
    model = DigitsClassifier()                         # backbone pretrained on 0-4 (cached)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

__all__ = [
    "DigitsClassifier",
    "DigitsDataset",
    "example_loader",
    "example_trainer",
    "build_backbone",
    "build_head",
    "default_cache_dir",
    "pretrained_backbone_state",
]

# Bump when the pretraining code changes in a way that changes the weights it produces.
_PRETRAIN_VERSION = 1
_CACHE_ENV = "LIGHTNING_FREEZE_CACHE"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The built-in digits task needs scikit-learn: pip install 'lightning-freeze[examples]'"
        ) from err
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # [0, 16] -> [-1, 1]
    return images, bunch.target.astype(np.int64)


class DigitsDataset(Dataset):
    """Map-style dataset of the 8x8 digits whose label is in ``classes``.

    Labels are remapped to ``0..len(classes)-1`` in the order given. ``labels`` is a numpy array
    of the remapped labels (what stratified splitters need). Items are ``(image[1, 8, 8], label)``.

    Args:
        classes: the distinct digits (0-9) to keep, in the order their labels get.

    Raises:
        ValueError: ``classes`` is empty, repeats a digit or holds one outside 0-9.
    """

    def __init__(self, classes: Sequence[int] = (5, 6, 7, 8, 9)) -> None:
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
            raise ValueError(f"classes must be distinct digits in 0..9, got {classes}")
        images, targets = _load_digits()
        keep = np.isin(targets, classes)
        remap = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        self.images = torch.from_numpy(images[keep]).unsqueeze(1)  # (N, 1, 8, 8)
        self.labels = np.array([remap[int(t)] for t in targets[keep]], dtype=np.int64)
        self._targets = torch.from_numpy(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self._targets[index]


def example_loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    """The first images of digits 5-9, in order: a small real loader for examples and doctests.

    Args:
        n: how many images.
        batch_size: the loader's batch size.
    """
    return DataLoader(Subset(DigitsDataset(), range(n)), batch_size=batch_size)


def example_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that prints and writes nothing (no logger, checkpoints, progress bar or model summary).

    Args:
        **kwargs: further ``Trainer`` arguments (they win over the quiet ones).
    """
    quiet = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**quiet, **kwargs})


def _plain(value: Any) -> Any:
    """Mappings and sequences (a Hydra ``DictConfig``/``ListConfig`` too) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def build_backbone(channels: Sequence[int] = (32, 64, 64), dropout: float = 0.1) -> nn.Sequential:
    """Three (or ``len(channels)``) conv blocks: conv -> BatchNorm -> ReLU [-> maxpool] -> dropout.

    The first two blocks after the stem halve the resolution: 8x8 -> 4x4 -> 2x2.

    Args:
        channels: the output channels of each block.
        dropout: the dropout after each block.
    """
    blocks: list[nn.Module] = []
    in_ch = 1
    for i, out_ch in enumerate(channels):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        if 1 <= i <= 2:
            layers.append(nn.MaxPool2d(2))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        blocks.append(nn.Sequential(*layers))
        in_ch = out_ch
    return nn.Sequential(*blocks)


def _feature_size(channels: Sequence[int]) -> int:
    side = 8 // (2 ** min(max(len(channels) - 1, 0), 2))
    return channels[-1] * side * side


def build_head(channels: Sequence[int], num_classes: int, dropout: float = 0.25) -> nn.Sequential:
    """Flatten -> dropout -> linear classifier on the backbone's features.

    Args:
        channels: the backbone's channels (they fix its feature size).
        num_classes: the classifier's outputs.
        dropout: the dropout before the linear layer.
    """
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(_feature_size(channels), num_classes))


def default_cache_dir() -> Path:
    """``$LIGHTNING_FREEZE_CACHE`` if set, else ``./outputs/.cache`` (next to Hydra's outputs)."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env) if env else Path.cwd() / "outputs" / ".cache"


def _pretrain(
    channels: Sequence[int], dropout: float, settings: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Train backbone + a temporary head on ``settings["classes"]``; return the backbone state."""
    dataset = DigitsDataset(settings["classes"])
    x, y = dataset.images, dataset._targets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses from intra-op threads (badly so on busy CPUs)
    try:
        return _pretrain_loop(x, y, dataset.num_classes, channels, dropout, settings)
    finally:
        torch.set_num_threads(threads)


def _pretrain_loop(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    channels: Sequence[int],
    dropout: float,
    settings: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(settings["seed"]))
        backbone = build_backbone(channels, dropout)
        head = build_head(channels, num_classes)
        model = nn.Sequential(backbone, head)
        opt = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=1e-4)
        gen = torch.Generator().manual_seed(int(settings["seed"]))
        batch = int(settings["batch_size"])
        model.train()
        for _ in range(int(settings["epochs"])):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), batch):
                idx = order[start : start + batch]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def pretrained_backbone_state(
    channels: Sequence[int] = (32, 64, 64),
    dropout: float = 0.1,
    pretrain: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """Return ``(backbone_state_dict, cache_file, was_cached)``, pretraining once per settings.

    The cache file name carries a hash of everything that determines the weights. It is written
    to a temporary file and atomically renamed, so concurrent jobs racing on it are safe (each
    writes identical bytes; the last rename wins).

    Args:
        channels: the backbone's channels.
        dropout: the backbone's dropout.
        pretrain: pretraining settings over the defaults: ``classes`` ([0, 1, 2, 3, 4]), ``epochs`` (15),
            ``lr`` (3e-3), ``batch_size`` (64), ``seed`` (0).
        cache_dir: where the cache file goes (default: :func:`default_cache_dir`).
    """
    settings = {"classes": [0, 1, 2, 3, 4], "epochs": 15, "lr": 3e-3, "batch_size": 64, "seed": 0}
    settings.update(dict(pretrain or {}))
    settings["classes"] = [int(c) for c in settings["classes"]]
    key = {
        "version": _PRETRAIN_VERSION,
        "channels": [int(c) for c in channels],
        "dropout": float(dropout),
        "pretrain": settings,
        "torch": torch.__version__.split("+")[0],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"digits_pretrained_{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path, True
        except Exception:  # a corrupt/partial file from an older crash: rebuild it
            pass
    state = _pretrain(channels, dropout, settings)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return state, path, False


class DigitsClassifier(pl.LightningModule):
    """CNN for the digits task: ``backbone`` (conv blocks) + ``head`` (linear classifier).

    All parameters go to the optimizer unfiltered; freezing callbacks regroup them.

    Args:
        num_classes: the head's outputs.
        channels: the backbone's conv channels, one block each.
        dropout: the dropout after each backbone block.
        head_dropout: the dropout before the classifier.
        optimizer: a callable ``params -> Optimizer`` (e.g. a Hydra ``_partial_`` of ``torch.optim.AdamW``);
            default: ``AdamW(lr=3e-3, weight_decay=1e-4)``.
        scheduler: a callable ``optimizer -> LRScheduler``, or a Lightning scheduler dict whose
            ``"scheduler"`` entry is such a callable; default: none.
        pretrained: load the backbone pretrained on digits 0-4 (pretrained once, then cached).
        pretrain: pretraining settings over the defaults (see :func:`pretrained_backbone_state`).
        cache_dir: where the pretrained backbone is cached (default: :func:`default_cache_dir`).

    Example::

        from functools import partial
        model = DigitsClassifier(optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    """

    def __init__(
        self,
        num_classes: int = 5,
        channels: Sequence[int] = (32, 64, 64),
        dropout: float = 0.1,
        head_dropout: float = 0.25,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | Mapping[str, Any] | None = None,
        pretrained: bool = True,
        pretrain: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        pretrain = _plain(
            pretrain
        )  # hyperparameters as plain containers: checkpoints load with weights_only=True
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "cache_dir"])
        self.backbone = build_backbone(channels, dropout)
        self.head = build_head(channels, num_classes, head_dropout)
        self.pretrained_from: str | None = None
        self.pretrained_was_cached: bool | None = None
        if pretrained:
            state, path, cached = pretrained_backbone_state(channels, dropout, pretrain, cache_dir)
            self.backbone.load_state_dict(state)
            self.pretrained_from, self.pretrained_was_cached = str(path), cached
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self.example_input_array = torch.zeros(2, 1, 8, 8)
        metric = torchmetrics.classification.MulticlassAccuracy
        self.train_acc = metric(num_classes=num_classes)
        self.val_acc = metric(num_classes=num_classes)
        self.test_acc = metric(num_classes=num_classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: torchmetrics.Metric
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(y),
        )
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def training_step(self, batch, batch_idx):  # type: ignore[override]
        return self._step(batch, "train", self.train_acc)

    @override
    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "val", self.val_acc)

    @override
    def test_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "test", self.test_acc)

    @override
    def configure_optimizers(self):  # type: ignore[override]
        if self._optimizer_factory is None:
            optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-4)
        else:
            optimizer = self._optimizer_factory(self.parameters())
        if self._scheduler_factory is None:
            return optimizer
        if isinstance(self._scheduler_factory, Mapping):
            config = dict(self._scheduler_factory)
            config["scheduler"] = config["scheduler"](optimizer)
        else:
            config = {"scheduler": self._scheduler_factory(optimizer)}
        return {"optimizer": optimizer, "lr_scheduler": config}
