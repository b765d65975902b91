"""Splitters: property tests (hypothesis) and every refused spec. Pure numpy, microseconds per case."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_freeze.splitrun import splits as splits_module
from lightning_freeze.splitrun.splits import (
    SplitSpecError,
    arms_split,
    assign_folds,
    holdout_split,
    kfold_split,
    make_split,
    stratified_kfold,
)

settings.register_profile("splits", max_examples=60, deadline=None)
settings.load_profile("splits")


@st.composite
def labelled(draw, min_per_class: int = 1):
    n_classes = draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(min_per_class, 40), min_size=n_classes, max_size=n_classes))
    labels = np.repeat(np.arange(n_classes) * 3 + 1, counts)  # sparse label values
    perm = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(labels.size)
    return labels[perm]


def _assert_partition(plan, n, expect_cover=True):
    parts = list(plan.parts.values())
    union = np.concatenate(parts)
    assert np.unique(union).size == union.size, "parts overlap"
    if expect_cover:
        assert union.size == n
    for idx in parts:
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


@given(labels=labelled(min_per_class=5), k=st.integers(2, 5), seed=st.integers(0, 1000))
def test_stratified_folds_partition_and_balance_every_class(labels, k, seed):
    n = labels.size
    folds = [kfold_split(n, k=k, fold=f, labels=labels, stratify=True, seed=seed) for f in range(k)]
    vals = [p["val"] for p in folds]
    assert np.array_equal(np.sort(np.concatenate(vals)), np.arange(n))  # folds tile the data
    for p in folds:
        _assert_partition(p, n)
    for c in np.unique(labels):
        n_c = int((labels == c).sum())
        for v in vals:
            assert abs(int((labels[v] == c).sum()) - n_c / k) < 1  # floor or ceil of the ideal
    sizes = [v.size for v in vals]
    assert max(sizes) - min(sizes) <= 1


@given(labels=labelled(), seed=st.integers(0, 1000))
def test_stratified_holdout_has_exact_sizes_and_class_shares(labels, seed):
    n = labels.size
    if n < 10:
        return
    ratios = {"train": 0.6, "val": 0.25, "test": 0.15}
    plan = holdout_split(n, ratios=ratios, labels=labels, stratify=True, seed=seed)
    _assert_partition(plan, n)
    sizes = {k: v.size for k, v in plan.parts.items()}
    assert sum(sizes.values()) == n
    for name, r in ratios.items():
        assert abs(sizes[name] - n * r) < 1
        for c in np.unique(labels):
            n_c = int((labels == c).sum())
            assert abs(int((labels[plan[name]] == c).sum()) - n_c * r) < 2


@given(
    n_groups=st.integers(5, 40),
    n=st.integers(40, 300),
    k=st.integers(2, 5),
    seed=st.integers(0, 1000),
    stratify=st.booleans(),
)
def test_groups_are_never_split_across_parts(n_groups, n, k, seed, stratify):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    labels = rng.integers(0, 3, n)
    try:
        plans = [
            kfold_split(n, k=k, fold=f, groups=groups, labels=labels, stratify=stratify, seed=seed)
            for f in range(k)
        ]
    except SplitSpecError as err:  # a fold can be empty with few, large groups: refused, never silent
        assert "empty" in str(err) or "groups" in str(err)
        return
    for plan in plans:
        _assert_partition(plan, n)
        assert not set(groups[plan["train"]]) & set(groups[plan["val"]])
    vals = np.concatenate([p["val"] for p in plans])
    assert np.array_equal(np.sort(vals), np.arange(n))
    hold = holdout_split(n, ratios=[0.5, 0.5], groups=groups, seed=seed)
    assert not set(groups[hold["train"]]) & set(groups[hold["val"]])


@given(n=st.integers(2, 500), seed=st.integers(0, 10_000))
def test_deterministic_for_a_seed_and_seed_changes_the_split(n, seed):
    a = make_split(n, "kfold", k=2, fold=0, seed=seed)
    b = make_split(n, "kfold", k=2, fold=0, seed=seed)
    assert a.hashes == b.hashes and a.manifest == b.manifest
    if n >= 20:  # 2-fold over 20+ samples: two seeds agreeing is a ~1e-5 coincidence
        c = make_split(n, "kfold", k=2, fold=0, seed=seed + 1)
        assert c.hashes != a.hashes


def test_split_is_the_same_in_another_process_with_another_hash_seed():
    """Nothing depends on the process: PYTHONHASHSEED, world size or rank env vars change nothing."""
    splits_path = splits_module.__file__
    code = (  # load splits.py by path: no torch, no Lightning, no package __init__
        "import importlib.util as u, json, numpy as np;"
        f"s = u.spec_from_file_location('splits', {splits_path!r}); m = u.module_from_spec(s);"
        "import sys; sys.modules['splits'] = m; s.loader.exec_module(m); make_split = m.make_split;"
        "y = np.arange(500) % 7; print(json.dumps(make_split(500, 'kfold', k=5, fold=3, labels=y,"
        " stratify=True, seed=11).hashes)); assert 'torch' not in sys.modules"
    )
    here = make_split(500, "kfold", k=5, fold=3, labels=np.arange(500) % 7, stratify=True, seed=11).hashes
    env = {"PYTHONHASHSEED": "123", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, **env},
    )
    assert json.loads(out.stdout) == here


def test_string_labels_and_manifest_class_counts():
    labels = np.array(["cat", "dog", "eel"] * 10)
    plan = kfold_split(30, k=5, fold=1, labels=labels, stratify=True, seed=0)
    assert plan.manifest["parts"]["val"]["class_counts"] == {"cat": 2, "dog": 2, "eel": 2}
    assert plan.manifest["parts"]["train"]["size"] == 24
    json.dumps(plan.manifest)  # JSON-ready


def test_kfold_test_part_is_the_same_for_every_fold():
    y = np.arange(200) % 4
    plans = [kfold_split(200, k=4, fold=f, labels=y, stratify=True, test_ratio=0.2, seed=5) for f in range(4)]
    assert all(np.array_equal(p["test"], plans[0]["test"]) for p in plans)
    assert plans[0]["test"].size == 40
    for p in plans:
        _assert_partition(p, 200)


def test_stratified_kfold_matches_sklearn_shape_and_balance():
    y = np.random.default_rng(0).integers(0, 10, 5000)
    ours = stratified_kfold(y, 5, seed=0)
    assert len(ours) == 5
    for train, val in ours:
        assert train.size + val.size == 5000 and not np.intersect1d(train, val).size
        assert np.abs(np.bincount(y[val], minlength=10) - np.bincount(y, minlength=10) / 5).max() < 1


def test_arms_by_ratio_label_and_column():
    y = np.arange(100) % 5
    plan = arms_split(100, arms={"A": 0.5, "B": 0.5}, labels=y, stratify=True, seed=0)
    _assert_partition(plan, 100)
    assert set(plan.parts) == {"A/train", "A/val", "B/train", "B/val"}
    by_label = arms_split(100, arms={"A": [0, 1], "B": [3]}, labels=y, seed=0)
    assert set(y[np.concatenate([by_label["A/train"], by_label["A/val"]])]) == {0, 1}
    assert by_label.manifest["unassigned"] == 40
    site = np.repeat(["x", "y", "z", "w"], 25)
    shared = arms_split(
        100,
        arms={"A": ["x"], "B": lambda s: s == "y"},
        by="column",
        column=site,
        shared_val=True,
        val_ratio=0.2,
        seed=0,
    )
    assert set(shared.parts) == {"val", "A/train", "B/train"}
    assert set(site[shared["val"]]) <= {"x", "y"} and shared["val"].size == 10


def test_millions_of_labels_balance():
    """Not a timing assertion (benchmarks/ times 10M labels against sklearn): large inputs stay exact."""
    y = np.random.default_rng(0).integers(0, 10, 2_000_000).astype(np.int64)
    folds = assign_folds(y.size, 5, 0, labels=y, stratify=True)
    counts = np.bincount(folds * 10 + y, minlength=50).reshape(5, 10)
    assert np.abs(counts - np.bincount(y) / 5).max() < 1


# ------------------------------------------------------------------------------------------- refused specs


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda: kfold_split(10, k=1), "`k`"),
        (lambda: kfold_split(10, k=11), "lower `k`"),
        (lambda: kfold_split(10, k=5, fold=5), "`fold`"),
        (lambda: kfold_split(10, k=5, fold=-1), "`fold`"),
        (lambda: kfold_split(12, k=5, labels=[0] * 10 + [1] * 2, stratify=True), "lower `k`"),
        (lambda: holdout_split(10, ratios={"train": 0.9, "val": 0.2}), "`ratios`"),
        (lambda: holdout_split(10, ratios={"train": 1.0, "val": 0.0}), "`ratios`"),
        (lambda: holdout_split(10, ratios={"train": 1.2, "val": -0.2}), "`ratios`"),
        (lambda: holdout_split(10, stratify=True), "`labels`"),
        (lambda: holdout_split(10, labels=[0] * 9), "`labels`"),
        (lambda: kfold_split(10, k=2, groups=[0] * 9), "`groups`"),
        (lambda: kfold_split(10, k=3, groups=[0] * 5 + [1] * 5), "lower `k`"),
        (lambda: arms_split(10, arms={"A": [0, 1], "B": [1]}, labels=np.arange(10) % 3), "`arms`"),
        (lambda: arms_split(10, arms={"A": [0], "B": [5]}, labels=np.arange(10) % 3), "empty"),
        (lambda: arms_split(10, arms={"A": [0]}), "`labels`"),
        (lambda: holdout_split(4, ratios={"train": 0.9, "val": 0.05, "test": 0.05}), "empty"),
        (lambda: make_split(10, "bootstrap"), "`split`"),
        (lambda: make_split(10, "kfold", k=2, ratio=0.5), "kfold"),
        (lambda: kfold_split(10, k=2, seed=-1), "`seed`"),
    ],
)
def test_bad_specs_are_refused_naming_the_option(call, option):
    with pytest.raises(SplitSpecError) as err:
        call()
    assert isinstance(err.value, ValueError)
    assert option in str(err.value)


def test_class_smaller_than_k_is_refused_where_sklearn_only_warns():
    with pytest.raises(SplitSpecError, match="1: 2"):
        kfold_split(12, k=5, labels=[0] * 10 + [1] * 2, stratify=True)
