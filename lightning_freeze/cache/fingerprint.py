"""Exact per-sample input fingerprints: 128 bits per sample, computed where the tensor lives.

Two schemes, picked by device; both hash every bit of the sample, so equal bits give equal
fingerprints and ``-0.0``/``0.0`` or NaNs with different payloads count as different samples (the
conservative choice for a cache). The per-sample dtype and shape are not part of the 128 bits;
callers key on them separately (:func:`dtype_and_shape`).

- **CPU tensors**: SHA-256 or BLAKE2b (whichever this CPU hashes faster; SHA-256 where it has SHA
  instructions), truncated to 16 bytes, over each row's bytes (``hashlib``; 0.5 to 2 GB/s per core, no torch
  ops, no copies beyond making the batch contiguous). Both are cryptographic hashes: the
  chance that two different samples share a digest is about ``2**-128`` per pair, and about
  ``N * M * 2**-128`` that any of ``M`` lookups against ``N`` cached samples is served a wrong row
  (``3 * 10**-20`` for ``N = 10**7``, ``M = 10**12``).
- **CUDA (any non-CPU) tensors**: computed on the device, so only 16 bytes per sample cross to the
  host. Four independent lanes of a multilinear multiply-shift hash over the sample's 32-bit words
  (Dietzfelbinger; Lemire & Kaser, "Strongly universal string hashing is fast", 2014)::

      lane_l(x) = ((sum_i k_{l,i} * w_i(x)) mod 2**64) >> 32          k_{l,i} uniform random 64-bit keys

  For two different samples one lane collides with probability at most ``2**-31 + 2**-33`` over the
  keys (pick an index ``j`` where the words differ; ``d = w_j(x) - w_j(y) = 2**t * odd`` with
  ``|d| < 2**32``, so ``k_j * d mod 2**64`` is uniform over the ``2**(64 - t)`` multiples of ``2**t``,
  and the top 32 bits agree only when the whole difference falls in a window of ``2**33`` values).
  The lanes use independent keys: at most ``2**-120`` per pair of distinct samples. Samples longer
  than :data:`CHUNK_WORDS` words are hashed chunk by chunk and the chunk hashes hashed again, which
  adds ``2**-120`` per level. The keys come from ``os.urandom``, never from torch's global RNG (that
  would change the training run), so no data set can be chosen against them.

>>> images = torch.zeros(3, 1, 8, 8)
>>> images[1, 0, 7, 7] = 1.0                  # one bit pattern differs
>>> keys = Fingerprinter().rows(images)       # one 16-byte key per sample
>>> len(keys[0]), keys[0] == keys[2], keys[0] == keys[1]
(16, True, False)
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_freeze.engine.sharding import local_part

LANES = 4
CHUNK_WORDS = 1 << 15
_MASK32 = 0xFFFFFFFF


def dtype_and_shape(x: torch.Tensor) -> tuple[Any, ...]:
    """What a fingerprint does not cover: the per-sample shape and the dtype."""
    return (str(x.dtype), tuple(x.shape[1:]))


def as_words(x: torch.Tensor) -> torch.Tensor:
    """The bits of each row of ``x`` (batch first) as int64 values of 32-bit (or narrower) words.

    Signed words of at most 32 bits keep every difference of two words below ``2**32`` in magnitude,
    which is what the collision bound needs.
    """
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    rows = x.reshape(x.shape[0], -1).contiguous()
    size = rows.element_size()
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], 1, dtype=torch.int64, device=rows.device)
    if size % 4 == 0:
        words = rows.view(torch.int32)
    elif size == 2:
        words = rows.view(torch.int16)
    else:
        words = rows.view(torch.uint8) if rows.dtype != torch.int8 else rows
    return words.to(torch.int64)


@functools.cache
def _row_digest() -> Callable[[Any], Any]:
    """SHA-256 where the CPU hashes it faster than BLAKE2b (most x86 and ARM CPUs have SHA instructions: about
    twice as fast here), else BLAKE2b; both are cryptographic, truncated to 128 bits. Picked once per process."""
    sample = os.urandom(1 << 16)
    timings = {}
    for digest in (hashlib.sha256, hashlib.blake2b):
        start = time.perf_counter()
        for _ in range(8):
            digest(sample).digest()
        timings[digest] = time.perf_counter() - start
    return min(timings, key=timings.__getitem__)


class Fingerprinter:
    """128-bit fingerprints of the rows of a tensor; keys drawn once per instance from ``os.urandom``."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else int(seed)
        self._keys: dict[tuple[str, int], torch.Tensor] = {}

    def keys(self, n_words: int, device: torch.device) -> torch.Tensor:
        """``(LANES, n_words)`` int64 keys for rows of ``n_words`` words on ``device``."""
        slot = (str(device), n_words)
        found = self._keys.get(slot)
        if found is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, n_words]))
            raw = rng.integers(
                0, np.iinfo(np.uint64).max, size=(LANES, n_words), dtype=np.uint64, endpoint=True
            )
            found = torch.from_numpy(raw.view(np.int64)).to(device)
            self._keys[slot] = found
        return found

    def words(self, words: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` int64 words -> ``(B, 2)`` int64 fingerprints (4 lanes x 32 bits)."""
        while words.shape[1] > CHUNK_WORDS:
            b, n = words.shape
            pad = (-n) % CHUNK_WORDS
            if pad:
                words = torch.nn.functional.pad(words, (0, pad))
            chunks = words.reshape(b * ((n + pad) // CHUNK_WORDS), CHUNK_WORDS)
            lanes = self._lanes(chunks)  # (b * m, LANES), values in [0, 2**32)
            words = lanes.reshape(b, -1)
        lanes = self._lanes(words)
        return torch.stack([(lanes[:, 0] << 32) | lanes[:, 1], (lanes[:, 2] << 32) | lanes[:, 3]], dim=1)

    def _lanes(self, words: torch.Tensor) -> torch.Tensor:
        keys = self.keys(words.shape[1], words.device)
        # int64 products and sums wrap modulo 2**64 (two's complement); the tests check it.
        sums = torch.stack([(words * keys[lane]).sum(dim=1) for lane in range(LANES)], dim=1)
        return (sums >> 32) & _MASK32

    def device_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Multilinear fingerprints of each row of ``x`` on ``x.device``: ``(x.shape[0], 2)`` int64."""
        with torch.no_grad():
            return self.words(as_words(x))

    def rows(self, x: torch.Tensor, scheme: str | None = None) -> list[bytes]:
        """One 16-byte fingerprint per row (sample) of ``x``.

        ``scheme`` is ``"cpu"`` (BLAKE2b) or ``"device"`` (the multilinear hash); by default the one for the
        device ``x`` lives on. Both give the same value for the same bits wherever they are computed, so a
        CPU tensor can be keyed the way its copy on a GPU will be.
        """
        if x.shape[0] == 0:
            return []
        if (scheme or ("cpu" if x.device.type == "cpu" else "device")) == "device":
            packed = self.device_rows(x).cpu().numpy()
            return [bytes(row) for row in packed.view(np.uint8).reshape(packed.shape[0], 16)]
        data = x.detach()
        if data.is_complex() or data.dtype == torch.bool:
            data = torch.view_as_real(data) if data.is_complex() else data.view(torch.uint8)
        if not data.is_contiguous():
            data = data.contiguous()
        raw = (
            data.view(torch.uint8).numpy().reshape(data.shape[0], -1)
            if data.numel()
            else np.zeros((len(data), 0), np.uint8)
        )
        digest = _row_digest()
        return [digest(row).digest()[:16] for row in raw]

    def tensor(self, t: torch.Tensor) -> bytes:
        """A fingerprint of a whole tensor (e.g. a weight or a buffer), its dtype and shape included; of a sharded
        tensor (a DTensor under FSDP2), of the shard this process holds."""
        t = local_part(t.detach())
        form = repr(dtype_and_shape(t.detach().reshape(1, *t.shape))).encode()
        return hashlib.blake2b(self.rows(t.detach().reshape(1, -1))[0] + form, digest_size=16).digest()
