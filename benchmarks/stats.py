"""Medians with 95 % bootstrap intervals over seeds (scipy.stats.bootstrap, percentile method).

With fewer than three finite values there is no interval: ``ci`` is None and the report says so.
With three seeds the percentile interval is coarse (few distinct resamples); read it as a range,
not a precise bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

MIN_SEEDS_FOR_CI = 3
RESAMPLES = 2000


@dataclass
class Estimate:
    median: float
    ci: tuple[float, float] | None
    n: int

    def to_dict(self) -> dict:
        return {"median": self.median, "ci": list(self.ci) if self.ci else None, "n": self.n}


def median_ci(values: Sequence[float], seed: int = 0) -> Estimate:
    """Median of ``values`` and its 95 % bootstrap interval; a non-finite value makes the median inf/nan.

    Example:
        >>> e = median_ci([1.0, 2.0, 3.0, 4.0])
        >>> e.median, e.ci[0] <= e.median <= e.ci[1]
        (2.5, True)
    """
    a = np.asarray(values, dtype=float)
    if len(a) == 0:
        return Estimate(math.nan, None, 0)
    med = float(np.median(a))
    if len(a) < MIN_SEEDS_FOR_CI or not np.all(np.isfinite(a)):
        return Estimate(med, None, len(a))
    if np.all(a == a[0]):
        return Estimate(med, (med, med), len(a))
    res = stats.bootstrap((a,), np.median, confidence_level=0.95, n_resamples=RESAMPLES, method="percentile",
                          rng=np.random.default_rng(seed))
    return Estimate(med, (float(res.confidence_interval.low), float(res.confidence_interval.high)), len(a))


def ratio_ci(num: Sequence[float], den: Sequence[float], seed: int = 0) -> Estimate:
    """median(num) / median(den) with a paired (same seeds) 95 % bootstrap interval.

    Example:
        >>> round(ratio_ci([2.0, 4.0, 6.0], [4.0, 8.0, 12.0]).median, 3)
        0.5
    """
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return Estimate(math.nan, None, 0)
    with np.errstate(invalid="ignore"):  # inf / inf (neither reached): nan, which the reports print as n/a
        med = float(np.median(a) / np.median(b))
    n = min(len(a), len(b))
    if len(a) != len(b) or n < MIN_SEEDS_FOR_CI or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return Estimate(med, None, n)

    def stat(x, y, axis=-1):
        return np.median(x, axis=axis) / np.median(y, axis=axis)

    res = stats.bootstrap((a, b), stat, paired=True, vectorized=True, confidence_level=0.95,
                          n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Estimate(med, (min(lo, med), max(hi, med)), n)
