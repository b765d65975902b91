"""Third-party architectures for the tests: tiny, randomly initialised transformers models built from config
objects (no download), each wrapped in a plain LightningModule the way users write one (``self.model = ...``).

- vision (``ResNetForImageClassification``, ``ViTForImageClassification``, ``ConvNextForImageClassification``):
  ``(pixel_values, labels)`` tuple batches, ``forward(x)`` returns logits;
- text (``BertForSequenceClassification``): dict batches with ``input_ids``, ``attention_mask`` and ``labels``,
  ``forward(**inputs)``;
- ``GPT2LMHeadModel`` (tied input/output embeddings): dict batches, the LM loss from the model.

The data is generated and learnable (the label is a function of the input), so training makes progress.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

NUM_CLASSES = 3
IMAGE = 16
SEQ = 12
VOCAB = 64


def build_model(kind: str, dropout: float = 0.0, **overrides) -> nn.Module:
    """The tiny transformers model ``kind`` (resnet | vit | convnext | bert | gpt2), randomly initialised."""
    import transformers as tf

    if kind == "resnet":
        cfg = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic")
        return tf.ResNetForImageClassification(
            tf.ResNetConfig(num_labels=NUM_CLASSES, **{**cfg, **overrides})
        )
    if kind == "vit":
        cfg = dict(
            image_size=IMAGE,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        return tf.ViTForImageClassification(tf.ViTConfig(num_labels=NUM_CLASSES, **{**cfg, **overrides}))
    if kind == "convnext":
        cfg = dict(num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], num_stages=2)
        return tf.ConvNextForImageClassification(
            tf.ConvNextConfig(num_labels=NUM_CLASSES, **{**cfg, **overrides})
        )
    if kind == "bert":
        cfg = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=SEQ,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        return tf.BertForSequenceClassification(tf.BertConfig(num_labels=NUM_CLASSES, **{**cfg, **overrides}))
    if kind == "gpt2":
        cfg = dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=2,
            n_positions=SEQ,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        return tf.GPT2LMHeadModel(tf.GPT2Config(**{**cfg, **overrides}))
    raise ValueError(f"unknown model kind {kind!r}")


class ImageData(Dataset):
    """Random images whose class is the brightest colour channel (a learnable task)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
        self.y = self.x.mean(dim=(2, 3)).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class TextData(Dataset):
    """Random token sequences (with padding) whose class is which third of the vocabulary the first token is in."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
        self.mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = self.ids[:, 0] * NUM_CLASSES // VOCAB

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class LMData(TextData):
    """Token sequences for next-token prediction: the labels are the inputs (padding ignored)."""

    def __getitem__(self, i: int):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class VisionModule(pl.LightningModule):
    """A user's LightningModule around a transformers vision classifier: ``(x, y)`` batches."""

    def __init__(self, kind: str, lr: float = 1e-2, optimizer: str = "adamw", **model_kw) -> None:
        super().__init__()
        self.model = build_model(kind, **model_kw)
        self.lr, self.optimizer_name = lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


class TextModule(pl.LightningModule):
    """A user's LightningModule around a transformers text model: dict batches, ``forward(**inputs)``."""

    def __init__(self, kind: str = "bert", lr: float = 1e-2, optimizer: str = "adamw", **model_kw) -> None:
        super().__init__()
        self.model = build_model(kind, **model_kw)
        self.lr, self.optimizer_name = lr, optimizer

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(**batch).loss)

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


@dataclass(frozen=True)
class Fixture:
    """One third-party architecture: how to build its LightningModule and its data."""

    kind: str
    module: Callable[..., pl.LightningModule]
    data: Callable[[int, int], Dataset]

    def model(self, **kw) -> pl.LightningModule:
        return self.module(self.kind, **kw)

    def loader(self, n: int = 32, seed: int = 0, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.data(n, seed), batch_size=batch_size, shuffle=shuffle, generator=g)


FIXTURES = {
    "resnet": Fixture("resnet", VisionModule, ImageData),
    "vit": Fixture("vit", VisionModule, ImageData),
    "convnext": Fixture("convnext", VisionModule, ImageData),
    "bert": Fixture("bert", TextModule, TextData),
    "gpt2": Fixture("gpt2", TextModule, LMData),
}
