"""Plain-PyTorch training loops: the reference points every freezing contender is held against.

- :func:`plain_step_round`: nothing frozen; all parameters in one SGD optimizer.
- ``frozen=True``: the hand-written optimum.  The backbone runs under ``torch.no_grad()`` in eval mode
  (no graph, no saved activations, running statistics untouched), and the optimizer holds only the
  trainable parameters (no gradients, no momentum buffers for the frozen ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from benchmarks.harness import StepClock, median_step_time
from benchmarks.models import SplitNet


def make_optimizer(
    net: SplitNet, frozen: bool, lr: float = 0.05, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if frozen:
        net.backbone.requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = list(net.parameters())
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def train_step(
    net: SplitNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, frozen: bool
) -> None:
    if frozen:
        with torch.no_grad():
            f = net.backbone(x)
    else:
        f = net.backbone(x)
    loss = F.cross_entropy(net.head(net.trunk(f)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def prepare(net: SplitNet, frozen: bool) -> None:
    net.train()
    if frozen:
        net.backbone.eval()


def plain_step_round(net: SplitNet, batches: Sequence, *, frozen: bool, skip: int, device="cpu") -> float:
    """Train ``net`` one step per batch; return the median step time (s) after ``skip`` warm-up steps.

    A step is timed from one step start to the next, as in :class:`benchmarks.lit.StepTimer`.
    """
    net.to(device)
    prepare(net, frozen)
    opt = make_optimizer(net, frozen)
    clock = StepClock(device)
    for x, y in batches:
        clock.step()
        train_step(net, opt, x, y, frozen)
    clock.close()
    return median_step_time(clock.step_times(), skip)
