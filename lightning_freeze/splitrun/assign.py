"""The assignment algorithms behind every splitter: which part each sample goes to. Pure numpy.

Stratified assignment is one stable radix sort: classes are laid end to end, and a balanced sequence of part
ids (``position % k`` for k-fold, a Bresenham pattern for ratios) is dealt along them, shuffled within each
class. Every part gets within one sample per class of its ideal share. Grouped assignment moves whole groups.

>>> import numpy as np
>>> folds = assign_folds(10, k=5, rng=np.random.default_rng(0))
>>> sorted(np.bincount(folds).tolist())
[2, 2, 2, 2, 2]

Nothing here imports torch or Lightning, or reads the rank, the clock or any global state: the same inputs
give the same parts in every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "assign_folds",
    "assign_parts",
    "codes_of",
    "part_hash",
    "stratified_kfold",
]

_SEGMENT_LOOP_MAX = 4096  # classes up to which within-class shuffles are one rng.shuffle per class


def part_hash(indices: np.ndarray) -> str:
    """sha256 of a part's sorted index list, as little-endian int64 (independent of platform and dtype)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def codes_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values, small-int code per sample). Small non-negative ints are used as their own codes."""
    if values.dtype.kind in "iub" and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi < 2**16:
            codes = values.astype(np.uint16, copy=False)
            present = np.flatnonzero(np.bincount(codes, minlength=hi + 1))
            if present.size == hi + 1:  # dense 0..hi: codes are already 0..C-1
                return present.astype(values.dtype), codes
            remap = np.zeros(hi + 1, dtype=np.uint16)
            remap[present] = np.arange(present.size, dtype=np.uint16)
            return present.astype(values.dtype), remap[codes]
    uniques, inverse = np.unique(values, return_inverse=True)
    dtype = np.uint16 if uniques.size < 2**16 else np.int64
    return uniques, inverse.reshape(-1).astype(dtype, copy=False)


def _deal(seq: np.ndarray, codes: np.ndarray | None, rng: np.random.Generator | None) -> np.ndarray:
    """Hand out the part-id sequence ``seq`` over the samples, class by class, in random order.

    Classes are laid end to end (code order, members in index order, via one stable radix sort). Each class
    takes the next contiguous run of ``seq``, shuffled within the class (not shuffled when ``rng`` is None).
    Shuffling a small-int run is much cheaper than permuting int64 indices, and gives the same distribution.
    """
    n = seq.size
    if codes is None:
        if rng is not None:
            rng.shuffle(seq)
        return seq
    counts = np.bincount(codes)
    if rng is None or counts.size <= _SEGMENT_LOOP_MAX:
        order = np.argsort(codes, kind="stable")
        if rng is not None:
            start = 0
            for c in counts.tolist():
                if c > 1:
                    rng.shuffle(seq[start : start + c])
                start += c
    else:  # many classes: one permutation, then classes made contiguous by a stable sort
        perm = rng.permutation(n)
        order = perm[np.argsort(codes[perm], kind="stable")]
    out = np.empty_like(seq)
    out[order] = seq
    return out


def _part_dtype(n_parts: int) -> type[np.integer]:
    return np.int8 if n_parts < 2**7 else np.int16 if n_parts < 2**15 else np.int64


def _sizes(n: int, weights: Sequence[float]) -> np.ndarray:
    """Split n into integer sizes proportional to weights (largest remainder; ties to the earlier part)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = n * w / w.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = n - int(sizes.sum())
    if short:
        order = np.argsort(-(exact - sizes), kind="stable")
        sizes[order[:short]] += 1
    return sizes


def _balanced_assign(n: int, sizes: np.ndarray) -> np.ndarray:
    """Part id per position such that part p gets exactly sizes[p] positions, spread evenly.

    Part p is dealt out of the positions still free with a Bresenham pattern, so any contiguous window of
    the free positions holds floor or ceil of its fair share of p: each class run gets its share +-1 per level.
    """
    out = np.empty(n, dtype=_part_dtype(len(sizes)))
    free = np.arange(n, dtype=np.int64)
    for p, s in enumerate(sizes[:-1]):
        m = free.size
        i = np.arange(m, dtype=np.int64)
        take = (((i + 1) * int(s)) // m - (i * int(s)) // m).astype(bool) if m else np.zeros(0, bool)
        out[free[take]] = p
        free = free[~take]
    out[free] = len(sizes) - 1
    return out


def _group_cut(gcodes: np.ndarray, weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Assign whole groups to parts: shuffle the groups, lay them end to end, cut at the weight boundaries."""
    sizes = np.bincount(gcodes).astype(np.float64)
    gperm = rng.permutation(sizes.size)
    s = sizes[gperm]
    mid = np.cumsum(s) - s / 2.0
    w = np.asarray(weights, dtype=np.float64)
    bounds = np.cumsum(w / w.sum())[:-1] * s.sum()
    gpart = np.empty(sizes.size, dtype=np.int64)
    gpart[gperm] = np.searchsorted(bounds, mid, side="right")
    return gpart[gcodes]


