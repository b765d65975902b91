"""Splitter objects: property tests (hypothesis), scikit-learn parity, determinism across processes, manifests.
Pure numpy, microseconds per case. Refused parameters are in test_bad_input.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_freeze.splitrun.assign import stratified_kfold
from lightning_freeze.splitrun.splitters import (
    Arms,
    GroupKFold,
    Holdout,
    KFold,
    RepeatedKFold,
    SplitSpecError,
    StratifiedGroupKFold,
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


def _assert_partition(parts, n, expect_cover=True):
    arrays = list(parts.parts.values())
    union = np.concatenate(arrays)
    assert np.unique(union).size == union.size, "parts overlap"
    if expect_cover:
        assert union.size == n
    for idx in arrays:
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


@given(labels=labelled(min_per_class=5), k=st.integers(2, 5), seed=st.integers(0, 1000))
def test_stratified_folds_partition_and_balance_every_class(labels, k, seed):
    n = labels.size
    folds = [KFold(k=k, fold=f, stratify=True).split(n, labels=labels, seed=seed) for f in range(k)]
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
    parts = Holdout(ratios=ratios, stratify=True).split(n, labels=labels, seed=seed)
    _assert_partition(parts, n)
    for name, r in ratios.items():
        assert abs(parts[name].size - n * r) < 1
        for c in np.unique(labels):
            n_c = int((labels == c).sum())
            assert abs(int((labels[parts[name]] == c).sum()) - n_c * r) < 2


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
    splitter = StratifiedGroupKFold if stratify else GroupKFold
    try:
        runs = [splitter(k=k, fold=f).split(n, groups=groups, labels=labels, seed=seed) for f in range(k)]
    except SplitSpecError as err:  # a fold can be empty with few, large groups: refused, never silent
        assert "empty" in str(err) or "groups" in str(err)
        return
    for parts in runs:
        _assert_partition(parts, n)
        assert not set(groups[parts["train"]]) & set(groups[parts["val"]])
    vals = np.concatenate([p["val"] for p in runs])
    assert np.array_equal(np.sort(vals), np.arange(n))
    hold = Holdout(ratios=[0.5, 0.5], grouped=True).split(n, groups=groups, seed=seed)
    assert not set(groups[hold["train"]]) & set(groups[hold["val"]])


@given(n=st.integers(2, 500), seed=st.integers(0, 10_000))
def test_deterministic_for_a_seed_and_seed_changes_the_split(n, seed):
    a = KFold(k=2, fold=0).split(n, seed=seed)
    b = KFold(k=2, fold=0).split(n, seed=seed)
    assert a.hashes == b.hashes and a.manifest == b.manifest
    if n >= 20:  # 2-fold over 20+ samples: two seeds agreeing is a ~1e-5 coincidence
        assert KFold(k=2, fold=0).split(n, seed=seed + 1).hashes != a.hashes


@pytest.mark.parametrize(("n", "k"), [(10, 3), (7, 7), (101, 5), (12, 4)])
def test_unshuffled_kfold_equals_scikit_learn(n, k):
    from sklearn.model_selection import KFold as SkKFold

    theirs = [val for _, val in SkKFold(n_splits=k, shuffle=False).split(np.zeros((n, 1)))]
    ours = [KFold(k=k, fold=f, shuffle=False).split(n, seed=123)["val"] for f in range(k)]
    assert [v.tolist() for v in ours] == [v.tolist() for v in theirs]


def test_repeated_kfold_repeats_differ_and_each_tiles_the_data():
    y = np.arange(60) % 3
    repeats = []
    for r in range(3):
        runs = [
            RepeatedKFold(k=4, n_repeats=3, repeat=r, fold=f, stratify=True, test_ratio=0.2).split(
                60, labels=y, seed=7
            )
            for f in range(4)
        ]
        vals = np.concatenate([p["val"] for p in runs])
        tests = {tuple(p["test"]) for p in runs}
        assert len(tests) == 1 and np.unique(vals).size == vals.size == 48  # 60 - 12 test samples, tiled once
        repeats.append((tuple(runs[0]["val"]), tests.pop()))
    assert len({val for val, _ in repeats}) == 3  # every repeat has its own folds
    assert len({test for _, test in repeats}) == 1  # ... and the same test part
    assert RepeatedKFold(k=4, n_repeats=3, repeat=1).spec()["repeat"] == 1


def test_split_is_the_same_in_another_process_with_another_hash_seed():
    """Nothing depends on the process: PYTHONHASHSEED, world size or rank env vars change nothing."""
    code = (
        "import json, numpy as np; from lightning_freeze.splitrun.splitters import KFold;"
        "y = np.arange(500) % 7; print(json.dumps(KFold(k=5, fold=3, stratify=True).split(500, labels=y, seed=11)"
        ".hashes))"
    )
    here = KFold(k=5, fold=3, stratify=True).split(500, labels=np.arange(500) % 7, seed=11).hashes
    env = {**os.environ, "PYTHONHASHSEED": "123", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout) == here


def test_string_labels_and_manifest_class_counts():
    labels = np.array(["cat", "dog", "eel"] * 10)
    parts = KFold(k=5, fold=1, stratify=True).split(30, labels=labels, seed=0)
    assert parts.manifest["parts"]["val"]["class_counts"] == {"cat": 2, "dog": 2, "eel": 2}
    assert parts.manifest["parts"]["train"]["size"] == 24
    assert parts.manifest["spec"] == {
        "kind": "KFold",
        "k": 5,
        "fold": 1,
        "stratify": True,
        "shuffle": True,
        "test_ratio": 0.0,
    }
    json.dumps(parts.manifest)  # JSON-ready


def test_kfold_test_part_is_the_same_for_every_fold():
    y = np.arange(200) % 4
    runs = [KFold(k=4, fold=f, stratify=True, test_ratio=0.2).split(200, labels=y, seed=5) for f in range(4)]
    assert all(np.array_equal(p["test"], runs[0]["test"]) for p in runs)
    assert runs[0]["test"].size == 40 and runs[0].role("test") is runs[0]["test"]
    for p in runs:
        _assert_partition(p, 200)


def test_stratified_kfold_matches_sklearn_shape_and_balance():
    y = np.random.default_rng(0).integers(0, 10, 5000)
    ours = stratified_kfold(y, 5, seed=0)
    assert len(ours) == 5
    for train, val in ours:
        assert train.size + val.size == 5000 and not np.intersect1d(train, val).size
        assert np.abs(np.bincount(y[val], minlength=10) - np.bincount(y, minlength=10) / 5).max() < 1


def test_arms_by_ratio_label_column_and_predicate():
    y = np.arange(100) % 5
    by_ratio = Arms(arms={"A": 0.5, "B": 0.5}, stratify=True).split(100, labels=y, seed=0)
    _assert_partition(by_ratio, 100)
    assert set(by_ratio.parts) == {"A/train", "A/val", "B/train", "B/val"}
    assert by_ratio.roles == {"train": "A/train", "val": "A/val"}
    by_label = Arms(arms={"A": [0, 1], "B": [3]}, arm="B").split(100, labels=y, seed=0)
    assert set(y[np.concatenate([by_label["A/train"], by_label["A/val"]])]) == {0, 1}
    assert set(y[by_label.role("train")]) == {3} and by_label.manifest["unassigned"] == 40
    assert by_label.spec["arms"] == {"A": [0, 1], "B": [3]} and "arm" not in by_label.spec
    site = np.repeat(["x", "y", "z", "w"], 25)
    shared = Arms(
        arms={"A": ["x"], "B": lambda s: s == "y"}, column="site", shared_val=True, val_ratio=0.2
    ).split(100, seed=0, column=site)
    assert set(shared.parts) == {"val", "A/train", "B/train"}
    assert set(site[shared["val"]]) <= {"x", "y"} and shared["val"].size == 10
    assert shared.roles["val"] == "val"


def test_every_arm_of_one_split_has_the_same_manifest_parts():
    """Arms A and B of one seed are the same split (so a sweep over `arm` pairs them); only the role differs."""
    y = np.arange(90) % 3
    a, b = (Arms(arms={"A": [0], "B": [1, 2]}, arm=arm).split(90, labels=y, seed=4) for arm in ("A", "B"))
    assert a.hashes == b.hashes and a.manifest == b.manifest and a.roles != b.roles


def test_arms_from_omegaconf_containers():
    """What Hydra passes without _convert_: DictConfig/ListConfig. Label lists used to crash in `_key`."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"arms": {"A": [0, 1], "B": [2, 3, 4]}})
    parts = Arms(arms=node.arms, arm="A").split(50, labels=np.arange(50) % 5, seed=0)
    assert parts.spec["arms"] == {"A": [0, 1], "B": [2, 3, 4]}
    ratios = OmegaConf.create({"r": [0.7, 0.3]}).r
    assert Holdout(ratios=ratios).ratios == {"train": 0.7, "val": 0.3}


def test_splitters_are_frozen_and_print_their_parameters():
    splitter = KFold(k=3, fold=2, stratify=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        splitter.fold = 1  # type: ignore[misc]
    assert repr(splitter) == "KFold(k=3, fold=2, test_ratio=0.0, stratify=True, shuffle=True)"
    assert dataclasses.replace(splitter, fold=0).fold == 0
    assert Holdout().ratios == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert Arms().arms == {"A": 0.5, "B": 0.5} and Arms().by == "ratio"


def test_millions_of_labels_balance():
    """Not a timing assertion (benchmarks/ times 10M labels against sklearn): large inputs stay exact."""
    y = np.random.default_rng(0).integers(0, 10, 2_000_000).astype(np.int64)
    parts = KFold(k=5, fold=2, stratify=True).split(y.size, labels=y, seed=0)
    counts = np.bincount(y[parts["val"]], minlength=10)
    assert np.abs(counts - np.bincount(y) / 5).max() < 1


def test_class_smaller_than_k_is_refused_where_sklearn_only_warns():
    with pytest.raises(SplitSpecError, match="1: 2"):
        KFold(k=5, stratify=True).split(12, labels=[0] * 10 + [1] * 2)
