"""Gradient noise scale estimation from two batch sizes.

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training", App. A.1.
For a gradient G_B averaged over B independent samples, E|G_B|^2 = |G|^2 + tr(Sigma)/B, with G the
true gradient and Sigma the per-example gradient covariance. Two batch sizes b < B give unbiased
estimates of both terms::

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

The ratio of the two is biased, so each is smoothed by its own bias-corrected EMA and only the
smoothed values are divided: B_simple = tr(Sigma) / |G|^2.

With k micro-batches of size b accumulated into one step of B = k b, ``|G_b|^2`` is the mean of the
k micro-batch norms (each is an unbiased draw of E|G_b|^2) and ``|G_B|^2`` is the norm of the
accumulated gradient.
"""

from __future__ import annotations

import math
from typing import Any


def unbiased_grad_sq(small_sq: float, big_sq: float, b: float, big_b: float) -> float:
    """Unbiased estimate of |G|^2 from mean |G_b|^2 and |G_B|^2 (b < B).

    Example:
        >>> # |G|^2 = 1, tr(Sigma) = 100: E|G_10|^2 = 11, E|G_100|^2 = 2
        >>> unbiased_grad_sq(11.0, 2.0, 10, 100)
        1.0
    """
    _check_sizes(b, big_b)
    return (big_b * big_sq - b * small_sq) / (big_b - b)


def unbiased_trace_sigma(small_sq: float, big_sq: float, b: float, big_b: float) -> float:
    """Unbiased estimate of tr(Sigma) from mean |G_b|^2 and |G_B|^2 (b < B).

    Example:
        >>> round(unbiased_trace_sigma(11.0, 2.0, 10, 100), 9)
        100.0
    """
    _check_sizes(b, big_b)
    return (small_sq - big_sq) / (1.0 / b - 1.0 / big_b)


def _check_sizes(b: float, big_b: float) -> None:
    if not 0 < b < big_b:
        raise ValueError(f"need 0 < b < B for the two-batch estimator, got b={b}, B={big_b}")


class BiasCorrectedEMA:
    """Exponential moving average with Adam-style bias correction, and its standard error.

    m_t = decay m_{t-1} + (1 - decay) x_t and value = m_t / (1 - decay^t), so early values are not
    pulled toward zero. ``decay=0`` keeps the last value only.

    The value is a weighted mean with weights w_i = (1 - decay) decay^(t-i) / (1 - decay^t); for
    independent x_i its variance is Var(x) * sum w_i^2, with Var(x) from the same weights applied to
    x^2. ``stderr`` is its square root (inf until two values are in).

    Example:
        >>> ema = BiasCorrectedEMA(0.9)
        >>> ema.update(5.0); ema.value
        5.0
    """

    def __init__(self, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.mean = 0.0
        self.mean_sq = 0.0
        self.weight = 0.0  # 1 - decay^t, kept directly to avoid pow on every update
        self.weight_sq = 0.0  # sum of squared raw weights (1 - decay)^2 decay^(2(t-i))

    def update(self, x: float) -> None:
        d = self.decay
        self.mean = d * self.mean + (1.0 - d) * x
        self.mean_sq = d * self.mean_sq + (1.0 - d) * x * x
        self.weight = d * self.weight + (1.0 - d)
        self.weight_sq = d * d * self.weight_sq + (1.0 - d) ** 2

    @property
    def value(self) -> float:
        return self.mean / self.weight if self.weight > 0 else math.nan

    @property
    def stderr(self) -> float:
        if self.weight <= 0:
            return math.nan
        share = self.weight_sq / self.weight**2  # sum of normalised squared weights, 1/n_eff
        if share >= 1.0 - 1e-12:
            return math.inf
        mean = self.value
        var = max(self.mean_sq / self.weight - mean * mean, 0.0) / (1.0 - share)  # unbiased weighted variance
        return math.sqrt(var * share)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "mean_sq": self.mean_sq, "weight": self.weight, "weight_sq": self.weight_sq}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.mean_sq = state["mean"], state["mean_sq"]
        self.weight, self.weight_sq = state["weight"], state["weight_sq"]


class NoiseScaleEstimator:
    """Smoothed |G|^2, tr(Sigma) and B_simple from (mean |G_b|^2, |G_B|^2) measurements.

    Non-finite measurements (overflowed AMP steps, NaN losses) are rejected and counted; they never
    touch the averages.

    Example:
        >>> est = NoiseScaleEstimator(ema_decay=0.0)
        >>> est.update(small_sq=11.0, big_sq=2.0, b=10, big_b=100)
        True
        >>> round(est.b_simple, 6)
        100.0
    """

    def __init__(self, ema_decay: float = 0.9) -> None:
        self.grad_sq_ema = BiasCorrectedEMA(ema_decay)
        self.trace_ema = BiasCorrectedEMA(ema_decay)
        self.measurements = 0
        self.rejected = 0

    def update(self, small_sq: float, big_sq: float, b: float, big_b: float) -> bool:
        """Fold in one measurement; return False (and count it) if it was non-finite."""
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            self.rejected += 1
            return False
        self.grad_sq_ema.update(unbiased_grad_sq(small_sq, big_sq, b, big_b))
        self.trace_ema.update(unbiased_trace_sigma(small_sq, big_sq, b, big_b))
        self.measurements += 1
        return True

    @property
    def grad_sq(self) -> float:
        return self.grad_sq_ema.value

    @property
    def trace_sigma(self) -> float:
        return self.trace_ema.value

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the smoothed terms; inf when |G|^2 <= 0, nan before any data."""
        g, tr = self.grad_sq, self.trace_sigma
        if math.isnan(g) or math.isnan(tr):
            return math.nan
        if g <= 0:
            return math.inf
        return max(tr, 0.0) / g

    def b_simple_bounds(self, z: float = 1.0) -> tuple[float, float]:
        """A conservative z-sigma interval for B_simple from the two terms' standard errors.

        tr(Sigma) and |G|^2 are each moved z standard errors toward the unfavourable side; the
        bounds are the ratios of those extremes (wider than the delta method, never narrower).
        Before any data: (nan, nan). With z = 0: the point estimate twice.
        """
        g, tr = self.grad_sq, self.trace_sigma
        if math.isnan(g) or math.isnan(tr):
            return math.nan, math.nan
        sg, st = z * self.grad_sq_ema.stderr, z * self.trace_ema.stderr
        if z == 0:
            sg = st = 0.0
        g_lo, g_hi = g - sg, g + sg
        t_lo, t_hi = max(tr - st, 0.0), max(tr + st, 0.0)
        low = t_lo / g_hi if g_hi > 0 else math.inf
        high = t_hi / g_lo if g_lo > 0 else math.inf
        return low, high

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_sq_ema": self.grad_sq_ema.state_dict(),
            "trace_ema": self.trace_ema.state_dict(),
            "measurements": self.measurements,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_sq_ema.load_state_dict(state["grad_sq_ema"])
        self.trace_ema.load_state_dict(state["trace_ema"])
        self.measurements = state["measurements"]
        self.rejected = state["rejected"]
