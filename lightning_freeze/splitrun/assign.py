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
    "arm_membership",
    "assign_arms",
    "assign_folds",
    "assign_parts",
    "codes_of",
    "part_hash",
    "stratified_kfold",
    "time_series_bounds",
    "time_units",
]

_SEGMENT_LOOP_MAX = 4096  # classes up to which within-class shuffles are one rng.shuffle per class


def part_hash(indices: np.ndarray) -> str:
    """sha256 of a part's sorted index list, as little-endian int64 (independent of platform and dtype).

    Args:
        indices: the part's dataset indices, sorted.
    """
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def codes_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values, small-int code per sample). Small non-negative ints are used as their own codes.

    Args:
        values: one label (or group id) per sample, any sortable dtype.
    """
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

    Args:
        n: the number of samples.
        weights: one positive weight per part (normalised here).
        codes: a small-int class code per sample (stratified), or None.
        gcodes: a small-int group code per sample (whole groups move), or None.
        rng: the random stream of this assignment.
        cyclic: deal k equal parts round-robin (k-fold) instead of by exact ratio sizes.
        shuffle: False keeps index order: contiguous blocks without codes (like scikit-learn's
            ``KFold(shuffle=False)``), round-robin within each class with them. Grouped assignment always
            shuffles the groups.
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

    Args:
        n: the number of samples.
        k: the number of folds.
        rng: the random stream of the folds.
        codes: a small-int class code per sample (stratified), or None.
        gcodes: a small-int group code per sample (grouped), or None.
        shuffle: False gives contiguous folds in index order.
    """
    return assign_parts(n, [1.0] * k, codes, gcodes, rng, cyclic=True, shuffle=shuffle)


def stratified_kfold(labels: Any, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train_idx, val_idx)]`` for every fold, like ``sklearn.model_selection.StratifiedKFold.split``.

    The benchmark entry point: over 10 million labels it is a stable radix sort of small-int class codes, a
    shuffle of an int8 fold sequence within each class, and one radix sort of the fold ids; then the index
    lists are materialised as scikit-learn's are. The splitter objects validate; this does not.

    Args:
        labels: one class label per sample.
        k: the number of folds.
        seed: the seed of the folds' random stream.

    >>> labels = [0, 0, 1, 1]
    >>> [[labels[i] for i in val] for _, val in stratified_kfold(labels, k=2, seed=0)]  # one of each class
    [[0, 1], [0, 1]]
    """
    labels = np.asarray(labels)
    fold = assign_folds(labels.shape[0], k, np.random.default_rng(seed), codes=codes_of(labels)[1])
    order = np.argsort(fold, kind="stable")  # one radix sort: every fold's val indices, sorted
    bounds = np.cumsum(np.bincount(fold, minlength=k))[:-1]
    return [(np.flatnonzero(fold != f), val) for f, val in enumerate(np.split(order, bounds))]


def arm_membership(
    key: np.ndarray, selectors: Sequence[np.ndarray]
) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """Arm id per sample (-1: in no arm) from one boolean mask per arm, in arm order.

    Args:
        key: the per-sample values the arms select on (labels or a column); only its length is used here.
        selectors: one boolean mask per arm (a predicate's result, or ``np.isin`` of the arm's values).

    Returns:
        ``(member, clash)``: ``clash`` is ``(earlier arm, later arm, samples)`` for the first two arms that
        select the same samples, else None (the assignment is then valid).
    """
    member = np.full(key.shape[0], -1, dtype=np.int64)
    for arm, mask in enumerate(selectors):
        overlap = mask & (member >= 0)
        if overlap.any():
            return member, (int(member[np.flatnonzero(overlap)[0]]), arm, int(overlap.sum()))
        member[mask] = arm
    return member, None


def assign_arms(
    names: Sequence[str],
    n: int,
    member: np.ndarray | None,
    ratios: Sequence[float] | None,
    *,
    val_ratio: float,
    test_ratio: float,
    shared_val: bool,
    codes: np.ndarray | None,
    gcodes: np.ndarray | None,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The parts of an A/B split: a shared ``test`` (and ``val``) part first, then ``<arm>/train``, ``<arm>/val``.

    Args:
        names: the arm names, in order.
        n: the number of samples.
        member: arm id per sample (-1: in no arm) when arms select by value; None draws the arms at random
            by ``ratios`` from every sample.
        ratios: each arm's share of the samples when ``member`` is None.
        val_ratio: each arm's validation share (the shared validation part's share with ``shared_val``).
        test_ratio: the share of one ``test`` part carved first for every arm (0: none).
        shared_val: carve one ``val`` part that every arm validates on, instead of one per arm.
        codes: class codes for stratified sub-assignments (or None).
        gcodes: group codes: whole groups stay in one part (or None).
        rng: the random stream of the whole assignment (drawn from in a fixed order).
    """

    def sub_assign(idx: np.ndarray, weights: list[float]) -> np.ndarray:
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        sc = None if codes is None else codes_of(codes[idx])[1]
        sg = None if gcodes is None else codes_of(gcodes[idx])[1].astype(np.int64)
        return assign_parts(idx.size, weights, sc, sg, rng)

    pool = np.arange(n, dtype=np.int64) if member is None else np.flatnonzero(member >= 0)
    parts: dict[str, np.ndarray] = {}
    for name, ratio in (("test", test_ratio), ("val", val_ratio if shared_val else 0.0)):
        if ratio > 0:
            part = sub_assign(pool, [1.0 - ratio, ratio])
            parts[name] = pool[part == 1]
            pool = pool[part == 0]
    if member is None:
        assert ratios is not None
        member = np.full(n, -1, dtype=np.int64)
        member[pool] = sub_assign(pool, [float(r) for r in ratios])
    for arm, name in enumerate(names):
        idx = pool[member[pool] == arm]
        if shared_val:
            parts[f"{name}/train"] = idx
        else:
            part = sub_assign(idx, [1.0 - val_ratio, val_ratio])
            parts[f"{name}/train"] = idx[part == 0]
            parts[f"{name}/val"] = idx[part == 1]
    return parts