def _group_greedy(
    gcodes: np.ndarray, codes: np.ndarray, weights: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Stratified grouped assignment: each group, largest first, goes where its classes are most short."""
    n_groups = int(gcodes.max()) + 1
    n_classes = int(codes.max()) + 1
    gc = np.bincount(gcodes.astype(np.int64) * n_classes + codes, minlength=n_groups * n_classes).reshape(
        n_groups, n_classes
    )
    gsize = gc.sum(axis=1)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-gsize[order], kind="stable")]
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    target = np.outer(w, np.maximum(gc.sum(axis=0), 1)).astype(np.float64)  # parts x classes
    target_total = w * gsize.sum()
    filled = np.zeros_like(target)
    total = np.zeros(len(w))
    gpart = np.empty(n_groups, dtype=np.int64)
    for g in order:
        cnt = gc[g]
        cost = ((filled + cnt) / target) @ cnt + 1e-6 * (total + gsize[g]) / target_total
        p = int(np.argmin(cost))
        gpart[g] = p
        filled[p] += cnt
        total[p] += gsize[g]
    return gpart[gcodes]


def assign_parts(
    n: int,
    weights: Sequence[float],
    codes: np.ndarray | None,
    gcodes: np.ndarray | None,
    rng: np.random.Generator,
    *,
    cyclic: bool = False,
    shuffle: bool = True,
) -> np.ndarray:
    """Part id per sample for parts with the given weights; stratified when ``codes``, grouped when ``gcodes``.

    ``cyclic`` deals k equal parts round-robin (k-fold). ``shuffle=False`` keeps index order: contiguous
    blocks without codes (like scikit-learn's ``KFold(shuffle=False)``), round-robin within each class with
    them. Grouped assignment always shuffles the groups.
    """
    if gcodes is not None:
        if codes is not None:
            return _group_greedy(gcodes, codes, weights, rng)
        return _group_cut(gcodes, weights, rng)
    if not shuffle and codes is None:  # contiguous blocks, the first ones one longer
        return np.repeat(np.arange(len(weights), dtype=_part_dtype(len(weights))), _sizes(n, weights))
    if cyclic:  # k equal parts: deal round-robin
        k = len(weights)
        seq = np.tile(np.arange(k, dtype=_part_dtype(k)), -(-n // k))[:n].copy()
    else:
        seq = _balanced_assign(n, _sizes(n, weights))
    return _deal(seq, codes, rng if shuffle else None)


def assign_folds(
    n: int,
    k: int,
    rng: np.random.Generator,
    *,
    codes: np.ndarray | None = None,
    gcodes: np.ndarray | None = None,
    shuffle: bool = True,
) -> np.ndarray:
    """Fold id (0..k-1) of every sample: the vectorised core of every k-fold split.

    Plain: the round-robin sequence 0..k-1 shuffled over the samples. Stratified (``codes``): the same
    sequence dealt along the classes laid end to end and shuffled within each class, so each fold holds
    floor or ceil of n_c / k members of every class c. Grouped (``gcodes``): whole groups.
    """
    return assign_parts(n, [1.0] * k, codes, gcodes, rng, cyclic=True, shuffle=shuffle)


def stratified_kfold(labels: Any, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train_idx, val_idx)]`` for every fold, like ``sklearn.model_selection.StratifiedKFold.split``.

    The benchmark entry point: over 10 million labels it is a stable radix sort of small-int class codes, a
    shuffle of an int8 fold sequence within each class, and one radix sort of the fold ids; then the index
    lists are materialised as scikit-learn's are. The splitter objects validate; this does not.

    >>> labels = [0, 0, 1, 1]
    >>> [[labels[i] for i in val] for _, val in stratified_kfold(labels, k=2, seed=0)]  # one of each class
    [[0, 1], [0, 1]]
    """
    labels = np.asarray(labels)
    fold = assign_folds(labels.shape[0], k, np.random.default_rng(seed), codes=codes_of(labels)[1])
    order = np.argsort(fold, kind="stable")  # one radix sort: every fold's val indices, sorted
    bounds = np.cumsum(np.bincount(fold, minlength=k))[:-1]
    return [(np.flatnonzero(fold != f), val) for f, val in enumerate(np.split(order, bounds))]
