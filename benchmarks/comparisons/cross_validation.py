"""Cross-validation to a decision: the sweep report's speed on a nested sweep, and the out-of-fold merge.

1. The report (``write_summary``) on the results of a 5 x 3 nested cross-validation of 10 conditions
   (150 jobs: metrics.json, split_manifest.json and .hydra/overrides.yaml each, as the app writes them), with
   and without summary.png. Target: under 2 s without the plot.
2. Merging the out-of-fold predictions of a 5-fold sweep over many samples (10-class float32 logits, one
   predictions.val.npz per fold) into dataset order: ``lightning_freeze.splitrun.oof_predictions`` (which also
   checks every fold's rows against its split manifest) against a plain numpy baseline that loads the same
   files, concatenates them and sorts by index. Both outputs are compared.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import BenchContext, Contender, Result, Table, alternate, comparison, now

OUTER_K, INNER_K, CONDITIONS = 5, 3, 10
OOF_K, CLASSES = 5, 10


def write_nested_sweep(root: Path, n: int = 1500) -> int:
    """A 5 x 3 nested sweep of 10 conditions as the app leaves it; returns the number of jobs."""
    import yaml

    from lightning_freeze.splitrun import NestedKFold

    rng = np.random.default_rng(0)
    labels = np.arange(n) % 5
    manifests = {
        (o, i): {
            **(p := NestedKFold(OUTER_K, INNER_K, o, i, stratify=True).split(n, labels, seed=0)).manifest,
            "roles": dict(p.roles),
        }
        for o in range(OUTER_K)
        for i in range(INNER_K)
    }
    num = 0
    for c in range(CONDITIONS):
        for (outer, inner), manifest in manifests.items():
            job = root / str(num)
            (job / ".hydra").mkdir(parents=True)
            overrides = [
                f"freeze.t0={0.5 + 0.05 * c:.2f}",
                f"split.outer_fold={outer}",
                f"split.inner_fold={inner}",
            ]
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            acc = 0.8 + 0.01 * c + 0.01 * rng.standard_normal()
            metrics = {"val/acc": acc, "val/loss": 1 - acc, "test/acc": acc - 0.02, "test/loss": 1.02 - acc}
            (job / "metrics.json").write_text(
                json.dumps(
                    {"status": "ok", "metrics": metrics, "seed": 0, "overrides": overrides, "fit_time_s": 1.0}
                )
            )
            (job / "split_manifest.json").write_text(json.dumps(manifest))
            num += 1
    return num


def write_oof_sweep(root: Path, n: int) -> None:
    """A 5-fold sweep's jobs with predictions.val.npz (10-class float32 logits) and their manifests."""
    from lightning_freeze.splitrun import KFold
    from lightning_freeze.splitrun.assign import part_hash

    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, size=n)
    for fold in range(OOF_K):
        parts = KFold(k=OOF_K, fold=fold).split(n, labels, seed=0)
        job = root / str(fold)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- split=kfold\n- split.fold={fold}\n")
        (job / "metrics.json").write_text(
            json.dumps({"status": "ok", "metrics": {"val/acc": 0.9}, "seed": 0})
        )
        (job / "split_manifest.json").write_text(json.dumps({**parts.manifest, "roles": dict(parts.roles)}))
        val = parts["val"]
        np.savez(
            job / "predictions.val.npz",
            index=val,
            target=labels[val],
            output=rng.standard_normal((val.size, CLASSES)).astype(np.float32),
            kind=np.str_("logits"),
            part_sha256=np.str_(part_hash(val)),
        )


def numpy_merge(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain way: load every fold's file, concatenate, sort by dataset index."""
    loaded = [np.load(path) for path in sorted(root.glob("*/predictions.val.npz"))]
    index = np.concatenate([f["index"] for f in loaded])
    order = np.argsort(index)
    output = np.concatenate([f["output"] for f in loaded])[order]
    target = np.concatenate([f["target"] for f in loaded])[order]
    return index[order], target, output


@comparison("cross_validation", "Cross-validation to a decision: report and OOF merge", order=45)
def run(ctx: BenchContext) -> Result:
    from lightning_freeze.splitrun import oof_predictions
    from lightning_freeze.splitrun.report import write_summary

    rounds = ctx.n_rounds(1, 5)
    n_oof = ctx.pick(200_000, 1_000_000)
    result = Result(
        description=(
            f"The sweep report on a {OUTER_K}x{INNER_K} nested sweep of {CONDITIONS} conditions "
            f"({OUTER_K * INNER_K * CONDITIONS} jobs; target < 2 s), and merging the out-of-fold predictions of a "
            f"{OOF_K}-fold sweep of {n_oof:,} samples ({CLASSES}-class float32 logits) into dataset order."
        ),
        config={"rounds": rounds, "oof_samples": n_oof, "jobs": OUTER_K * INNER_K * CONDITIONS},
    )
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "nested"
        jobs = write_nested_sweep(sweep)
        info: dict[str, str] = {}

        def report(with_plot: bool):
            def run_round() -> float:
                t0 = now()
                summary = write_summary(sweep, with_plot=with_plot)
                dt = now() - t0
                folds = (summary.get("nested") or {}).get("outer_folds") or []
                info["check"] = "ok" if summary["n_ok"] == jobs and len(folds) == OUTER_K else "wrong"
                return dt

            return run_round

        contenders = [
            Contender("write_summary, no plot", report(False), note="summary.json + summary.md", info=info),
            Contender("write_summary with summary.png", report(True), note="+ matplotlib figure", info=info),
        ]
        ctx.log(f"  report on {jobs} jobs, {rounds} rounds")
        ms = alternate(contenders, rounds=rounds, warmup_rounds=1, log=ctx.log)
        result.tables.append(
            Table.build(
                f"report on a {OUTER_K}x{INNER_K} nested sweep, {jobs} jobs (target < 2 s without the plot)",
                ms,
                baseline="write_summary with summary.png",
                unit="s",
                label="time",
                extra_columns={"check": lambda m: m.extra.get("check", "n/a"), "writes": lambda m: m.note},
            )
        )

        oof_dir = Path(tmp) / "oof"
        write_oof_sweep(oof_dir, n_oof)
        merge_info: dict[str, str] = {}
        reference = numpy_merge(oof_dir)

        def ours() -> float:
            t0 = now()
            oof = oof_predictions(oof_dir)
            dt = now() - t0
            same = np.array_equal(oof.index, reference[0]) and np.array_equal(oof.output, reference[2])
            merge_info["check"] = "ok" if same else "wrong"
            return dt

        def baseline() -> float:
            t0 = now()
            numpy_merge(oof_dir)
            return now() - t0

        merge = [
            Contender(
                "oof_predictions (ours)",
                ours,
                note="scatter into dataset order; checks every fold against its manifest",
                info=merge_info,
            ),
            Contender(
                "numpy concatenate + argsort", baseline, note="np.load, np.concatenate, np.argsort", info={}
            ),
        ]
        ctx.log(f"  OOF merge of {n_oof:,} samples, {rounds} rounds")
        ms = alternate(merge, rounds=rounds, warmup_rounds=1, log=ctx.log)
        result.tables.append(
            Table.build(
                f"OOF merge, {n_oof:,} samples, {OOF_K} folds",
                ms,
                baseline="numpy concatenate + argsort",
                unit="s",
                label="time",
                extra_columns={
                    "check": lambda m: m.extra.get("check", "same as ours"),
                    "how": lambda m: m.note,
                },
            )
        )
    return result
