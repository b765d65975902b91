"""Whether the cached part of the network still computes what it computed when its rows were stored.

Checked before every served call, in microseconds: every parameter the cut skips or reads is frozen,
no such parameter or buffer changed, and every module in the cached part that may behave differently in
training keeps the mode it had when the rows were computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lightning_freeze.cache.fingerprint import Fingerprinter
from lightning_freeze.cache.modes import mode_sensitive


class Guard:
    """Watches the parameters and buffers of ``modules`` plus the ``extra`` tensors (read by the glue)."""

    def __init__(
        self,
        modules: Iterable[nn.Module],
        fingerprinter: Fingerprinter,
        extra: Iterable[torch.Tensor] = (),
        modes: Iterable[tuple[nn.Module, bool]] = (),
        lasting: Callable[[Iterable[torch.Tensor]], list[torch.Tensor]] = list,
    ) -> None:
        # ``lasting``: under FSDP2 the modules hold short-lived unsharded parameters during a forward; watch the
        # sharded ones they stand for (engine.sharding.lasting_params)
        tensors: dict[int, torch.Tensor] = {}
        # modules whose output may depend on their mode, each with the mode the rows were computed in
        self.modes = list(modes)
        for top in modules:
            for t in (*top.parameters(), *top.buffers()):
                tensors.setdefault(id(t), t)
            self.modes += [(m, m.training) for m in mode_sensitive(top)]
        for t in extra:
            tensors.setdefault(id(t), t)
        self.tensors = list({id(t): t for t in lasting(tensors.values())}.values())
        self.params = [t for t in self.tensors if isinstance(t, nn.Parameter)]
        self.fp = fingerprinter
        self.versions = [t._version for t in self.tensors]
        self.prints = [fingerprinter.tensor(t) for t in self.tensors]

    def problem(self) -> str | None:
        """What makes the stored rows invalid now, or None."""
        for p in self.params:
            if p.requires_grad:
                return "a parameter of the cached part requires grad (it was thawed, or it is tied to one that trains)"
        for m, training in self.modes:
            if m.training != training:
                return f"{type(m).__name__} in the cached part changed its mode, so its output can change"
        for i, t in enumerate(self.tensors):
            if t._version != self.versions[i]:
                # Version counters move on any in-place write, also one that writes the same values
                # (DDP broadcasting buffers from rank 0); only a change of content invalidates.
                if self.fp.tensor(t) != self.prints[i]:
                    return "a parameter or buffer of the cached part changed"
                self.versions[i] = t._version
        return None
