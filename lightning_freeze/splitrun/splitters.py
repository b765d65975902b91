"""Splitters: small frozen objects that say how to split a dataset, validated when they are made.

Like scikit-learn's splitters, a splitter holds only its parameters. ``split(n, labels, groups, seed)`` is a
pure function of its arguments: it returns the named index parts of this run (:class:`SplitParts`) and the
manifest that identifies them. It never reads the rank, the world size, the clock, the output directory or
Hydra's runtime state, so every rank of every process computes the same parts. No torch, no Lightning.

>>> parts = KFold(k=5, fold=0).split(10, seed=0)
>>> sorted(parts.parts), len(parts["train"]), len(parts["val"])
(['train', 'val'], 8, 2)
>>> KFold(k=1)
Traceback (most recent call last):
...
lightning_freeze.splitrun.splitters.SplitSpecError: KFold: k must be an integer >= 2, got 1

=============================  ==========================================  ================================
splitter                       needs                                       parts
=============================  ==========================================  ================================
:class:`Holdout`               labels if ``stratify``, groups if ``grouped``  one per entry of ``ratios``
:class:`KFold`                 labels if ``stratify``                      ``train``, ``val`` (+ ``test``)
:class:`GroupKFold`            groups                                      ``train``, ``val`` (+ ``test``)
:class:`StratifiedGroupKFold`  labels and groups                           ``train``, ``val`` (+ ``test``)
:class:`RepeatedKFold`         labels if ``stratify``                      ``train``, ``val`` (+ ``test``)
:class:`NestedKFold`           labels if ``stratify``, groups if ``grouped``  ``train``, ``val``, ``test`` (outer)
:class:`TimeSeriesSplit`       a time field (or the dataset order)         ``train``, ``val`` (+ ``test``)
:class:`Arms`                  labels (by label), a column (by column)     ``<arm>/train``, ``<arm>/val``
=============================  ==========================================  ================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from lightning_freeze.splitrun.assign import (
    arm_membership,
    assign_arms,
    assign_folds,
    assign_parts,
    codes_of,
    part_hash,
    time_series_bounds,
    time_units,
)
from lightning_freeze.validation import check_bool, check_choice, check_int, check_number, is_number

__all__ = [
    "MANIFEST_VERSION",
    "Arms",
    "GroupKFold",
    "Holdout",
    "KFold",
    "RepeatedKFold",
    "SplitParts",
    "SplitSpecError",
    "Splitter",
    "StratifiedGroupKFold",
    "NestedKFold",
    "TimeSeriesSplit",
]

MANIFEST_VERSION = 2
DEFAULT_RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_ARMS = {"A": 0.5, "B": 0.5}
_TEST_STREAM = 0x7E57  # the random stream of a fixed test part, apart from the folds' streams


class SplitSpecError(ValueError):
    """A split that cannot be made as specified. The message names the option to change."""


@dataclass(frozen=True)
class SplitParts:
    """The result of a split: named parts, each a sorted ``int64`` array of dataset indices.

    Args:
        parts: part name -> sorted dataset indices.
        roles: ``train``/``val``/``test`` -> the part this run uses for it (an arm's ``A/train``, a shared
            ``val``).
        spec: the splitter as JSON (:meth:`Splitter.spec`).
        seed: the split seed.
        n: the dataset length.
        manifest: the JSON-ready record written to ``split_manifest.json``: spec, seed, part sizes, per-class
            counts per part, and the sha256 of each part's sorted index list.

    >>> parts = Holdout(ratios=[0.75, 0.25]).split(8, seed=0)
    >>> sorted(parts.parts), parts.roles, parts.manifest["parts"]["val"]["size"]
    (['train', 'val'], {'train': 'train', 'val': 'val'}, 2)
    """

    parts: dict[str, np.ndarray]
    roles: dict[str, str]
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
        """Part name -> sha256 of its index list."""
        return {name: info["sha256"] for name, info in self.manifest["parts"].items()}

    def has(self, role: str) -> bool:
        """Whether this run has a ``role`` part.

        Args:
            role: ``train``, ``val`` or ``test``.
        """
        return role in self.roles

    def role(self, role: str) -> np.ndarray:
        """The indices this run uses as ``role`` (``train``, ``val`` or ``test``).

        Args:
            role: ``train``, ``val`` or ``test``.
        """
        if role not in self.roles:
            hint = (
                "add a test entry to `ratios`"
                if self.spec.get("kind") == "Holdout"
                else "set the splitter's `test_ratio` > 0"
            )
            raise SplitSpecError(f"the split has no {role!r} part (parts: {sorted(self.parts)}); {hint}")
        return self.parts[self.roles[role]]


# ----------------------------------------------------------------------------------------------- inputs


def _check_n(n: Any) -> int:
    return check_int(n, "n (the dataset length)", minimum=1, where="split", error=SplitSpecError)


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


def _label(value: Any) -> Any:
    """A label or column value as a plain Python scalar (JSON-ready, hashable)."""
    return value.item() if isinstance(value, np.generic) else value


def _stream(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _plain(value: Any) -> Any:
    """A spec value as JSON: tuples as lists, callables by name."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if callable(value):
        return f"callable:{getattr(value, '__qualname__', repr(value))}"
    if isinstance(value, np.ndarray):
        return f"array[{value.shape[0]}]"
    return _label(value)


