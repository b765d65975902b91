"""Time-ordered and nested splitters: property tests (hypothesis), scikit-learn parity, manifests, and the
datamodule reading a time field. Pure numpy except the datamodule case."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from lightning_freeze.splitrun import NestedKFold, SplitRunDataModule, SplitSpecError, TimeSeriesSplit

settings.register_profile("cv_splits", max_examples=60, deadline=None)
settings.load_profile("cv_splits")


def _positions(times: np.ndarray | None, n: int) -> np.ndarray:
    """Each sample's place in time order (ties: dataset order), computed independently of the splitter."""
    order = np.arange(n) if times is None else np.argsort(times, kind="stable")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    return pos


@given(
    n=st.integers(12, 300),
    k=st.integers(2, 5),
    gap=st.integers(0, 3),
    max_train=st.one_of(st.none(), st.integers(1, 40)),
    ties=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_time_series_never_validates_before_it_trains_and_honours_the_gap(n, k, gap, max_train, ties, seed):
    times = np.random.default_rng(seed).integers(0, max(n // ties, 1), size=n)  # unsorted, with ties
    pos = _positions(times, n)
    size = n // (k + 1)
    if n - k * size - gap < 1:
        with pytest.raises(SplitSpecError, match="too few"):
            TimeSeriesSplit(k=k, fold=0, gap=gap).split(n, seed=seed, time=times)
        return
    vals = []
    for fold in range(k):
        parts = TimeSeriesSplit(k=k, fold=fold, gap=gap, max_train_size=max_train).split(
            n, seed=seed, time=times
        )
        train, val = parts["train"], parts["val"]
        assert times[train].max() <= times[val].min()  # never a validation sample earlier than a training one
        assert pos[val].min() - pos[train].max() - 1 == gap  # exactly `gap` samples left out between them
        assert pos[val].max() - pos[val].min() + 1 == val.size == size  # one contiguous block
        assert max_train is None or train.size <= max_train
        assert max_train is not None or pos[train].min() == 0  # expanding window from the start
        vals.append(pos[val])
    blocks = np.sort(np.concatenate(vals))
    assert np.array_equal(
        blocks, np.arange(n - k * size, n)
    )  # k consecutive blocks, ending at the last sample


@pytest.mark.parametrize("gap", [0, 2])
@pytest.mark.parametrize("max_train_size", [None, 5])
def test_time_series_equals_scikit_learn_in_dataset_order(gap, max_train_size):
    from sklearn.model_selection import TimeSeriesSplit as SkTimeSeriesSplit

    ours = [
        TimeSeriesSplit(k=4, fold=f, gap=gap, max_train_size=max_train_size).split(37, seed=0)
        for f in range(4)
    ]
    theirs = SkTimeSeriesSplit(n_splits=4, gap=gap, max_train_size=max_train_size).split(np.zeros(37))
    for parts, (train, val) in zip(ours, theirs, strict=True):
        assert parts["train"].tolist() == train.tolist() and parts["val"].tolist() == val.tolist()


@given(
    sizes=st.lists(st.integers(1, 8), min_size=8, max_size=40),
    k=st.integers(2, 4),
    gap=st.integers(0, 2),
    seed=st.integers(0, 10_000),
)
def test_grouped_time_series_keeps_groups_whole_and_in_time_order(sizes, k, gap, seed):
    """Groups are days (contiguous spans of time, in shuffled dataset order): a day is never split between
    train and val, and whole days are the units of the gap."""
    rng = np.random.default_rng(seed)
    days = np.repeat(np.arange(len(sizes)), sizes)
    times = days * 100 + rng.integers(0, 100, size=days.size)  # day d spans [100 d, 100 d + 99]
    perm = rng.permutation(days.size)
    days, times = days[perm], times[perm]
    units = len(sizes)
    if units - k * (units // (k + 1)) - gap < 1 or units // (k + 1) < 1:
        return
    for fold in range(k):
        parts = TimeSeriesSplit(k=k, fold=fold, gap=gap, grouped=True).split(
            days.size, groups=days, seed=0, time=times
        )
        train_days, val_days = set(days[parts["train"]]), set(days[parts["val"]])
        assert not train_days & val_days
        assert times[parts["train"]].max() < times[parts["val"]].min()
        assert min(val_days) - max(train_days) - 1 == gap  # `gap` whole days left out
        assert parts.manifest["units"]["kind"] == "groups"


def test_grouped_time_series_refuses_groups_that_interleave_in_time():
    groups = np.array([0, 1, 0, 1, 2, 2, 3, 3, 4, 4])  # groups 0 and 1 alternate in time
    with pytest.raises(SplitSpecError, match="groups 0 and 1 overlap in time"):
        TimeSeriesSplit(k=2, grouped=True).split(10, groups=groups, seed=0)


def test_time_series_fixed_test_part_is_the_latest_and_the_same_for_every_fold():
    tests = {tuple(TimeSeriesSplit(k=3, fold=f, test_ratio=0.2).split(50, seed=0)["test"]) for f in range(3)}
    assert tests == {tuple(range(40, 50))}
    parts = TimeSeriesSplit(k=3, fold=2, test_ratio=0.2).split(50, seed=0)
    assert parts["test"].tolist() == list(range(40, 50)) and parts["val"].max() < 40


@given(
    n=st.integers(30, 300),
    outer_k=st.integers(2, 5),
    inner_k=st.integers(2, 4),
    stratify=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_nested_test_fold_is_never_in_inner_train_or_val(n, outer_k, inner_k, stratify, seed):
    labels = np.arange(n) % 3
    outer_tests = []
    for outer in range(outer_k):
        inner_vals, tests = [], set()
        for inner in range(inner_k):
            parts = NestedKFold(outer_k, inner_k, outer, inner, stratify=stratify).split(n, labels, seed=seed)
            train, val, test = (set(parts[p].tolist()) for p in ("train", "val", "test"))
            assert not test & (train | val) and not train & val
            assert train | val | test == set(range(n))
            tests.add(tuple(sorted(test)))
            inner_vals.append(val)
            assert (
                parts.manifest["spec"]["outer_fold"] == outer
                and parts.manifest["spec"]["inner_fold"] == inner
            )
        assert len(tests) == 1  # one outer test fold for all inner folds
        assert sorted(i for v in inner_vals for i in v) == sorted(set(range(n)) - set(tests.pop()))
        outer_tests.append(parts["test"])
    assert sorted(np.concatenate(outer_tests).tolist()) == list(range(n))  # outer folds tile the data
    if stratify:
        for test in outer_tests:
            counts = np.bincount(labels[test], minlength=3)
            assert counts.max() - counts.min() <= 1 + n % 3


def test_nested_kfold_refuses_an_inner_k_the_outer_training_part_cannot_take():
    labels = np.array([0] * 6 + [1] * 6)
    with pytest.raises(
        SplitSpecError, match="inner_k=5 members per class in the training part of outer fold"
    ):
        NestedKFold(outer_k=2, inner_k=5, stratify=True).split(12, labels, seed=0)
    with pytest.raises(SplitSpecError, match="inner_fold must be a non-negative integer <= 2"):
        NestedKFold(inner_k=3, inner_fold=3)


def test_datamodule_orders_a_time_series_by_a_dataset_field_and_records_it(tmp_path):
    class Stamped(TensorDataset):
        def __init__(self, n: int) -> None:
            super().__init__(torch.randn(n, 2), torch.arange(n) % 2)
            self.timestamp = np.random.default_rng(0).permutation(n) * 10  # stored out of order
            self.labels = (torch.arange(n) % 2).numpy()

    data = Stamped(60)
    dm = SplitRunDataModule(
        data, split=TimeSeriesSplit(k=3, fold=2, gap=1, time="timestamp"), manifest_dir=tmp_path
    )
    train, val = dm.part("train"), dm.part("val")
    assert data.timestamp[train].max() < data.timestamp[val].min()
    dm.setup("fit")
    manifest = dm.manifest
    assert manifest["spec"]["kind"] == "TimeSeriesSplit" and manifest["spec"]["time"] == "timestamp"
    assert manifest["units"]["val"] == [45, 60] and manifest["units"]["train"] == [0, 44]
    assert (tmp_path / "split_manifest.json").is_file()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: TimeSeriesSplit(gap=-1), "gap must be a non-negative integer"),
        (lambda: TimeSeriesSplit(max_train_size=0), "max_train_size must be a positive integer or None"),
        (lambda: TimeSeriesSplit(k=3, fold=3), "fold numbers run from 0 to k-1 = 2"),
        (lambda: TimeSeriesSplit(k=5, test_size=10).split(40, seed=0), "lower `k`, `gap` or `test_size`"),
        (
            lambda: TimeSeriesSplit(time="stamp").split(40, seed=0),
            "a direct call passes the values as `time=`",
        ),
        (lambda: TimeSeriesSplit(grouped=True).split(40, seed=0), "TimeSeriesSplit needs groups"),
        (lambda: NestedKFold(outer_k=1), "outer_k must be an integer >= 2"),
        (lambda: NestedKFold(outer_k=3, outer_fold=3), "outer folds run from 0 to outer_k-1 = 2"),
        (lambda: NestedKFold(stratify="yes"), "stratify must be true or false"),
        (lambda: NestedKFold(outer_k=3, inner_k=5).split(6, seed=0), "lower `inner_k`"),
    ],
)
def test_bad_time_series_and_nested_parameters_name_the_option(make, words):
    with pytest.raises(SplitSpecError, match=re.escape(words)):
        make()


def test_datamodule_names_a_missing_time_field():
    data = TensorDataset(torch.randn(30, 2), torch.arange(30) % 2)
    with pytest.raises(SplitSpecError, match="time='stamp' names no attribute of TensorDataset"):
        SplitRunDataModule(data, split=TimeSeriesSplit(k=2, time="stamp"), labels=None)
