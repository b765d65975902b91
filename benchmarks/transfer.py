"""Unsaturated transfer tasks on MNIST-1D: pretrain on digits 0-4, fine-tune on a few labelled 5-9 signals.

MNIST-1D (Greydanus 2020) is generated locally by the ``mnist1d`` package: 40-sample 1-D signals of the ten
digits, shifted, scaled, sheared and noised, hard enough that a model's accuracy says something about it.
Two backbones, each pretrained once on every signal of digits 0-4 (supervised, with a temporary 5-way head)
and cached on disk like the digits demo's backbone (:func:`lightning_freeze.tasks.digits.default_cache_dir`,
keyed by a hash of everything that determines the weights):

- ``resnet1d``: a 1-D ResNet: a conv stem and four basic residual blocks (64-64-128-128-256 channels, two of
  them halving the length), global average pooling;
- ``bert1d``: a 4-layer transformers BERT (hidden 64, 4 heads, random init) over the signal cut into ten
  patches of four samples, each patch linearly embedded as one token; the tokens' mean feeds the head.

Fine-tuning: the pretrained backbone and a fresh 5-way linear head on digits 5-9, with ``n_labelled`` signals
per class to train on (one fixed draw) and a large held-out set of 5-9 to validate on. Every module exposes
``backbone`` (what BackboneFinetuning thaws) and ``head``, and ``Transfer.blocks`` lists the freezable blocks in
forward order (the head last), so every contender freezes the same layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
_DATA_VERSION = 1
_PRETRAIN_VERSION = 2


def cache_dir() -> Path:
    """Where the generated data set and the pretrained backbones go (the digits demo's cache directory)."""
    from lightning_freeze.tasks.digits import default_cache_dir

    return default_cache_dir()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def mnist1d(num_samples: int = 30_000, seed: int = 42) -> dict[str, torch.Tensor]:
    """All generated signals (``x``: float32 [N, 40], ``y``: int64 [N]), cached after the first call (~15 s)."""
    path = cache_dir() / f"mnist1d_{_digest({'v': _DATA_VERSION, 'n': num_samples, 'seed': seed})}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a partial file from an older crash: rebuild it
            pass
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    raw = make_dataset(args)
    data = {
        "x": torch.as_tensor(np.concatenate([raw["x"], raw["x_test"]]), dtype=torch.float32),
        "y": torch.as_tensor(np.concatenate([raw["y"], raw["y_test"]]), dtype=torch.int64),
    }
    _atomic_save(data, path)
    return data


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


class ResBlock1d(nn.Module):
    """A basic residual block: two 3-tap convolutions with BatchNorm; a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.project = (
            nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.project(x))


def resnet1d_backbone(width: int = 64) -> nn.Sequential:
    """Stem + four residual blocks; input [B, 40] signals, output [B, 4 * width] features."""
    stem = nn.Sequential(
        nn.Unflatten(1, (1, -1)), nn.Conv1d(1, width, 5, 1, 2, bias=False), nn.BatchNorm1d(width), nn.ReLU()
    )
    return nn.Sequential(
        stem,
        ResBlock1d(width, width),
        ResBlock1d(width, 2 * width, stride=2),
        ResBlock1d(2 * width, 2 * width),
        ResBlock1d(2 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
    )


class PatchBert(nn.Module):
    """Signal patches as tokens through a transformers BERT encoder; output: the mean token ([B, hidden])."""

    def __init__(self, patch: int = 4, hidden: int = 64, layers: int = 4, length: int = 40) -> None:
        super().__init__()
        import transformers as tf

        self.patch_size = patch
        self.patch = nn.Linear(patch, hidden)
        config = tf.BertConfig(
            vocab_size=1,  # inputs arrive as embeddings; the word table is unused
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=4 * hidden,
            max_position_embeddings=length // patch,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = tf.BertModel(config, add_pooling_layer=False)
        self.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # never read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x.unflatten(1, (-1, self.patch_size)))
        return self.bert(inputs_embeds=tokens).last_hidden_state.mean(1)


BLOCKS = {
    "resnet1d": ["backbone.0", "backbone.1", "backbone.2", "backbone.3", "backbone.4", "head"],
    "bert1d": [
        "backbone.patch",
        "backbone.bert.embeddings",
        *(f"backbone.bert.encoder.layer.{i}" for i in range(4)),
        "head",
    ],
}
FEATURES = {"resnet1d": 256, "bert1d": 64}
PRETRAIN = {  # settings that determine the pretrained weights (part of the cache key)
    "resnet1d": {"epochs": 8, "lr": 3e-3, "batch_size": 128, "seed": 0},
    "bert1d": {"epochs": 12, "lr": 1e-3, "batch_size": 128, "seed": 0},
}
# Quick mode is a smoke test that must fit a few minutes on a fresh machine: fewer signals, shorter pretraining.
QUICK_SAMPLES = 6_000
PRETRAIN_QUICK = {
    "resnet1d": {"epochs": 2, "lr": 3e-3, "batch_size": 128, "seed": 0},
    "bert1d": {"epochs": 3, "lr": 1e-3, "batch_size": 128, "seed": 0},
}
FULL_SAMPLES = 30_000


def make_backbone(kind: str) -> nn.Module:
    if kind == "resnet1d":
        return resnet1d_backbone()
    if kind == "bert1d":
        return PatchBert()
    raise ValueError(f"unknown backbone {kind!r}; choose from {sorted(BLOCKS)}")


def pretrained_backbone(
    kind: str,
    data: dict[str, torch.Tensor],
    log: Callable[[str], None] | None = None,
    device="cpu",
    settings: dict[str, Any] | None = None,
):
    """The backbone ``kind`` pretrained on every signal of digits 0-4 (on ``device``); trained once, then read
    from the cache (weights pretrained on a GPU are cached apart from the CPU's, since they differ in rounding)."""
    settings = settings or PRETRAIN[kind]
    key = {"v": _PRETRAIN_VERSION, "kind": kind, "n": len(data["y"]), **settings, "torch": torch.__version__}
    if torch.device(device).type != "cpu":
        key["device"] = torch.device(device).type
    path = cache_dir() / f"mnist1d_{kind}_pretrained_{_digest(key)}.pt"
    backbone = make_backbone(kind)
    if path.is_file():
        try:
            backbone.load_state_dict(torch.load(path, weights_only=True))
            return backbone
        except Exception:  # rebuild a partial or stale file
            pass
    keep = torch.isin(data["y"], torch.tensor(PRETRAIN_CLASSES))
    x, y = data["x"][keep].to(device), data["y"][keep].to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        backbone = make_backbone(kind)
        model = nn.Sequential(backbone, nn.Linear(FEATURES[kind], len(PRETRAIN_CLASSES))).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=1e-2)
        batch, epochs = settings["batch_size"], settings["epochs"]
        total = epochs * (len(y) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=total)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(y)).to(device)
            for start in range(0, len(y) - batch + 1, batch):
                idx = order[start : start + batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if log:
                log(f"    pretraining {kind}: epoch {epoch + 1}/{epochs}, last loss {loss.item():.3f}")
    backbone = backbone.cpu()
    _atomic_save(backbone.state_dict(), path)
    return backbone


# --------------------------------------------------------------------------------------------------
# The fine-tuning task
# --------------------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One fine-tuning task: data, sizes, and a factory for a fresh LightningModule per fit."""

    kind: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    pretrained: dict[str, torch.Tensor]
    epochs: int
    batch_size: int
    lr: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kind

    @property
    def blocks(self) -> list[str]:
        return list(BLOCKS[self.kind])

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_y) // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def description(self) -> str:
        what = {
            "resnet1d": "1-D ResNet (stem + 4 residual blocks, 64-256 channels)",
            "bert1d": "4-layer BERT (hidden 64, 4 heads) over 10 patches of 4 samples",
        }[self.kind]
        return (
            f"{what} pretrained on MNIST-1D digits 0-4, fine-tuned on {len(self.train_y)} labelled signals of "
            f"5-9 ({len(self.train_y) // len(FINETUNE_CLASSES)} per class), validated on {len(self.val_y)}; batch "
            f"{self.batch_size}, {self.epochs} epochs = {self.total_steps} steps, AdamW(lr={self.lr}, wd=1e-2)."
        )

    def loader(self, seed: int):
        from torch.utils.data import DataLoader, TensorDataset

        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(self.train_x, self.train_y),
            batch_size=self.batch_size,
            shuffle=True,
            generator=g,
            drop_last=True,
        )

    def make_module(self, schedule: str = "cosine", filter_trainable: bool = False):
        """A fresh module (pretrained backbone, new head).

        Args:
            schedule: ``"cosine"``: a per-step cosine LR to 0 at the end (``LambdaLR``); ``"cosine, own
                groups"``: the same for the groups ``configure_optimizers`` made, while groups a callback adds
                later keep the LR that callback gives them (:class:`CosineOwnGroups`); ``"constant"``: none.
            filter_trainable: the optimizer gets only parameters with requires_grad (BackboneFinetuning's rule).
        """
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        return _module(self, schedule, filter_trainable)

    def accuracy(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat(
                [model(self.val_x[i : i + 1024]).argmax(1) for i in range(0, len(self.val_y), 1024)]
            )
        return float((pred == self.val_y).float().mean())


SCHEDULES = ("cosine", "cosine, own groups", "constant")


class CosineOwnGroups(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` for the param groups the optimizer had when the scheduler was built; a group added later
    keeps whatever LR the code that added it sets.

    Lightning's ``BackboneFinetuning`` adds the backbone's group at its thaw epoch and sets that group's LR at
    every epoch start (doubling it, capped at the head group's current LR). A plain ``LambdaLR`` has one lambda
    per original group and fails at its next step (``zip() argument 2 is shorter than argument 1``); this is
    the scheduler a user of that callback writes: the cosine for the groups it knows, the rest left alone.
    """

    @override
    def get_lr(self) -> list[float]:
        own = super().get_lr()  # one value per group known at construction
        return own + [group["lr"] for group in self.optimizer.param_groups[len(own) :]]


def _module(task: Transfer, schedule: str, filter_trainable: bool):
    import lightning.pytorch as pl

    from lightning_freeze.rules.freezeout import cosine_factor

    class FineTune(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = make_backbone(task.kind)
            self.backbone.load_state_dict(task.pretrained)
            self.head = nn.Linear(FEATURES[task.kind], len(FINETUNE_CLASSES))

        @override
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        @override
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        @override
        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad or not filter_trainable]
            opt = torch.optim.AdamW(params, lr=task.lr, weight_decay=1e-2)
            if schedule == "constant":
                return opt
            total = task.total_steps
            kind = CosineOwnGroups if schedule == "cosine, own groups" else torch.optim.lr_scheduler.LambdaLR
            sched = kind(opt, lambda step: cosine_factor(step / total, 1.0))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return FineTune()


SIZES = {  # (labelled signals per class, epochs, batch size) in quick and full mode
    "resnet1d": {"quick": (6, 4, 10), "full": (6, 30, 10)},
    "bert1d": {"quick": (80, 2, 32), "full": (80, 12, 32)},
}
LR = {"resnet1d": 2e-3, "bert1d": 1e-3}


def make_task(
    kind: str, quick: bool, log: Callable[[str], None] | None = None, n_val: int = 1000, device="cpu"
) -> Transfer:
    """The fine-tuning task ``kind`` (``resnet1d`` or ``bert1d``); pretraining happens here (on ``device``), once,
    if not cached."""
    data = mnist1d(QUICK_SAMPLES if quick else FULL_SAMPLES)
    pretrain = (PRETRAIN_QUICK if quick else PRETRAIN)[kind]
    backbone = pretrained_backbone(kind, data, log, device, pretrain)
    per_class, epochs, batch = SIZES[kind]["quick" if quick else "full"]
    rng = np.random.default_rng(0)  # one fixed labelled draw and validation set for every seed
    train_idx, val_idx = [], []
    labels = data["y"].numpy()
    per_class_val = n_val // len(FINETUNE_CLASSES)
    for new, digit in enumerate(FINETUNE_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        train_idx.append((idx[:per_class], new))
        val_idx.append((idx[per_class : per_class + per_class_val], new))

    def gather(parts):
        idx = np.concatenate([i for i, _ in parts])
        y = torch.cat([torch.full((len(i),), new, dtype=torch.int64) for i, new in parts])
        return data["x"][torch.as_tensor(idx)], y

    train_x, train_y = gather(train_idx)
    val_x, val_y = gather(val_idx)
    return Transfer(
        kind,
        train_x,
        train_y,
        val_x,
        val_y,
        {k: v.detach().clone() for k, v in backbone.state_dict().items()},
        epochs=epochs,
        batch_size=batch,
        lr=LR[kind],
        config={
            "pretrain": pretrain,
            "generated_signals": len(data["y"]),
            "pretrain_classes": list(PRETRAIN_CLASSES),
            "finetune_classes": list(FINETUNE_CLASSES),
            "labelled_per_class": per_class,
            "n_val": len(val_y),
            "epochs": epochs,
            "batch_size": batch,
            "lr": LR[kind],
        },
    )