def time_units(
    n: int, time: np.ndarray | None, gcodes: np.ndarray | None
) -> tuple[np.ndarray, int, tuple[int, int] | None]:
    """Number the samples (or whole groups) 0..U-1 in time order: the units a time-ordered split cuts.

    Ties in ``time`` keep the dataset order. With groups, a group is one unit, placed by its earliest time;
    two groups whose time spans interleave (one has a sample later than the other's first and earlier than
    its last) cannot be ordered, and are returned as the clash.

    Args:
        n: the number of samples.
        time: one sortable time value per sample, or None for the dataset order.
        gcodes: a small-int group code per sample (groups are units), or None (samples are units).

    Returns:
        ``(unit per sample, number of units, clash)``: ``clash`` is ``(group code, group code)`` or None.
    """
    tcodes = (
        np.arange(n, dtype=np.int64) if time is None else np.unique(time, return_inverse=True)[1].reshape(-1)
    )
    if gcodes is None:
        unit = np.empty(n, dtype=np.int64)
        unit[np.argsort(tcodes, kind="stable")] = np.arange(n, dtype=np.int64)
        return unit, n, None
    n_groups = int(gcodes.max()) + 1
    first = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(n_groups, -1, dtype=np.int64)
    np.minimum.at(first, gcodes, tcodes)
    np.maximum.at(last, gcodes, tcodes)
    position = np.full(n_groups, n, dtype=np.int64)
    np.minimum.at(position, gcodes, np.arange(n, dtype=np.int64))  # ties between groups: dataset order
    order = np.lexsort((position, last, first))
    later = last[order[:-1]] > first[order[1:]]
    clash = None
    if later.any():
        i = int(np.flatnonzero(later)[0])
        clash = (int(order[i]), int(order[i + 1]))
    group_unit = np.empty(n_groups, dtype=np.int64)
    group_unit[order] = np.arange(n_groups, dtype=np.int64)
    return group_unit[gcodes], n_groups, clash


def time_series_bounds(
    units: int,
    k: int,
    fold: int,
    *,
    gap: int,
    test_units: int,
    val_units: int | None,
    max_train_units: int | None,
) -> dict[str, tuple[int, int]]:
    """Unit ranges ``[start, stop)`` of a walk-forward split: ``train`` always ends ``gap`` units before ``val``.

    The last ``test_units`` units are a fixed ``test`` part. Of the rest, the last ``k * val_units`` units are
    k consecutive validation blocks (default size: ``rest // (k + 1)``, like scikit-learn's
    ``TimeSeriesSplit``); fold f validates on block f and trains on everything up to ``gap`` units before it
    (an expanding window), or on the last ``max_train_units`` of those. The caller checks that train is not
    empty.

    Args:
        units: the number of time-ordered units.
        k: the number of folds.
        fold: this run's fold (0 is the earliest validation block).
        gap: units left out between the end of train and the start of val.
        test_units: units at the end kept as the fixed test part (0: none).
        val_units: the size of each validation block (None: ``rest // (k + 1)``).
        max_train_units: the most units of train (None: all before the gap).
    """
    rest = units - test_units
    size = rest // (k + 1) if val_units is None else val_units
    val_start = rest - (k - fold) * size
    train_stop = val_start - gap
    train_start = 0 if max_train_units is None else max(0, train_stop - max_train_units)
    bounds = {"train": (train_start, train_stop), "val": (val_start, val_start + size)}
    if test_units:
        bounds["test"] = (rest, units)
    return bounds
