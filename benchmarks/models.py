"""Benchmark models and data: a ResNet-style CNN split into ``backbone`` (frozen prefix), ``trunk`` and ``head``.

The network is a flat sequence of blocks (a stem, then basic residual blocks with BatchNorm in three
stages that halve the resolution and double the width, so each block costs about the same).  Cutting
the sequence after ``k`` blocks gives a frozen prefix that is reachable as ``net.backbone`` (for
Lightning's ``BackboneFinetuning``) and as the layer spec ``"backbone"`` (for ``LayerFreeze``).

Example::

    spec = NetSpec.quick()
    blocks = make_blocks(spec, seed=0)
    k, share = pick_prefix(blocks, spec, target=0.7)      # share of forward FLOPs in the prefix
    net = SplitNet.from_blocks(blocks, k, spec.num_classes)
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class NetSpec:
    """Size of the benchmark network and its synthetic batches."""

    width: int = 32  # channels of the first stage (doubled per stage)
    blocks_per_stage: int = 6  # basic residual blocks per stage (3 stages)
    image: int = 32  # input resolution (square, 3 channels)
    batch: int = 64
    num_classes: int = 10

    @classmethod
    def quick(cls) -> NetSpec:
        return cls(width=16, blocks_per_stage=5, image=16, batch=16)  # a smoke run: a quarter of the pixels

    @classmethod
    def full(cls) -> NetSpec:
        return cls(width=16, blocks_per_stage=6, image=32, batch=32)

    def to_json(self) -> dict:
        return asdict(self)


class BasicBlock(nn.Module):
    """The ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_blocks(spec: NetSpec, seed: int = 0) -> list[nn.Module]:
    """The network as an ordered list of blocks: stem, then ``3 * blocks_per_stage`` residual blocks."""
    torch.manual_seed(seed)
    w = spec.width
    blocks: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
    ]
    c = w
    for stage in range(3):
        c_out = w * 2**stage
        for i in range(spec.blocks_per_stage):
            stride = 2 if (stage > 0 and i == 0) else 1
            blocks.append(BasicBlock(c, c_out, stride))
            c = c_out
    return blocks


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SplitNet(nn.Module):
    """``head(trunk(backbone(x)))``; ``backbone`` is the prefix that the freezing contenders freeze."""

    def __init__(self, backbone: nn.Module, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.trunk = trunk
        self.head = head

    @classmethod
    def from_blocks(cls, blocks: Sequence[nn.Module], k: int, num_classes: int) -> SplitNet:
        """A fresh (deep-copied) net whose backbone is ``blocks[:k]``."""
        blocks = [copy.deepcopy(b) for b in blocks]
        channels = _out_channels(blocks)
        net = cls(nn.Sequential(*blocks[:k]), nn.Sequential(*blocks[k:]), Head(channels, num_classes))
        return net.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.backbone(x)))


def _out_channels(blocks: Sequence[nn.Module]) -> int:
    convs = [m for b in blocks for m in b.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def make_batches(
    spec: NetSpec, n: int, device="cpu", seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` synthetic (images, labels) batches, generated once and kept in memory on ``device``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(spec.batch, 3, spec.image, spec.image, generator=g)
        y = torch.randint(0, spec.num_classes, (spec.batch,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


# --------------------------------------------------------------------------------------------------
# Measuring the frozen prefix's share of forward compute
# --------------------------------------------------------------------------------------------------


def block_flops(blocks: Sequence[nn.Module], spec: NetSpec) -> list[float]:
    """Forward FLOPs of each block for one batch (counted by ``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(spec.batch, 3, spec.image, spec.image)
    flops = []
    with torch.no_grad():
        for b in blocks:
            b.eval()
            with FlopCounterMode(display=False) as counter:
                y = b(x)
            flops.append(float(counter.get_total_flops()))
            x = y
    for b in blocks:
        b.train()
    return flops


def pick_prefix(blocks: Sequence[nn.Module], spec: NetSpec, target: float) -> tuple[int, float]:
    """The prefix length ``k`` whose forward-FLOPs share is closest to ``target``, and that share.

    The share counts the blocks plus the head; the head is a pooling and one linear layer, so it is tiny.
    """
    flops = block_flops(blocks, spec)
    total = sum(flops)
    best_k, best_share = 1, flops[0] / total
    acc = 0.0
    for k in range(1, len(blocks)):
        acc += flops[k - 1]
        if abs(acc / total - target) < abs(best_share - target):
            best_k, best_share = k, acc / total
    return best_k, best_share


def measured_time_share(net: SplitNet, batch: torch.Tensor, reps: int = 5, device="cpu") -> float:
    """Wall-clock share of the backbone in a no-grad forward pass (median of ``reps`` paired timings)."""
    from benchmarks.harness import now

    net = net.to(device).eval()
    shares = []
    with torch.no_grad():
        net(batch)  # warm-up
        for _ in range(reps):
            t0 = now(device)
            f = net.backbone(batch)
            t1 = now(device)
            net.head(net.trunk(f))
            t2 = now(device)
            shares.append((t1 - t0) / (t2 - t0))
    return statistics.median(shares)
