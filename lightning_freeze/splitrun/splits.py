"""Deterministic dataset splits: holdout, k-fold and A/B arms, as pure numpy.

A split is a pure function of ``(n, labels, groups, spec, seed)``. It never looks at the rank, the world size,
the clock, the output directory or Hydra's runtime state, so every rank of every process computes the same
index lists. Nothing here imports torch or Lightning.

    >>> plan = make_split(10, "kfold", k=5, fold=0, seed=0)
    >>> sorted(plan.parts), [len(plan.parts[p]) for p in ("train", "val")]
    (['train', 'val'], [8, 2])

Stratified assignment is one stable radix sort: classes are laid end to end, and a balanced sequence of part
ids (``position % k`` for k-fold, a Bresenham pattern for ratios) is dealt along them, shuffled within each
class. Every part gets within one sample per class of its ideal share.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "SplitPlan",
    "SplitSpecError",
    "arms_split",
    "assign_folds",
    "holdout_split",
    "kfold_split",
    "make_split",
    "part_hash",
    "stratified_kfold",
]

KINDS = ("holdout", "kfold", "arms")
MANIFEST_VERSION = 1
_DEFAULT_RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


class SplitSpecError(ValueError):
    """A split that cannot be made as specified. The message names the option to change."""


@dataclass(frozen=True)
class SplitPlan:
    """The result of a split: named parts, each a sorted ``int64`` array of dataset indices.

    ``manifest`` is the JSON-ready record written to ``split_manifest.json``: spec, seed, part sizes,
    per-class counts per part, and the sha256 of each part's sorted index list.
    """

    parts: dict[str, np.ndarray]
    spec: dict[str, Any]
    seed: int
    n: int
    manifest: dict[str, Any] = field(repr=False, compare=False)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.parts:
            raise KeyError(f"split has no part {name!r}; it has {sorted(self.parts)}")
        return self.parts[name]

    @property
    def hashes(self) -> dict[str, str]:
        return {name: info["sha256"] for name, info in self.manifest["parts"].items()}


# ----------------------------------------------------------------------------------------------- helpers


def part_hash(indices: np.ndarray) -> str:
    """sha256 of a part's sorted index list, as little-endian int64 (independent of platform and dtype)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SplitSpecError(f"the dataset must have at least one sample, got n={n!r}")
    return int(n)