def _normalize_ratios(ratios: Any, option: str, where: str) -> dict[str, float]:
    """``{part: ratio}`` from a mapping or a 2/3-list (train, val[, test]); positive, summing to 1."""
    if isinstance(ratios, Mapping):
        items = {str(k): v for k, v in ratios.items()}
    elif isinstance(ratios, Sequence) and not isinstance(ratios, str):
        values = list(ratios)
        if len(values) not in (2, 3):
            raise SplitSpecError(
                f"{where}: {option} as a list needs 2 (train, val) or 3 (train, val, test) entries, got {values}"
            )
        items = dict(zip(["train", "val", "test"], values, strict=False))
    else:
        raise SplitSpecError(
            f"{where}: {option} must map part names to ratios (e.g. {{train: 0.8, val: 0.2}}) or be a list "
            f"of 2 or 3 ratios, got {ratios!r}"
        )
    out = {
        name: check_number(value, f"{option}.{name}", low=0, low_open=True, where=where, error=SplitSpecError)
        for name, value in items.items()
    }
    if len(out) < 2:
        raise SplitSpecError(f"{where}: {option} needs at least two parts, got {out}")
    total = math.fsum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise SplitSpecError(f"{where}: {option} must sum to 1, got {out} (sum {total:g}); fix `{option}`")
    return out


def _build(
    parts: dict[str, np.ndarray],
    roles: dict[str, str],
    spec: dict[str, Any],
    seed: int,
    n: int,
    labels: np.ndarray | None,
    hint: str,
) -> SplitParts:
    parts = {name: np.sort(np.asarray(idx, dtype=np.int64)) for name, idx in parts.items()}
    empty = [name for name, idx in parts.items() if idx.size == 0]
    if empty:
        raise SplitSpecError(f"{spec['kind']}: split part(s) {empty} would be empty ({spec}); {hint}")
    info: dict[str, Any] = {}
    covered = 0
    for name, idx in parts.items():
        entry: dict[str, Any] = {"size": int(idx.size), "sha256": part_hash(idx)}
        if labels is not None:
            uniq, counts = np.unique(labels[idx], return_counts=True)
            entry["class_counts"] = {str(_label(u)): int(c) for u, c in zip(uniq, counts, strict=True)}
        info[name] = entry
        covered += idx.size
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "spec": spec,
        "seed": int(seed),
        "n": int(n),
        "parts": info,
    }
    if covered < n:
        manifest["unassigned"] = int(n - covered)
    return SplitParts(parts=parts, roles=roles, spec=spec, seed=int(seed), n=int(n), manifest=manifest)


# ----------------------------------------------------------------------------------------------- base


