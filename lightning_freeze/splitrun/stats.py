"""The statistics of a sweep summary: mean with a Student-t confidence interval, and the paired t-test.

Thin wrappers over ``scipy.stats`` (``t.ppf``, ``ttest_rel`` and its confidence interval) that return plain
JSON-ready dicts and say why a number is missing instead of returning ``inf`` or ``nan``: one value has no
spread, and pairs that all differ by the same amount have no t statistic. scipy is imported on first use,
so this module imports in milliseconds.

>>> [round(x, 4) for x in describe([0.80, 0.82, 0.84])["ci95"]]  # 0.82 -+ t(0.975, 2) * 0.02 / sqrt(3)
[0.7703, 0.8697]
>>> paired([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])["note"]
'zero variance: every pair differs by exactly 0.5, so there is no t statistic'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["describe", "paired"]

# Differences equal to within this relative tolerance are one difference: 0.85 - 0.80 and 0.95 - 0.90 differ
# only by float rounding, and a t statistic from that rounding noise would be meaningless.
_SAME = 1e-9


def describe(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """n, mean, sample std (ddof=1), and the ``level`` CI of the mean from Student's t (None below 2 values).

    Args:
        values: the replicates' values.
        level: the confidence level of the interval.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    out: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci95": None, "values": vals}
    if n == 0:
        return out
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n >= 2:
        from scipy import stats

        std = statistics.stdev(vals)
        half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n)
        out["std"], out["ci95"] = std, [mean - half, mean + half]
    return out


def paired(baseline: Sequence[float], other: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Paired comparison ``other - baseline``: mean difference, its CI, t statistic and two-sided p-value.

    With fewer than two pairs, or pairs that all differ by the same amount (zero variance, up to float
    rounding), ``t`` and ``p_value`` are None and ``note`` says why.

    Args:
        baseline: the baseline's values, one per pair.
        other: the other condition's values, in the same pair order.
        level: the confidence level of the difference's interval.
    """
    if len(baseline) != len(other):
        raise ValueError("paired samples must have the same length")
    diffs = [float(o) - float(b) for b, o in zip(baseline, other, strict=True)]
    out = describe(diffs, level)
    out["mean_diff"] = out.pop("mean")
    out.update(t=None, p_value=None, note=None)
    n = len(diffs)
    if n < 2:
        out["note"] = f"{n} pair(s): no spread to test"
        return out
    if max(diffs) - min(diffs) <= _SAME * max(1.0, max(abs(d) for d in diffs)):
        out["note"] = (
            f"zero variance: every pair differs by exactly {out['mean_diff']:.6g}, so there is no t statistic"
        )
        return out
    from scipy import stats

    test = stats.ttest_rel(other, baseline)
    low, high = test.confidence_interval(confidence_level=level)
    out.update(t=float(test.statistic), p_value=float(test.pvalue), ci95=[float(low), float(high)])
    return out
