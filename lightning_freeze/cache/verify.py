"""Compare stored rows with the same samples computed afresh: equal bits (:func:`bit_equal`), rounding, or a real
difference.

A stored row was computed in one batch and is served in another. The two agree bit for bit when the
kernels compute each sample independently of the rest of the batch; tiny batches or unusual kernels
can change the last bits, and a prefix that is not a pure function of its input changes more.

>>> a = torch.tensor([[1.0, 2.0]])
>>> compare([a], [a.clone()], rounding_differs=False) is None
True
>>> compare([a], [a + 1e-7], rounding_differs=False)[0], compare([a], [a + 1.0], rounding_differs=False)[0]
('rounding', 'different')
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def compare(
    stored: Sequence[torch.Tensor], fresh: Sequence[torch.Tensor], rounding_differs: bool
) -> tuple[str, str] | None:
    """None when every pair is bit-identical; else ``("rounding", message)`` for differences at the rounding
    level (``"different"`` instead when ``rounding_differs``), or ``("different", message)``."""
    for a, b in zip(stored, fresh, strict=True):
        if bit_equal(a, b):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return "different", (
                f"stored rows have {tuple(a.shape)}/{a.dtype}, a fresh computation {tuple(b.shape)}/{b.dtype}"
            )
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        if torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(1.0, scale)):
            message = (
                f"stored rows differ from the same samples computed in another batch by up to {diff:.3g} (rounding: "
                "the kernels here give the last bits differently for different batch compositions)"
            )
            return ("different" if rounding_differs else "rounding"), message
        return "different", (
            f"stored rows differ from the same samples computed in another batch by up to {diff:.3g}; the cached "
            "part is not a pure function of its input here"
        )
    return None


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaNs with equal payloads are equal; ``-0.0`` differs from ``0.0``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bool or a.numel() == 0:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
