"""Splits: a stratified 5-fold split of many labels, ours against scikit-learn's ``StratifiedKFold``.

Both produce the same thing: for each of the 5 folds, the (train indices, validation indices) arrays.
Each round times one complete split; the output is also checked (folds partition the samples, every
class is spread over the folds with floor/ceil counts), so a fast but wrong split cannot win.
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import BenchContext, Contender, Result, Table, alternate, comparison, now

K = 5
N_CLASSES = 10


def make_labels(n: int, seed: int = 0) -> np.ndarray:
    """``n`` labels over 10 classes with skewed frequencies (the largest class ~10x the smallest)."""
    rng = np.random.default_rng(seed)
    p = np.linspace(1.0, 10.0, N_CLASSES)
    return rng.choice(N_CLASSES, size=n, p=p / p.sum()).astype(np.int64)


def check_folds(folds, labels: np.ndarray, k: int = K) -> str:
    """ "ok" when the folds partition 0..n-1 and each holds floor/ceil of n_c/k of every class c."""
    n = labels.shape[0]
    if len(folds) != k:
        return f"wrong: {len(folds)} folds"
    seen = np.zeros(n, dtype=np.int64)
    counts = np.bincount(labels, minlength=N_CLASSES)
    for train, val in folds:
        seen[val] += 1
        if train.size + val.size != n:
            return "wrong: train + val != n"
        per_class = np.bincount(labels[val], minlength=N_CLASSES)
        if np.any(per_class < counts // k) or np.any(per_class > -(-counts // k)):
            return "wrong: not stratified"
    if not np.all(seen == 1):
        return "wrong: validation parts do not partition the samples"
    return "ok"


def ours(labels: np.ndarray):
    from lightning_freeze.splitrun.assign import stratified_kfold

    return stratified_kfold(labels, K, seed=0)


def sklearn(labels: np.ndarray):
    from sklearn.model_selection import StratifiedKFold

    X = np.empty((labels.shape[0], 1), dtype=np.uint8)
    return list(StratifiedKFold(n_splits=K, shuffle=True, random_state=0).split(X, labels))


@comparison("splits", "Splits: stratified 5-fold of many labels", order=40)
def run(ctx: BenchContext) -> Result:
    n = ctx.pick(1_000_000, 10_000_000)
    rounds = ctx.n_rounds(3, 5)
    labels = make_labels(n)

    def timed(name, fn, note) -> Contender:
        info: dict[str, str] = {}

        def run_round() -> float:
            t0 = now()
            folds = fn(labels)
            dt = now() - t0
            info["check"] = check_folds(folds, labels)
            return dt

        return Contender(name, run_round, note=note, info=info)

    contenders = [
        timed(
            "lightning_freeze stratified_kfold (ours)",
            ours,
            "lightning_freeze.splitrun.assign.stratified_kfold(labels, 5, seed=0)",
        ),
        timed(
            "scikit-learn StratifiedKFold",
            sklearn,
            "list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, labels))",
        ),
    ]
    ctx.log(f"  {n:,} labels, {rounds} rounds")
    ms = alternate(contenders, rounds=rounds, warmup_rounds=1, log=ctx.log)
    result = Result(
        description=(
            f"Time to compute all {K} (train, validation) index pairs of a stratified {K}-fold split "
            f"of {n:,} integer labels (10 classes, skewed frequencies)."
            + (" Quick mode uses 1 million labels; the full suite uses 10 million." if ctx.quick else "")
        ),
        config={"n_labels": n, "k": K, "classes": N_CLASSES, "rounds": rounds, "warmup_rounds": 1},
    )
    result.tables.append(
        Table.build(
            f"{n:,} labels",
            ms,
            baseline="scikit-learn StratifiedKFold",
            unit="s",
            label="time",
            extra_columns={"output check": lambda m: m.extra.get("check", "n/a"), "call": lambda m: m.note},
        )
    )
    return result
