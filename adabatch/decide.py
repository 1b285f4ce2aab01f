"""Deciding the next batch size: a test on the decision itself, evidence, and no thrashing.

A policy maps a noise scale phi to a target batch (``target_factor x phi`` for the noise policy;
goodput and energy policies combine phi with a throughput profile). Every target is non-decreasing
in phi, so the noise scale's confidence interval [phi_low, phi_high] maps to a confident range of
targets. The batch B

- grows when even target(phi_low) >= grow_threshold x B, to min(target(phi_low), max_change x B);
- shrinks when even target(phi_high) <= shrink_threshold x B, to max(target(phi_high), B / max_change);
- otherwise stays.

For the noise policy this is a test of the decision itself: target(phi_low) >= g B is the same as
rejecting B_simple <= g B / target_factor, i.e. tr(Sigma) - (g B / target_factor) |G|^2 <= 0, a
statistic linear in the two smoothed terms (Fieller's interval is the set of ratios such a test
accepts). It needs no division by a noisy |G|^2, which is what made the ratio of two EMAs swing
(the norm test of Byrd, Chin, Nocedal and Wu 2012 asks the same question of a single batch; here it
is asked of the window's means, with their standard errors). When |G|^2 cannot be resolved,
phi_high is inf, phi_low is still a confident lower bound, and the batch grows on it.

Moving to B' >= g B and moving back only below s B' with s < 1 / g keeps a noisy estimate from
flipping the batch back and forth (hysteresis). Patience and cooldown are counted in samples.

Evidence (:mod:`adabatch.progress`): a growth after which the loss decrease per sample fell
significantly below ``min_efficiency`` of what it was before (including a loss that rose) is
reverted, and the batch that failed becomes a ceiling until the run has twice as many samples.
That check waits for a window of samples; a growth in use when the step loss suddenly climbs
(:class:`~adabatch.progress.LossSpike`: a larger learning rate past the curvature's limit) is
undone at the very step ("rescue"), with a ceiling at the geometric mean of the two batches, and
a :attr:`Decider.limit` from the controller keeps later batches' learning rates below theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from adabatch.config import ControllerConfig
from adabatch.noise import NoiseEstimate
from adabatch.progress import Verdict


def snap_down(batch: float, granularity: int, lo: int, hi: int) -> int:
    """Largest multiple of ``granularity`` <= batch, within [lo, hi].

    Example:
        >>> snap_down(100, 32, 32, 4096), snap_down(10, 32, 32, 4096)
        (96, 32)
    """
    return int(min(max(math.floor(batch / granularity) * granularity, lo), hi))


def snap_up(batch: float, granularity: int, lo: int, hi: int) -> int:
    """Smallest multiple of ``granularity`` >= batch, within [lo, hi]."""
    return int(min(max(math.ceil(batch / granularity) * granularity, lo), hi))


@dataclass(frozen=True)
class Change:
    """One batch change: when, from what, to what, and why."""

    samples: int
    step: int
    old: int
    new: int
    reason: str  # "grow", "shrink", "revert" (failed evidence check) or "rescue" (loss rising fast)
    noise: float
    noise_low: float
    noise_high: float


class Decider:
    """Turns noise estimates, targets and verdicts into batch changes (see the module docstring).

    Example:
        >>> from adabatch.noise import NoiseEstimate
        >>> d = Decider(ControllerConfig(), granularity=32, min_batch=32, max_batch=4096)
        >>> est = NoiseEstimate(400.0, 300.0, 550.0, True, 1.0, 400.0, 50.0)
        >>> d.decide(32, samples=4096, step=128, estimate=est, target=lambda phi: 2.0 * phi)
        128
    """

    def __init__(self, config: ControllerConfig, granularity: int, min_batch: int, max_batch: int,
                 full_micro_batch: Callable[[], int] | None = None) -> None:
        self.config = config
        self.granularity, self.min_batch, self.max_batch = granularity, min_batch, max_batch
        # samples (all processes) of the largest micro-batch: above it the batch moves in whole ones
        self.full_micro_batch = full_micro_batch or (lambda: granularity)
        self.last_change: int | None = None  # samples at the last change
        self.pending: tuple[int, int] | None = None  # (direction, samples since which it holds)
        self.ceiling: tuple[int, int] | None = None  # (batch that failed, samples until which it holds)
        self.changes: list[Change] = []
        # the largest batch other limits allow now (the learning rate a rescue found too large)
        self.limit: Callable[[], int] | None = None

    def cap(self, samples: int) -> int:
        """Largest batch allowed now: the bound, below a batch that failed its evidence check, and
        within :attr:`limit` (the learning rate a rescue found too large)."""
        cap = self.max_batch
        if self.ceiling is not None and samples < self.ceiling[1]:
            cap = max(self.ceiling[0] - self.granularity, self.min_batch)
        if self.limit is not None:
            cap = max(min(cap, self.limit()), self.min_batch)
        return cap

    def decide(self, batch: int, samples: int, step: int, estimate: NoiseEstimate,
               target: Callable[[float], float]) -> int:
        """The batch to use from now on, given the estimate and the policy's ``target(phi)``."""
        cfg = self.config
        if estimate.measurements < 2 or not math.isfinite(estimate.low):
            return batch
        if self.last_change is not None and samples - self.last_change < cfg.cooldown_samples:
            return batch
        t_low = target(estimate.low)
        t_high = target(estimate.high) if math.isfinite(estimate.high) else math.inf
        if math.isnan(t_low):
            return batch
        cap = self.cap(samples)
        if t_low >= cfg.grow_threshold * batch and batch < cap:
            direction = 1
            new = self._snap(min(t_low, cfg.max_change_factor * batch), cap, snap_down)
        elif t_high <= cfg.shrink_threshold * batch and batch > self.min_batch:
            direction = -1
            new = self._snap(max(t_high, batch / cfg.max_change_factor), cap, snap_up)
        else:
            self.pending = None
            return batch
        if new == batch:
            self.pending = None
            return batch
        if self.pending is None or self.pending[0] != direction:
            self.pending = (direction, samples)
        if samples - self.pending[1] < cfg.patience_samples:
            return batch
        self._record(samples, step, batch, new, "grow" if direction > 0 else "shrink", estimate)
        return new

    def _snap(self, batch: float, cap: int, snap: Callable[[float, int, int, int], int]) -> int:
        """A multiple of the granularity; above the largest micro-batch, a multiple of it."""
        full = self.full_micro_batch()
        unit = full if batch >= full and full <= cap else self.granularity
        new = snap(batch, unit, self.min_batch, cap)
        return new if new % self.granularity == 0 else snap(batch, self.granularity, self.min_batch, cap)

    def judge(self, batch: int, samples: int, step: int, verdicts: list[Verdict], estimate: NoiseEstimate) -> int:
        """Revert a growth whose evidence failed; returns the batch to use."""
        for v in verdicts:
            if not v.failed or v.new_batch <= v.old_batch or batch < v.new_batch:
                continue
            self.ceiling = (v.new_batch, 2 * max(samples, 1))
            new = snap_down(v.old_batch, self.granularity, self.min_batch, self.max_batch)
            self._record(samples, step, batch, new, "revert", estimate)
            return new
        return batch

    def growth_in_use(self, batch: int) -> Change | None:
        """The last change, if it was a growth to ``batch`` (the batch in use)."""
        last = self.changes[-1] if self.changes else None
        return last if last is not None and last.reason == "grow" and last.new == batch else None

    def rescue(self, batch: int, samples: int, step: int, estimate: NoiseEstimate) -> int:
        """Undo the growth to ``batch`` at once (the loss is rising fast): back to the batch before it,
        with no batch above the geometric mean of the two until the run has twice as many samples
        (the stability limit lies somewhere between them; the controller also keeps the learning rate
        below theirs for the rest of the run, :class:`~adabatch.lr.LRLimit`); cooldown and patience
        do not apply."""
        grown = self.growth_in_use(batch)
        if grown is None:
            return batch
        new = snap_down(grown.old, self.granularity, self.min_batch, self.max_batch)
        limit = max(snap_down(math.sqrt(grown.old * batch), self.granularity, self.min_batch, self.max_batch), new)
        self.ceiling = (limit + self.granularity, 2 * max(samples, 1))  # cap() allows up to ``limit``
        self._record(samples, step, batch, new, "rescue", estimate)
        return new

    def _record(self, samples: int, step: int, old: int, new: int, reason: str, est: NoiseEstimate) -> None:
        self.last_change, self.pending = samples, None
        self.changes.append(Change(samples, step, old, new, reason, est.value, est.low, est.high))

    def state_dict(self) -> dict[str, Any]:
        return {"last_change": self.last_change, "pending": self.pending, "ceiling": self.ceiling,
                "changes": [vars(c).copy() for c in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change = state["last_change"]
        self.pending = tuple(state["pending"]) if state["pending"] is not None else None
        self.ceiling = tuple(state["ceiling"]) if state["ceiling"] is not None else None
        self.changes = [Change(**c) for c in state["changes"]]
