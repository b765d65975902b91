"""Third-party architectures for the benchmarks: a transformers ResNet and BERT, randomly initialised from config
objects (no download), sized so that a training step takes at least ~50 ms on 2 CPU cores.

- :func:`build` makes the model and its in-memory batches (``(images, labels)`` or dicts with ``input_ids``,
  ``attention_mask`` and ``labels``);
- :func:`prefix_blocks` names the frozen prefix: the first ``auto`` blocks up to a share of the blocks;
- :class:`HFBenchModule` is the LightningModule a user would write around the model, with the prefix also
  registered as ``backbone`` (what Lightning's ``BackboneFinetuning`` freezes; our ``LayerFreeze("backbone")``
  and finetuning-scheduler's phase 0 select the same parameters);
- :func:`plain_round` is the plain-PyTorch loop: nothing frozen, or hand-frozen (the prefix's parameters with
  ``requires_grad=False`` in eval mode, so autograd records nothing for it, and an optimizer over the rest).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.harness import StepClock, median_step_time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass(frozen=True)
class HFSpec:
    kind: str  # resnet | bert
    batch: int
    size: int  # image side or sequence length
    width: int
    depth: int
    num_classes: int = 10
    vocab: int = 1000

    @classmethod
    def quick(cls, kind: str) -> HFSpec:
        return cls(kind, batch=8, size=32, width=16, depth=1) if kind == "resnet" else cls(kind, 8, 32, 64, 1)

    @classmethod
    def full(cls, kind: str) -> HFSpec:
        return (
            cls(kind, batch=16, size=56, width=32, depth=2) if kind == "resnet" else cls(kind, 16, 64, 128, 2)
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)


def build_model(spec: HFSpec, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if spec.kind == "resnet":
        widths = [spec.width * 2**i for i in range(4)]
        config = tf.ResNetConfig(
            num_channels=3,
            embedding_size=spec.width,
            hidden_sizes=widths,
            depths=[spec.depth] * 4,
            layer_type="basic",
            num_labels=spec.num_classes,
        )
        return tf.ResNetForImageClassification(config).train()
    config = tf.BertConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.width,
        num_hidden_layers=spec.depth * 2,
        num_attention_heads=4,
        intermediate_size=spec.width * 4,
        max_position_embeddings=spec.size,
        num_labels=spec.num_classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.BertForSequenceClassification(config).train()


def make_batches(spec: HFSpec, n: int, device="cpu", seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, spec.num_classes, (spec.batch,), generator=g).to(device)
        if spec.kind == "resnet":
            x = torch.randn(spec.batch, 3, spec.size, spec.size, generator=g).to(device)
            out.append((x, y))
        else:
            ids = torch.randint(1, spec.vocab, (spec.batch, spec.size), generator=g)
            lengths = torch.randint(spec.size // 2, spec.size + 1, (spec.batch,), generator=g)
            mask = (torch.arange(spec.size)[None, :] < lengths[:, None]).long()
            out.append({"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device), "labels": y})
    return out


def prefix_blocks(model: nn.Module, spec: HFSpec, share: float = 0.7) -> list[str]:
    """The first ``auto`` blocks (names in ``model``) making up about ``share`` of them, the head excluded."""
    from lightning_freeze.engine.layers import auto_layers

    example = make_batches(spec, 1)[0]
    example = example[0] if isinstance(example, tuple) else example
    blocks = [layer.name for layer in auto_layers(model, example)][:-1]
    return blocks[: max(1, round(share * len(blocks)))]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return F.cross_entropy(model(pixel_values=x).logits, y)


class HFBenchModule(L.LightningModule):
    """A user's LightningModule around a transformers model; ``backbone`` aliases the frozen-prefix blocks."""

    def __init__(
        self,
        model: nn.Module,
        prefix: Sequence[str],
        lr: float = 0.01,
        filter_trainable: bool = False,
        hand_frozen: bool = False,
    ) -> None:
        super().__init__()
        # Registered before the model, so the prefix's parameters are named backbone.* (finetuning-scheduler
        # selects parameters by name).
        self.backbone = nn.ModuleList([model.get_submodule(name) for name in prefix])
        self.model = model
        self.lr = lr
        self.filter_trainable = filter_trainable or hand_frozen
        self.hand_frozen = hand_frozen
        if hand_frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hand_frozen:
            self.backbone.eval()
        return self

    def training_step(self, batch, batch_idx):
        return loss_of(self.model, batch)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad or not self.filter_trainable]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


def plain_round(
    model: nn.Module, prefix: Sequence[str], batches: Sequence, *, frozen: bool, skip: int, device="cpu"
) -> float:
    """Train ``model`` one step per batch in plain PyTorch; the median step time (s) after ``skip`` steps."""
    model.to(device).train()
    if frozen:
        for name in prefix:
            block = model.get_submodule(name)
            block.requires_grad_(False)
            block.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    clock = StepClock(device)
    for batch in batches:
        clock.step()
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clock.close()
    return median_step_time(clock.step_times(), skip)