@dataclass(frozen=True)
class Splitter:
    """Base of the splitters: parameters checked in ``__post_init__``, inputs checked in :meth:`split`.

    A subclass declares its parameters as dataclass fields, checks and normalises them in ``__post_init__``
    (``self._keep(k=check_int(self.k, ...))``: each value checked once, where it enters) and implements
    :meth:`split`. ``uses_labels``/``uses_groups`` name the field that makes labels/groups necessary.
    """

    uses_labels: ClassVar[str] = (
        "stratify"  # the field that makes labels necessary ("" = never, "*" = always)
    )
    uses_groups: ClassVar[str] = ""  # likewise for groups

    def _keep(self, **values: Any) -> None:
        """Store checked, normalised parameter values on the frozen instance."""
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def needs_labels(self) -> bool:
        """Whether :meth:`split` needs one label per sample."""
        return self.uses_labels == "*" or bool(self.uses_labels and getattr(self, self.uses_labels))

    @property
    def needs_groups(self) -> bool:
        """Whether :meth:`split` needs one group id per sample."""
        return self.uses_groups == "*" or bool(self.uses_groups and getattr(self, self.uses_groups))

    def _why_labels(self) -> str:
        return "stratify=true" if self.uses_labels == "stratify" else "this splitter"

    def per_sample_inputs(self) -> dict[str, Any]:
        """The further per-sample inputs :meth:`split` takes by keyword, each with the spec that names it.

        A spec is a dataset field name, a callable ``dataset -> array`` or an array: ``SplitRunDataModule``
        resolves it against its dataset and passes the values (``Arms(by="column")`` takes ``column``).
        """
        return {}

    def spec(self) -> dict[str, Any]:
        """The splitter as JSON: its kind and parameters (recorded in the manifest)."""
        return {"kind": type(self).__name__, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}

    def _inputs(
        self, n: Any, labels: Any, groups: Any, seed: Any
    ) -> tuple[int, int, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Check the call's inputs: (n, seed, labels, label codes if needed, group codes if needed).

        The one place that says labels or groups are missing, for direct calls and SplitRunDataModule alike.
        """
        where = type(self).__name__
        n = _check_n(n)
        seed = check_int(seed, "seed", minimum=0, where=where, error=SplitSpecError)
        labels_arr = _as_array(labels, n, "labels")
        groups_arr = _as_array(groups, n, "groups")
        if self.needs_labels and labels_arr is None:
            raise SplitSpecError(
                f"{where} needs labels (one per sample) for {self._why_labels()}: set `labels` (a dataset "
                "field name, an array or a callable; SplitRunDataModule's labels='auto' found no "
                "targets/labels/y field)"
                + (" or set `stratify=false`" if getattr(self, "stratify", False) else "")
            )
        if self.needs_groups and groups_arr is None:
            raise SplitSpecError(
                f"{where} needs groups (one group id per sample): set `groups` (a dataset field name, an array "
                "or a callable)"
            )
        codes = codes_of(labels_arr)[1] if (self.needs_labels and labels_arr is not None) else None
        gcodes = codes_of(groups_arr)[1].astype(np.int64) if self.needs_groups else None
        return n, seed, labels_arr, codes, gcodes

    def split(self, n: int, labels: Any = None, groups: Any = None, seed: int = 0) -> SplitParts:
        """This run's parts of ``n`` samples.

        Args:
            n: the dataset length.
            labels: one label per sample (needed when the splitter stratifies or selects by label).
            groups: one group id per sample (needed by grouped splitters).
            seed: the split seed: the parts are a pure function of the inputs and this seed.
        """
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- holdout


@dataclass(frozen=True)
class Holdout(Splitter):
    """Parts named by ``ratios``, optionally stratified or grouped.

    Without groups, part sizes are exact (largest remainder of ``n * ratio``) and stratified parts hold every
    class within about one sample of its share.

    Args:
        ratios: a mapping of part names to ratios (it must name ``train`` and ``val``) or a list of 2 or 3
            ratios (train, val[, test]); positive, summing to 1. ``None``: train 0.8 / val 0.1 / test 0.1.
        stratify: keep every class's share in every part (needs labels).
        grouped: whole groups go to one part (needs groups).

    >>> parts = Holdout(ratios=[0.5, 0.5], stratify=True).split(8, labels=[0, 0, 0, 0, 1, 1, 1, 1], seed=0)
    >>> [len(parts[name]) for name in ("train", "val")]
    [4, 4]
    """

    uses_groups: ClassVar[str] = "grouped"

    ratios: Mapping[str, float] | Sequence[float] | None = None
    stratify: bool = False
    grouped: bool = False

    def __post_init__(self) -> None:
        where = "Holdout"
        ratios = _normalize_ratios(DEFAULT_RATIOS if self.ratios is None else self.ratios, "ratios", where)
        missing = [name for name in ("train", "val") if name not in ratios]
        if missing:
            raise SplitSpecError(
                f"Holdout: ratios must name the parts 'train' and 'val' (missing {missing}), got {ratios}"
            )
        self._keep(
            ratios=ratios,
            stratify=check_bool(self.stratify, "stratify", where=where, error=SplitSpecError),
            grouped=check_bool(self.grouped, "grouped", where=where, error=SplitSpecError),
        )

    def split(self, n: int, labels: Any = None, groups: Any = None, seed: int = 0) -> SplitParts:
        """The parts of ``ratios``.

        Args:
            n: the dataset length.
            labels: one label per sample (needed with ``stratify``).
            groups: one group id per sample (needed with ``grouped``).
            seed: the split seed.
        """
        n, seed, labels_arr, codes, gcodes = self._inputs(n, labels, groups, seed)
        ratios: dict[str, float] = self.ratios  # type: ignore[assignment]
        part = assign_parts(n, list(ratios.values()), codes, gcodes, _stream(seed))
        parts = {name: np.flatnonzero(part == p) for p, name in enumerate(ratios)}
        roles = {role: role for role in ("train", "val", "test") if role in parts}
        return _build(
            parts, roles, self.spec(), seed, n, labels_arr, "raise the small `ratios` or use more data"
        )


# ----------------------------------------------------------------------------------------------- k-fold


def _fold_ids(
    where: str,
    rest: np.ndarray,
    k: int,
    labels: np.ndarray | None,
    codes: np.ndarray | None,
    gcodes: np.ndarray | None,
    rng: np.random.Generator,
    *,
    shuffle: bool = True,
    k_option: str = "k",
    after: str = "",
) -> np.ndarray:
    """Fold id (0..k-1) of each sample of ``rest``, after checking that k folds can be made of it."""
    if k > rest.size:
        raise SplitSpecError(
            f"{where}: {k_option}={k} folds is more than the {rest.size} samples available{after}; lower "
            f"`{k_option}`"
        )
    sub_codes = None if codes is None else codes_of(codes[rest])[1]
    sub_groups = None if gcodes is None else codes_of(gcodes[rest])[1].astype(np.int64)
    if sub_codes is not None:
        counts = np.bincount(sub_codes)
        small = np.flatnonzero(counts < k)
        if small.size:
            uniq = codes_of(labels[rest])[0]  # type: ignore[index]
            detail = ", ".join(f"{_label(uniq[c])}: {int(counts[c])}" for c in small[:5])
            raise SplitSpecError(
                f"{where}: stratified {k}-fold needs at least {k_option}={k} members per class{after}, but some "
                f"classes have fewer ({detail}); lower `{k_option}`, merge rare classes, or set `stratify=false`"
            )
    if sub_groups is not None and int(sub_groups.max()) + 1 < k:
        raise SplitSpecError(
            f"{where}: {k}-fold needs at least {k_option}={k} groups{after}, got {int(sub_groups.max()) + 1}; "
            f"lower `{k_option}`"
        )
    return assign_folds(rest.size, k, rng, codes=sub_codes, gcodes=sub_groups, shuffle=shuffle)


def _kfold_parts(
    splitter: _Folds,
    n: int,
    seed: int,
    labels: np.ndarray | None,
    codes: np.ndarray | None,
    gcodes: np.ndarray | None,
) -> SplitParts:
    """``train``/``val`` for fold ``splitter.fold`` of ``splitter.k`` (+ a fixed ``test`` part carved first)."""
    where = type(splitter).__name__
    k, fold, test_ratio = splitter.k, splitter.fold, splitter.test_ratio
    parts: dict[str, np.ndarray] = {}
    rest = np.arange(n, dtype=np.int64)
    if test_ratio > 0:
        part = assign_parts(n, [1.0 - test_ratio, test_ratio], codes, gcodes, _stream(seed, _TEST_STREAM))
        parts["test"] = np.flatnonzero(part == 1)
        rest = np.flatnonzero(part == 0)
    folds = _fold_ids(
        where,
        rest,
        k,
        labels,
        codes,
        gcodes,
        _stream(seed, *splitter._stream()),
        shuffle=splitter._shuffles(),
        after=" after the test part" if test_ratio > 0 else "",
    )
    parts = {"train": rest[folds != fold], "val": rest[folds == fold], **parts}
    roles = {role: role for role in ("train", "val", "test") if role in parts}
    return _build(
        parts, roles, splitter.spec(), seed, n, labels, "lower `k` or `test_ratio`, or check `groups`"
    )


@dataclass(frozen=True)
class _Folds(Splitter):
    """The k-fold family: fold ``fold`` of ``k`` is ``val`` (+ a fixed ``test`` part); subclasses add fields.

    ``test_ratio`` is keyword-only, so each subclass's own fields follow ``k, fold`` positionally.
    """

    k: int = 5
    fold: int = 0
    _: KW_ONLY
    test_ratio: float = 0.0

    def __post_init__(self) -> None:
        where = type(self).__name__
        k = check_int(self.k, "k", minimum=2, where=where, error=SplitSpecError)
        self._keep(
            k=k,
            fold=check_int(
                self.fold,
                "fold",
                minimum=0,
                maximum=k - 1,
                where=where,
                error=SplitSpecError,
                hint=f"fold numbers run from 0 to k-1 = {k - 1}",
            ),
            test_ratio=check_number(
                self.test_ratio,
                "test_ratio",
                low=0,
                high=1,
                high_open=True,
                where=where,
                error=SplitSpecError,
            ),
        )

    def _stream(self) -> tuple[int, ...]:
        return ()  # the folds' random stream, after the seed

    def _shuffles(self) -> bool:
        return True

    def split(self, n: int, labels: Any = None, groups: Any = None, seed: int = 0) -> SplitParts:
        """``train``/``val`` (+ ``test``) of fold ``fold``.

        Args:
            n: the dataset length.
            labels: one label per sample (needed when stratified).
            groups: one group id per sample (needed by grouped splitters).
            seed: the split seed.
        """
        n, seed, labels_arr, codes, gcodes = self._inputs(n, labels, groups, seed)
        return _kfold_parts(self, n, seed, labels_arr, codes, gcodes)


@dataclass(frozen=True)
class KFold(_Folds):
    """k-fold cross-validation: fold ``fold`` of ``k`` is ``val``, the other folds are ``train``.

    Folds of one ``(data, k, seed)`` tile the data, and changing ``fold`` never changes the assignment, so
    ``fold=0..k-1`` in a sweep is one cross-validation.

    Args:
        k: the number of folds (>= 2).
        fold: the fold this run validates on (0..k-1).
        stratify: every fold holds floor or ceil of n_c/k members of each class c (needs labels).
        shuffle: False gives contiguous folds in index order (within each class when stratified), as
            scikit-learn's ``KFold(shuffle=False)``.
        test_ratio: > 0 carves a fixed ``test`` part first, the same for every fold.

    >>> folds = [KFold(k=3, fold=f).split(9, seed=0)["val"].tolist() for f in range(3)]
    >>> sorted(i for fold in folds for i in fold)  # the folds tile the data
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """

    stratify: bool = False
    shuffle: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._keep(
            stratify=check_bool(self.stratify, "stratify", where="KFold", error=SplitSpecError),
            shuffle=check_bool(self.shuffle, "shuffle", where="KFold", error=SplitSpecError),
        )

    def _shuffles(self) -> bool:
        return self.shuffle


@dataclass(frozen=True)
class GroupKFold(_Folds):
    """k-fold over whole groups (patients, sessions, sites): a group is never in both ``train`` and ``val``.

    Args:
        k: the number of folds (>= 2, at most the number of groups).
        fold: the fold this run validates on (0..k-1).
        test_ratio: > 0 carves a fixed ``test`` part of whole groups first, the same for every fold.

    >>> groups = [0, 0, 1, 1, 2, 2, 3, 3]
    >>> parts = GroupKFold(k=2, fold=0).split(8, groups=groups, seed=0)
    >>> set(parts["train"] // 2) & set(parts["val"] // 2)
    set()
    """

    uses_labels: ClassVar[str] = ""
    uses_groups: ClassVar[str] = "*"


@dataclass(frozen=True)
class StratifiedGroupKFold(GroupKFold):
    """k-fold over whole groups, each group placed where its classes are most under-represented.

    Args:
        k: the number of folds (>= 2, at most the number of groups).
        fold: the fold this run validates on (0..k-1).
        test_ratio: > 0 carves a fixed ``test`` part of whole groups first, the same for every fold.

    >>> labels, groups = [0, 1] * 6, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    >>> parts = StratifiedGroupKFold(k=3, fold=1).split(12, labels=labels, groups=groups, seed=0)
    >>> len(parts["val"])
    4
    """

    uses_labels: ClassVar[str] = "*"


@dataclass(frozen=True)
class RepeatedKFold(_Folds):
    """``n_repeats`` k-fold cross-validations, each from its own random stream: (``repeat``, ``fold``) is one run.

    Sweep ``repeat=range(n_repeats)`` and ``fold=range(k)``. Repeat r's folds come from the stream
    ``(seed, r)``, so repeats differ from each other and every repeat tiles the data.

    Args:
        k: the number of folds (>= 2).
        fold: the fold this run validates on (0..k-1).
        n_repeats: the number of cross-validations.
        repeat: the cross-validation this run belongs to (0..n_repeats-1).
        stratify: stratified folds (needs labels).
        test_ratio: > 0 carves a fixed ``test`` part first, the same for every repeat and fold.

    >>> a = RepeatedKFold(k=2, n_repeats=2, repeat=0).split(20, seed=0)["val"]
    >>> b = RepeatedKFold(k=2, n_repeats=2, repeat=1).split(20, seed=0)["val"]
    >>> a.tolist() != b.tolist()
    True
    """

    n_repeats: int = 2
    repeat: int = 0
    stratify: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        where = "RepeatedKFold"
        n_repeats = check_int(self.n_repeats, "n_repeats", minimum=1, where=where, error=SplitSpecError)
        self._keep(
            n_repeats=n_repeats,
            repeat=check_int(
                self.repeat,
                "repeat",
                minimum=0,
                maximum=n_repeats - 1,
                where=where,
                error=SplitSpecError,
                hint=f"repeats run from 0 to n_repeats-1 = {n_repeats - 1}",
            ),
            stratify=check_bool(self.stratify, "stratify", where=where, error=SplitSpecError),
        )

    def _stream(self) -> tuple[int, ...]:
        return (self.repeat,)


# ----------------------------------------------------------------------------------------------- nested


_OUTER_STREAM, _INNER_STREAM = 0x0A7E, 0x1AAE  # nested CV's outer and inner random streams


@dataclass(frozen=True)
class NestedKFold(Splitter):
    """Nested cross-validation: ``test`` is outer fold ``outer_fold``; ``train``/``val`` split the rest in k.

    The outer folds come from the stream ``(seed, outer)`` and tile the data; for each outer fold the outer
    training part (everything but its test fold) is split into ``inner_k`` folds from the stream ``(seed,
    inner, outer_fold)``. A job ``(outer_fold, inner_fold)`` trains on ``train`` and validates on ``val``;
    model selection reads only ``val`` (inner folds), and the selected condition is scored on ``test``, which
    no inner job of that outer fold trained or validated on. Sweep both folds:
    ``split.outer_fold='range(5)' split.inner_fold='range(3)'``.

    Args:
        outer_k: the number of outer folds (>= 2).
        inner_k: the number of inner folds of each outer training part (>= 2).
        outer_fold: this run's outer fold, its ``test`` part (0..outer_k-1).
        inner_fold: this run's inner fold, its ``val`` part (0..inner_k-1).
        stratify: stratified outer and inner folds (needs labels).
        grouped: whole groups stay in one fold at both levels (needs groups).
        shuffle: False gives contiguous folds in index order at both levels.

    >>> parts = NestedKFold(outer_k=3, inner_k=2, outer_fold=1, inner_fold=0).split(12, seed=0)
    >>> [len(parts[name]) for name in ("train", "val", "test")]
    [4, 4, 4]
    >>> set(parts["test"]) & (set(parts["train"]) | set(parts["val"]))
    set()
    """

    uses_groups: ClassVar[str] = "grouped"

    outer_k: int = 5
    inner_k: int = 3
    outer_fold: int = 0
    inner_fold: int = 0
    stratify: bool = False
    grouped: bool = False
    shuffle: bool = True

    def __post_init__(self) -> None:
        checks: dict[str, Any] = {"where": "NestedKFold", "error": SplitSpecError}
        outer_k = check_int(self.outer_k, "outer_k", minimum=2, **checks)
        inner_k = check_int(self.inner_k, "inner_k", minimum=2, **checks)
        self._keep(
            outer_k=outer_k,
            inner_k=inner_k,
            outer_fold=check_int(
                self.outer_fold,
                "outer_fold",
                minimum=0,
                maximum=outer_k - 1,
                hint=f"outer folds run from 0 to outer_k-1 = {outer_k - 1}",
                **checks,
            ),
            inner_fold=check_int(
                self.inner_fold,
                "inner_fold",
                minimum=0,
                maximum=inner_k - 1,
                hint=f"inner folds run from 0 to inner_k-1 = {inner_k - 1}",
                **checks,
            ),
            stratify=check_bool(self.stratify, "stratify", **checks),
            grouped=check_bool(self.grouped, "grouped", **checks),
            shuffle=check_bool(self.shuffle, "shuffle", **checks),
        )

    def split(self, n: int, labels: Any = None, groups: Any = None, seed: int = 0) -> SplitParts:
        """``test`` (outer fold), ``train`` and ``val`` (inner split); see :meth:`Splitter.split`.

        Args:
            n: the dataset length.
            labels: one label per sample (needed with ``stratify``).
            groups: one group id per sample (needed with ``grouped``).
            seed: the split seed.
        """
        n, seed, labels_arr, codes, gcodes = self._inputs(n, labels, groups, seed)
        everything = np.arange(n, dtype=np.int64)
        outer = _fold_ids(
            "NestedKFold",
            everything,
            self.outer_k,
            labels_arr,
            codes,
            gcodes,
            _stream(seed, _OUTER_STREAM),
            shuffle=self.shuffle,
            k_option="outer_k",
        )
        rest = everything[outer != self.outer_fold]
        inner = _fold_ids(
            "NestedKFold",
            rest,
            self.inner_k,
            labels_arr,
            codes,
            gcodes,
            _stream(seed, _INNER_STREAM, self.outer_fold),
            shuffle=self.shuffle,
            k_option="inner_k",
            after=f" in the training part of outer fold {self.outer_fold}",
        )
        parts = {
            "train": rest[inner != self.inner_fold],
            "val": rest[inner == self.inner_fold],
            "test": everything[outer == self.outer_fold],
        }
        return _build(
            parts,
            {role: role for role in parts},
            self.spec(),
            seed,
            n,
            labels_arr,
            "lower `outer_k` or `inner_k`",
        )


# ----------------------------------------------------------------------------------------------- time order


@dataclass(frozen=True)
class TimeSeriesSplit(_Folds):
    """Walk-forward validation: fold f validates on the f-th of k consecutive blocks, trains only before it.

    Samples are ordered by ``time`` (ties and ``time=None``: the dataset order). The last ``k`` blocks of
    ``test_size`` samples are the validation blocks (default size ``n // (k + 1)``, as scikit-learn's
    ``TimeSeriesSplit``); fold f trains on everything up to ``gap`` samples before its block (an expanding
    window), or on the last ``max_train_size`` of those. Every validation sample is at or after every
    training sample in time. ``grouped=True`` makes whole groups the units (a day, a session): a group is
    never in both train and val, and ``gap``, ``test_size``, ``max_train_size`` count groups; groups whose
    time spans interleave are an error. ``test_ratio > 0`` keeps the latest units as a fixed ``test`` part.
    The split needs no randomness: ``seed`` only enters the manifest.

    Args:
        k: the number of folds (validation blocks), >= 2.
        fold: this run's fold; 0 is the earliest validation block.
        gap: units left out between the end of train and the start of val (no leakage across the cut).
        max_train_size: the most units of train (None: everything before the gap, an expanding window).
        test_size: units per validation block (None: ``(units - test units) // (k + 1)``).
        time: the time of each sample: a dataset field name (read by SplitRunDataModule), one value per
            sample, or None for the dataset order. A direct call may pass the values as ``split(time=...)``.
        grouped: whole groups are the units (needs groups).
        test_ratio: the share of the latest units kept as a fixed ``test`` part (0: none).

    >>> parts = TimeSeriesSplit(k=3, fold=1, gap=1).split(12, seed=0)
    >>> parts["train"].tolist(), parts["val"].tolist()
    ([0, 1, 2, 3, 4], [6, 7, 8])
    """

    uses_labels: ClassVar[str] = ""
    uses_groups: ClassVar[str] = "grouped"

    gap: int = 0
    max_train_size: int | None = None
    test_size: int | None = None
    time: Any = None
    grouped: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks: dict[str, Any] = {"where": "TimeSeriesSplit", "error": SplitSpecError}
        self._keep(
            gap=check_int(self.gap, "gap", minimum=0, **checks),
            max_train_size=check_int(
                self.max_train_size, "max_train_size", minimum=1, allow_none=True, **checks
            ),
            test_size=check_int(self.test_size, "test_size", minimum=1, allow_none=True, **checks),
            grouped=check_bool(self.grouped, "grouped", **checks),
        )

    def per_sample_inputs(self) -> dict[str, Any]:
        return {} if self.time is None else {"time": self.time}

    def split(
        self, n: int, labels: Any = None, groups: Any = None, seed: int = 0, time: Any = None
    ) -> SplitParts:
        """The walk-forward parts of fold ``fold``.

        Args:
            n: the dataset length.
            labels: one label per sample (only for the manifest's class counts).
            groups: one group id per sample (``grouped``).
            seed: the split seed (recorded; the split is not random).
            time: one sortable time value per sample (default: ``time`` itself, or the dataset order).
        """
        where = "TimeSeriesSplit"
        n, seed, labels_arr, _, gcodes = self._inputs(n, labels, groups, seed)
        source = self.time if time is None else time
        if isinstance(source, str):
            raise SplitSpecError(
                f"{where}: time={source!r} is a field name; SplitRunDataModule reads it from the dataset, a "
                "direct call passes the values as `time=`"
            )
        times = _as_array(source, n, "time")
        unit, units, clash = time_units(n, times, gcodes)
        if clash is not None:
            names = codes_of(np.asarray(groups))[0]
            raise SplitSpecError(
                f"{where}: groups {_label(names[clash[0]])!r} and {_label(names[clash[1]])!r} overlap in time, so "
                "no time-ordered split keeps both whole; fix `groups` or `time`, or set `grouped=false`"
            )
        what = "groups" if gcodes is not None else "samples"
        test_units = math.ceil(self.test_ratio * units) if self.test_ratio > 0 else 0
        rest = units - test_units
        size = self.test_size if self.test_size is not None else rest // (self.k + 1)
        first_train = rest - self.k * size - self.gap
        if size < 1 or first_train < 1:
            raise SplitSpecError(
                f"{where}: {rest} {what} (after {test_units} test {what}) are too few for k={self.k} validation "
                f"blocks of {size} with gap={self.gap}: the first fold would train on {max(first_train, 0)}; "
                "lower `k`, `gap` or `test_size`"
            )
        bounds = time_series_bounds(
            units,
            self.k,
            self.fold,
            gap=self.gap,
            test_units=test_units,
            val_units=size,
            max_train_units=self.max_train_size,
        )
        parts = {name: np.flatnonzero((unit >= lo) & (unit < hi)) for name, (lo, hi) in bounds.items()}
        built = _build(
            parts,
            {role: role for role in parts},
            self.spec(),
            seed,
            n,
            labels_arr,
            "lower `k`, `gap` or `test_size`",
        )
        built.manifest["units"] = {
            "kind": what,
            "count": int(units),
            **{k: list(v) for k, v in bounds.items()},
        }
        return built


# ----------------------------------------------------------------------------------------------- arms


ArmSpec = float | Sequence[Any] | Callable[[np.ndarray], np.ndarray]


def _arm_selectors(arms: Any, by: str | None, column: Any, where: str) -> tuple[dict[str, ArmSpec], str]:
    """``arms`` normalised (ratios, tuples of disjoint values, or predicates) and ``by`` (inferred when None)."""
    arms = DEFAULT_ARMS if arms is None else arms
    if not isinstance(arms, Mapping) or not arms:
        raise SplitSpecError(
            f"{where}: arms must map arm names to ratios, label lists or predicates, got {arms!r}"
        )
    names = [str(a) for a in arms]
    bad = [a for a in names if "/" in a or not a]
    if bad:
        raise SplitSpecError(
            f"{where}: arm names must be non-empty and without '/': {bad}; rename them in `arms`"
        )
    values = list(arms.values())
    if by is None:
        by = "ratio" if all(is_number(v) for v in values) else "column" if column is not None else "label"
    by = check_choice(by, "by", ("ratio", "label", "column"), where=where, error=SplitSpecError)
    if by == "column" and column is None:
        raise SplitSpecError(
            f"{where}: by='column' needs `column` (a dataset field name or one value per sample)"
        )
    if by == "ratio":
        return dict(_normalize_ratios(dict(zip(names, values, strict=True)), "arms", where)), by
    selectors: dict[str, ArmSpec] = {}
    owner: dict[Any, str] = {}
    for name, sel in zip(names, values, strict=True):
        if callable(sel):
            selectors[name] = sel
            continue
        if isinstance(sel, (str, bytes)) or not isinstance(sel, (Sequence, np.ndarray)):
            sel = [sel]
        chosen = tuple(_label(v) for v in sel)
        if not chosen:
            raise SplitSpecError(f"{where}: arm {name!r} selects no {by} values; fix `arms`")
        for value in chosen:
            if value in owner:
                raise SplitSpecError(
                    f"{where}: arms {owner[value]!r} and {name!r} both take {by} {value!r}; make `arms` disjoint"
                )
            owner[value] = name
        selectors[name] = chosen
    return selectors, by


@dataclass(frozen=True)
class Arms(Splitter):
    """A/B arms: disjoint sub-populations, each with its own ``<arm>/train`` and ``<arm>/val`` parts.

    Samples in no arm are left out (counted as ``unassigned`` in the manifest). The assignment itself is
    :func:`~lightning_freeze.splitrun.assign.assign_arms`.

    Args:
        arms: arm names mapped to ratios (``{A: 0.5, B: 0.5}``: random, stratified/grouped sub-populations),
            lists of label values (``{A: [0, 1], B: [2, 3]}``), lists of values of ``column``, or predicates
            ``values -> bool mask``. ``None``: two random halves ``{A: 0.5, B: 0.5}``.
        arm: the arm this run trains on.
        by: ``"ratio"``, ``"label"`` or ``"column"``; inferred from ``arms`` and ``column`` when ``None``.
        column: for ``by="column"``: a dataset field name (read by SplitRunDataModule) or one value per sample.
        val_ratio: each arm's validation share (of the shared ``val`` part with ``shared_val``).
        shared_val: carve one ``val`` part first; every arm validates on it.
        test_ratio: > 0 carves one shared ``test`` part first.
        stratify: keep the class shares in every sub-assignment (needs labels).
        grouped: whole groups stay in one arm and part (needs groups).

    >>> labels = [0, 1, 2] * 10
    >>> parts = Arms(arms={"A": [0], "B": [1, 2]}, arm="B").split(30, labels=labels, seed=0)
    >>> sorted({labels[i] for i in parts.role("train")})
    [1, 2]
    """

    uses_labels: ClassVar[str] = ""
    uses_groups: ClassVar[str] = "grouped"

    arms: Mapping[str, ArmSpec] | None = None
    arm: str = "A"
    by: str | None = None
    column: Any = None
    val_ratio: float = 0.2
    shared_val: bool = False
    test_ratio: float = 0.0
    stratify: bool = False
    grouped: bool = False

    def __post_init__(self) -> None:
        where = "Arms"
        arms, by = _arm_selectors(self.arms, self.by, self.column, where)
        checks: dict[str, Any] = {"where": where, "error": SplitSpecError}
        self._keep(
            arms=arms,
            by=by,
            arm=check_choice(self.arm, "arm", list(arms), hint="the arm this run trains on", **checks),
            val_ratio=check_number(
                self.val_ratio, "val_ratio", low=0, high=1, low_open=True, high_open=True, **checks
            ),
            test_ratio=check_number(self.test_ratio, "test_ratio", low=0, high=1, high_open=True, **checks),
            shared_val=check_bool(self.shared_val, "shared_val", **checks),
            stratify=check_bool(self.stratify, "stratify", **checks),
            grouped=check_bool(self.grouped, "grouped", **checks),
        )

    @property
    def needs_labels(self) -> bool:
        return self.by == "label" or self.stratify

    def _why_labels(self) -> str:
        return "by='label'" if self.by == "label" else "stratify=true"

    def per_sample_inputs(self) -> dict[str, Any]:
        return {"column": self.column} if self.by == "column" else {}

    def _members(self, n: int, key: np.ndarray) -> np.ndarray:
        """Arm id per sample (-1: in no arm) from the values the arms select on."""
        arms: dict[str, ArmSpec] = self.arms  # type: ignore[assignment]
        names = list(arms)
        present = {_label(v) for v in np.unique(key)}
        masks = []
        for name, sel in arms.items():
            if callable(sel):
                mask = np.asarray(sel(key), dtype=bool)
                if mask.shape != (n,):
                    raise SplitSpecError(
                        f"Arms: the predicate of arm {name!r} must return one bool per sample"
                    )
            else:
                absent = [v for v in sel if v not in present]  # type: ignore[union-attr]
                if absent:
                    raise SplitSpecError(
                        f"Arms: arm {name!r} names {self.by} value(s) {absent} that no sample has; the data has "
                        f"{sorted(present, key=str)[:20]}; fix `arms`"
                    )
                mask = np.isin(key, np.asarray(list(sel), dtype=key.dtype))  # type: ignore[arg-type]
            masks.append(mask)
        member, clash = arm_membership(key, masks)
        if clash is not None:
            first, second, count = clash
            raise SplitSpecError(
                f"Arms: arms {names[first]!r} and {names[second]!r} overlap on {count} samples; make `arms` disjoint"
            )
        return member

    def split(
        self, n: int, labels: Any = None, groups: Any = None, seed: int = 0, column: Any = None
    ) -> SplitParts:
        """Every arm's parts; ``roles`` point at this run's arm (see :meth:`Splitter.split`).

        Args:
            n: the dataset length.
            labels: one label per sample (``by="label"`` or ``stratify``).
            groups: one group id per sample (``grouped``).
            seed: the split seed.
            column: the values of ``column`` per sample (``by="column"``; default: ``column`` itself).
        """
        n, seed, labels_arr, codes, gcodes = self._inputs(n, labels, groups, seed)
        member = None
        if self.by != "ratio":
            if self.by == "label":
                key = labels_arr
            else:
                source = self.column if column is None else column
                if isinstance(source, str):
                    raise SplitSpecError(
                        f"Arms: column={source!r} is a field name; SplitRunDataModule reads it from the dataset, "
                        "a direct call passes the values as `column=`"
                    )
                key = _as_array(source, n, "column")
            assert key is not None
            member = self._members(n, key)
        arms: dict[str, ArmSpec] = self.arms  # type: ignore[assignment]
        parts = assign_arms(
            list(arms),
            n,
            member,
            [float(v) for v in arms.values()] if self.by == "ratio" else None,  # type: ignore[arg-type]
            val_ratio=self.val_ratio,
            test_ratio=self.test_ratio,
            shared_val=self.shared_val,
            codes=codes if self.stratify else None,
            gcodes=gcodes,
            rng=_stream(seed),
        )
        roles = {"train": f"{self.arm}/train", "val": "val" if self.shared_val else f"{self.arm}/val"}
        if "test" in parts:
            roles["test"] = "test"
        spec = {k: v for k, v in self.spec().items() if k != "arm"}  # every arm's run has the same split
        return _build(parts, roles, spec, seed, n, labels_arr, "check `arms`, `val_ratio` and `test_ratio`")