def _as_array(values: Any, n: int, option: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise SplitSpecError(
            f"`{option}` must be a 1-d array with one entry per sample ({n}), got shape {arr.shape}; "
            f"fix the `{option}` option"
        )
    return arr


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


_SEGMENT_LOOP_MAX = 4096  # classes up to which within-class shuffles are one rng.shuffle per class


def _deal(seq: np.ndarray, codes: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Hand out the part-id sequence ``seq`` over the samples, class by class, in random order.

    Classes are laid end to end (code order, members in index order, via one stable radix sort). Each class
    takes the next contiguous run of ``seq``, shuffled within the class. Shuffling a small-int run is much
    cheaper than permuting int64 indices, and gives the same distribution.
    """
    n = seq.size
    if codes is None:
        rng.shuffle(seq)
        return seq
    counts = np.bincount(codes)
    if counts.size <= _SEGMENT_LOOP_MAX:
        order = np.argsort(codes, kind="stable")
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


def _assign(
    n: int,
    weights: Sequence[float],
    codes: np.ndarray | None,
    gcodes: np.ndarray | None,
    rng: np.random.Generator,
    cyclic: bool = False,
) -> np.ndarray:
    """Part id per sample for parts with the given weights; stratified when codes, grouped when gcodes."""
    if gcodes is not None:
        if codes is not None:
            return _group_greedy(gcodes, codes, weights, rng)
        return _group_cut(gcodes, weights, rng)
    if cyclic:  # k equal parts: deal round-robin
        k = len(weights)
        seq = np.tile(np.arange(k, dtype=_part_dtype(k)), -(-n // k))[:n].copy()
    else:
        seq = _balanced_assign(n, _sizes(n, weights))
    return _deal(seq, codes, rng)


def _split_inputs(
    n: int, labels: Any, groups: Any, stratify: bool
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    labels = _as_array(labels, n, "labels")
    groups = _as_array(groups, n, "groups")
    if stratify and labels is None:
        raise SplitSpecError(
            "a stratified split needs labels: pass `labels` (an array, a callable, or a dataset field name) "
            "or set `stratify=false`"
        )
    codes = _codes(labels)[1] if (stratify and labels is not None) else None
    gcodes = _codes(groups)[1].astype(np.int64) if groups is not None else None
    return labels, codes, gcodes


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SplitSpecError(f"`seed` must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _normalize_ratios(ratios: Any, option: str = "ratios") -> dict[str, float]:
    if ratios is None:
        ratios = dict(_DEFAULT_RATIOS)
    if isinstance(ratios, Mapping):
        items = {str(k): v for k, v in ratios.items()}
    else:
        values = list(ratios)
        names = ["train", "val", "test"][: len(values)]
        if len(values) not in (2, 3):
            raise SplitSpecError(f"`{option}` as a list needs 2 (train, val) or 3 (train, val, test) entries")
        items = dict(zip(names, values, strict=True))
    try:
        out = {k: float(v) for k, v in items.items()}
    except (TypeError, ValueError) as err:
        raise SplitSpecError(f"`{option}` must map part names to numbers, got {items!r}") from err
    bad = {k: v for k, v in out.items() if not (v > 0 and math.isfinite(v))}
    if bad:
        raise SplitSpecError(
            f"every entry of `{option}` must be positive, got {bad}; drop the part or fix `{option}`"
        )
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise SplitSpecError(f"`{option}` must sum to 1, got {out} (sum {total:g}); fix `{option}`")
    if len(out) < 2:
        raise SplitSpecError(f"`{option}` needs at least two parts, got {out}")
    return out


def _build(
    parts: dict[str, np.ndarray],
    spec: dict[str, Any],
    seed: int,
    n: int,
    labels: np.ndarray | None,
    hint: str,
) -> SplitPlan:
    parts = {name: np.sort(np.asarray(idx, dtype=np.int64)) for name, idx in parts.items()}
    empty = [name for name, idx in parts.items() if idx.size == 0]
    if empty:
        raise SplitSpecError(f"split part(s) {empty} would be empty ({spec}); {hint}")
    info: dict[str, Any] = {}
    covered = 0
    for name, idx in parts.items():
        entry: dict[str, Any] = {"size": int(idx.size), "sha256": part_hash(idx)}
        if labels is not None:
            uniq, counts = np.unique(labels[idx], return_counts=True)
            entry["class_counts"] = {_key(u): int(c) for u, c in zip(uniq, counts, strict=True)}
        info[name] = entry
        covered += idx.size
    manifest = {
        "version": MANIFEST_VERSION,
        "spec": spec,
        "seed": int(seed),
        "n": int(n),
        "parts": info,
    }
    if covered < n:
        manifest["unassigned"] = int(n - covered)
    return SplitPlan(parts=parts, spec=spec, seed=int(seed), n=int(n), manifest=manifest)


def _key(value: Any) -> str:
    return str(value.item() if hasattr(value, "item") else value)


# ----------------------------------------------------------------------------------------------- k-fold


def assign_folds(
    n: int,
    k: int,
    seed: int = 0,
    *,
    labels: Any = None,
    groups: Any = None,
    stratify: bool = False,
) -> np.ndarray:
    """Fold id (0..k-1) of every sample; the vectorised core of every k-fold split.

    Plain: the round-robin sequence 0..k-1 shuffled over the samples. Stratified: the same sequence dealt
    along the classes laid end to end and shuffled within each class, so each fold holds floor or ceil of
    n_c / k members of every class c. Grouped: whole groups.
    """
    n = _check_n(n)
    _check_k(k, n)
    rng = _rng(seed)
    labels, codes, gcodes = _split_inputs(n, labels, groups, stratify)
    if codes is not None:
        counts = np.bincount(codes)
        small = np.flatnonzero((counts > 0) & (counts < k))
        if small.size:
            uniq = _codes(labels)[0]
            detail = ", ".join(f"{_key(uniq[c])}: {int(counts[c])}" for c in small[:5])
            raise SplitSpecError(
                f"stratified {k}-fold needs at least k={k} members per class, but some classes have fewer "
                f"({detail}); lower `k`, merge rare classes, or set `stratify=false`"
            )
    if gcodes is not None:
        n_groups = int(gcodes.max()) + 1
        if n_groups < k:
            raise SplitSpecError(f"group {k}-fold needs at least k groups, got {n_groups}; lower `k`")
    return _assign(n, [1.0] * k, codes, gcodes, rng, cyclic=True)


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise SplitSpecError(f"`k` must be an integer >= 2, got {k!r}")
    if k < 2:
        raise SplitSpecError(
            f"k-fold needs k >= 2 folds, got k={k}; set `k` to 2 or more (or use split=holdout)"
        )
    if k > n:
        raise SplitSpecError(f"k={k} folds is more than the {n} samples available; lower `k`")
    return int(k)


def stratified_kfold(labels: Any, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train_idx, val_idx)]`` for every fold, like ``sklearn.model_selection.StratifiedKFold.split``.

    The benchmark entry point: ``stratified_kfold(labels, k=5, seed=0)`` over 10 million labels is a stable
    radix sort of small-int class codes, a shuffle of an int8 fold sequence within each class, and one
    radix sort of the fold ids; then the index lists are materialised as sklearn's are.
    """
    labels = np.asarray(labels)
    fold = assign_folds(labels.shape[0], k, seed, labels=labels, stratify=True)
    order = np.argsort(fold, kind="stable")  # one radix sort: every fold's val indices, sorted
    bounds = np.cumsum(np.bincount(fold, minlength=k))[:-1]
    return [(np.flatnonzero(fold != f), val) for f, val in enumerate(np.split(order, bounds))]


def kfold_split(
    n: int,
    *,
    k: int = 5,
    fold: int = 0,
    labels: Any = None,
    groups: Any = None,
    stratify: bool = False,
    seed: int = 0,
    test_ratio: float = 0.0,
) -> SplitPlan:
    """Parts ``train`` and ``val`` (fold ``fold`` of ``k``), plus a fixed ``test`` part when ``test_ratio > 0``.

    The test part is carved first and is the same for every fold, so a k-fold sweep also reports a held-out
    test score. Folds of the same (n, labels, groups, k, seed) never overlap and cover the non-test samples.
    """
    n = _check_n(n)
    k = _check_k(k, n)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < k:
        raise SplitSpecError(f"`fold` must be an integer in [0, {k}) for k={k}, got {fold!r}; fix `fold`")
    test_ratio = float(test_ratio or 0.0)
    if not 0.0 <= test_ratio < 1.0:
        raise SplitSpecError(f"`test_ratio` must be in [0, 1), got {test_ratio}")
    labels_arr = _as_array(labels, n, "labels")
    groups_arr = _as_array(groups, n, "groups")
    spec = {
        "kind": "kfold",
        "k": k,
        "fold": int(fold),
        "stratify": bool(stratify),
        "grouped": groups_arr is not None,
        "test_ratio": test_ratio,
    }
    rest = np.arange(n, dtype=np.int64)
    parts: dict[str, np.ndarray] = {}
    rng_seed = seed
    if test_ratio > 0:
        _, codes, gcodes = _split_inputs(n, labels_arr, groups_arr, stratify)
        part = _assign(n, [1.0 - test_ratio, test_ratio], codes, gcodes, _rng(seed))
        parts["test"] = np.flatnonzero(part == 1)
        rest = np.flatnonzero(part == 0)
        rng_seed = seed + 1  # an independent stream for the folds; still a pure function of seed
        if rest.size < k:
            raise SplitSpecError(f"only {rest.size} samples remain after the test part, fewer than k={k}")
    sub = lambda a: None if a is None else a[rest]  # noqa: E731
    folds = assign_folds(
        rest.size, k, rng_seed, labels=sub(labels_arr), groups=sub(groups_arr), stratify=stratify
    )
    parts = {"train": rest[folds != fold], "val": rest[folds == fold], **parts}
    return _build(parts, spec, seed, n, labels_arr, "lower `k` or `test_ratio`, or check `groups`")


# ----------------------------------------------------------------------------------------------- holdout


def holdout_split(
    n: int,
    *,
    ratios: Mapping[str, float] | Sequence[float] | None = None,
    labels: Any = None,
    groups: Any = None,
    stratify: bool = False,
    seed: int = 0,
) -> SplitPlan:
    """Parts named by ``ratios`` (default train 0.8 / val 0.1 / test 0.1); stratified and/or grouped.

    Without groups, part sizes are exact (largest remainder of ``n * ratio``); stratified parts hold every
    class within about one sample of its share. With groups, whole groups go to one part.
    """
    n = _check_n(n)
    ratio_map = _normalize_ratios(ratios)
    labels_arr, codes, gcodes = _split_inputs(n, labels, groups, stratify)
    part = _assign(n, list(ratio_map.values()), codes, gcodes, _rng(seed))
    names = list(ratio_map)
    spec = {
        "kind": "holdout",
        "ratios": ratio_map,
        "stratify": bool(stratify),
        "grouped": gcodes is not None,
    }
    parts = {name: np.flatnonzero(part == p) for p, name in enumerate(names)}
    return _build(parts, spec, seed, n, labels_arr, "raise the small ratios in `ratios` or use more data")


# ----------------------------------------------------------------------------------------------- arms


def arms_split(
    n: int,
    *,
    arms: Mapping[str, Any],
    by: str | None = None,
    column: Any = None,
    labels: Any = None,
    groups: Any = None,
    stratify: bool = False,
    seed: int = 0,
    val_ratio: float = 0.2,
    shared_val: bool = False,
    test_ratio: float = 0.0,
) -> SplitPlan:
    """A/B arms: disjoint sub-populations, each with its own ``<arm>/train`` and ``<arm>/val`` parts.

    ``arms`` maps arm names to one of:

    - a ratio (``by="ratio"``): ``{"A": 0.5, "B": 0.5}`` splits the samples at random (stratified/grouped);
    - a list of label values (``by="label"``): ``{"A": [0, 1], "B": [2, 3]}``;
    - a list of values of ``column`` (``by="column"``), or a predicate ``column -> bool mask``.

    ``shared_val=True`` carves one ``val`` part first and the arms share it. ``test_ratio`` carves a shared
    ``test`` part the same way. Samples matched by no arm are left out (counted as ``unassigned``).
    """
    n = _check_n(n)
    if not isinstance(arms, Mapping) or len(arms) < 1:
        raise SplitSpecError(f"`arms` must map arm names to ratios, label lists or predicates, got {arms!r}")
    names = [str(a) for a in arms]
    if any("/" in a for a in names):
        raise SplitSpecError(f"arm names may not contain '/': {names}; rename them in `arms`")
    values = list(arms.values())
    if by is None:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            by = "ratio"
        elif column is not None:
            by = "column"
        else:
            by = "label"
    if by not in ("ratio", "label", "column"):
        raise SplitSpecError(f"`by` must be 'ratio', 'label' or 'column', got {by!r}")
    for option, r in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0.0 <= float(r) < 1.0:
            raise SplitSpecError(f"`{option}` must be in [0, 1), got {r}")
    if not val_ratio > 0:
        raise SplitSpecError("`val_ratio` must be > 0: every arm needs a validation part")
    labels_arr, codes, gcodes = _split_inputs(n, labels, groups, stratify)
    spec: dict[str, Any] = {
        "kind": "arms",
        "by": by,
        "arms": {},
        "stratify": bool(stratify),
        "grouped": gcodes is not None,
        "val_ratio": float(val_ratio),
        "shared_val": bool(shared_val),
        "test_ratio": float(test_ratio),
    }
    rng = _rng(seed)

    def sub_assign(idx: np.ndarray, weights: list[float]) -> np.ndarray:
        sc = None if codes is None else _codes(codes[idx])[1]
        sg = None if gcodes is None else _codes(gcodes[idx])[1].astype(np.int64)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        return _assign(idx.size, weights, sc, sg, rng)

    member = np.full(n, -1, dtype=np.int64)  # arm id per sample, -1 = in no arm
    if by == "ratio":
        ratio_map = _normalize_ratios(dict(zip(names, values, strict=True)), "arms")
        spec["arms"] = ratio_map
    else:
        key = labels_arr if by == "label" else _as_array(column, n, "column")
        if key is None:
            need = "labels" if by == "label" else "column"
            raise SplitSpecError(f"arms by {by} need `{need}` (one value per sample); set `{need}`")
        for a, (name, sel) in enumerate(zip(names, values, strict=True)):
            if callable(sel):
                mask = np.asarray(sel(key), dtype=bool)
                if mask.shape != (n,):
                    raise SplitSpecError(f"the predicate of arm {name!r} must return one bool per sample")
                spec["arms"][name] = f"callable:{getattr(sel, '__qualname__', repr(sel))}"
            else:
                sel_list = list(sel) if isinstance(sel, (list, tuple, set, np.ndarray)) else [sel]
                mask = np.isin(key, np.asarray(sel_list))
                spec["arms"][name] = [_key(np.asarray(v)) for v in sel_list]
            clash = mask & (member >= 0)
            if clash.any():
                other = names[int(member[np.flatnonzero(clash)[0]])]
                raise SplitSpecError(
                    f"arms {other!r} and {name!r} overlap on {int(clash.sum())} samples; make `arms` disjoint"
                )
            member[mask] = a

    parts: dict[str, np.ndarray] = {}
    pool = np.flatnonzero(member >= 0) if by != "ratio" else np.arange(n, dtype=np.int64)
    shared = [
        (name, r) for name, r in (("test", test_ratio), ("val", val_ratio if shared_val else 0.0)) if r > 0
    ]
    for name, r in shared:
        part = sub_assign(pool, [1.0 - r, r])
        parts[name] = pool[part == 1]
        pool = pool[part == 0]
    if by == "ratio":
        arm_of = sub_assign(pool, list(spec["arms"].values()))
        member[:] = -1
        member[pool] = arm_of
    for a, name in enumerate(names):
        idx = pool[member[pool] == a]
        if shared_val:
            parts[f"{name}/train"] = idx
        else:
            part = sub_assign(idx, [1.0 - val_ratio, val_ratio])
            parts[f"{name}/train"] = idx[part == 0]
            parts[f"{name}/val"] = idx[part == 1]
    return _build(parts, spec, seed, n, labels_arr, "check `arms`, `val_ratio` and `test_ratio`")


# ----------------------------------------------------------------------------------------------- dispatch


def make_split(
    n: int,
    kind: str = "holdout",
    *,
    labels: Any = None,
    groups: Any = None,
    seed: int = 0,
    **options: Any,
) -> SplitPlan:
    """Make a split by name: ``holdout`` | ``kfold`` | ``arms``; options go to the splitter of that kind.

    ``groups`` given means a grouped split. ``stratify`` defaults to False here (the data module defaults it
    to True); a stratified split without labels is an error.
    """
    splitters: dict[str, Callable[..., SplitPlan]] = {
        "holdout": holdout_split,
        "kfold": kfold_split,
        "arms": arms_split,
    }
    if kind not in splitters:
        raise SplitSpecError(f"unknown split kind {kind!r}; set `split` to one of {list(KINDS)}")
    try:
        return splitters[kind](n, labels=labels, groups=groups, seed=seed, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise SplitSpecError(f"option not understood by the {kind} split: {err}") from err
        raise
