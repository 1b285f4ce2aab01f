"""Measured training progress per sample, to check a batch change against evidence.

The noise-scale model (McCandlish et al. 2018) predicts what a larger batch costs in samples; it can
be wrong (Merrill et al. 2025 found the noise scale an unreliable proxy for the critical batch), and
a larger batch with a linearly scaled learning rate can be unstable. :class:`ProgressTracker` keeps
every step's training loss and, after each batch change, compares the loss decrease per sample in
the window after the change with the window of the same length before it:

    E = (loss decrease per sample after) / (loss decrease per sample before)

Each slope is a weighted least-squares fit of step loss against samples (weights = samples per
step, since a step's loss is a mean over its samples), with its standard error from the residuals.
A change fails when E is significantly below ``min_efficiency`` (by ``z`` standard errors of the
difference), which includes the loss going up. The test is one-sided and deliberately coarse: a
step loss is noisy, so only a growth that at least halves progress (the default) is detected with a
few thousand samples on each side. Because progress per sample falls as training goes on, a short
window before a change slightly favours the old batch; requiring a large, significant drop keeps
that bias from reverting sound changes.

Example:
    >>> t = ProgressTracker(min_efficiency=0.5)
    >>> s = 0
    >>> for i in range(200):
    ...     s += 32
    ...     t.record(s, 2.0 - 1e-4 * s, 32)  # steady progress
    >>> t.changed(s, old_batch=32, new_batch=64, window=3200)
    >>> for i in range(50):
    ...     s += 64
    ...     t.record(s, 1.36 + 1e-4 * (s - 6400), 64)  # the loss turns upward after the change
    >>> v = t.verdicts(s)[0]
    >>> v.old_batch, v.new_batch, round(v.efficiency, 6), v.failed
    (32, 64, -1.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class LossSpike:
    """Flags a sudden rise of the step loss, the first sign that a larger step made training unstable.

    The median of the last ``recent`` step losses (robust to one odd batch) is compared with an
    exponential average of that median (``alpha`` per step, about ten steps of memory) and of its
    absolute deviation: the loss is rising fast when the median climbs above the average by more than
    ``rise`` of its size, by more than ``z`` typical deviations, and by more than ``start`` of the
    first median seen (a loss near zero doubles on noise alone). While the median stands above the
    average by half that rise, the average is held where it was (for at most ``recent`` steps), so a
    loss that climbs over several steps is still compared with its level from before. O(1) per step.

    A linear LR rule raises the learning rate with the batch; past the curvature's limit the loss
    climbs within a few steps, and a few dozen steps later the weights may be beyond repair (on the
    MNIST-1D CNN at nine times its base LR: the loss doubled, then reached 37 within 30 steps, and
    the run ended at chance accuracy although the growth was reverted by the efficiency check).

    Example:
        >>> spike = LossSpike()
        >>> [spike.update(1.0 + 0.01 * (i % 3)) for i in range(30)][-1]
        False
        >>> [spike.update(2.5) for _ in range(3)]
        [False, False, True]
    """

    def __init__(self, recent: int = 5, alpha: float = 0.1, rise: float = 1.0, z: float = 6.0, start: float = 0.1,
                 warmup: int = 10) -> None:
        self.recent, self.alpha, self.rise, self.z, self.start, self.warmup = recent, alpha, rise, z, start, warmup
        self._losses: list[float] = []
        self._first: float | None = None
        self._level: float | None = None
        self._spread = 0.0
        self._seen = 0
        self._held = 0  # steps in a row the reference was held back

    def update(self, loss: float) -> bool:
        """Take one step's loss; True while the loss is rising fast."""
        self._losses.append(loss)
        if len(self._losses) > self.recent:
            del self._losses[0]
        if len(self._losses) < self.recent:
            return False
        med = sorted(self._losses)[self.recent // 2]
        if self._level is None:
            self._first = self._level = med
            return False
        gap = med - self._level
        rising = self._seen >= self.warmup and gap > max(self.rise * abs(self._level), self.z * self._spread,
                                                          self.start * abs(self._first))
        if gap > 0.5 * self.rise * abs(self._level) and self._held < self.recent:
            self._held += 1  # a suspicious rise: keep the reference from before it for a few steps
        else:
            self._held = 0
            self._spread += self.alpha * (abs(gap) - self._spread)
            self._level += self.alpha * gap
        self._seen += 1
        return rising

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses), "first": self._first, "level": self._level, "spread": self._spread,
                "seen": self._seen, "held": self._held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses, self._first, self._level = list(state["losses"]), state["first"], state["level"]
        self._spread, self._seen, self._held = state["spread"], state["seen"], state["held"]


@dataclass(frozen=True)
class Verdict:
    """Outcome of one change: measured relative progress per sample and whether it failed."""

    at: int  # samples when the change happened
    old_batch: int
    new_batch: int
    efficiency: float  # loss decrease per sample after / before (nan when nothing to compare with)
    failed: bool
    se: float = math.nan  # standard error of ``efficiency`` (delta method)


@dataclass
class _Probe:
    at: int
    old_batch: int
    new_batch: int
    window: float


def slope(samples: np.ndarray, losses: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares slope of loss against samples, and its standard error.

    Example:
        >>> x = np.arange(1.0, 11.0); y = 3.0 - 0.5 * x
        >>> b, se = slope(x, y, np.ones(10)); round(b, 6), round(se, 6)
        (-0.5, 0.0)
    """
    w = weights / weights.sum()
    mx, my = float(w @ samples), float(w @ losses)
    dx = samples - mx
    sxx = float(w @ (dx * dx))
    if sxx <= 0 or len(samples) < 3:
        return math.nan, math.inf
    b = float(w @ (dx * (losses - my))) / sxx
    resid = losses - my - b * dx
    # residual variance per unit weight, then the slope's variance for independent step losses
    sigma2 = float(weights @ (resid * resid)) / (len(samples) - 2)
    var = sigma2 / float(weights @ (dx * dx))
    return b, math.sqrt(max(var, 0.0))


class ProgressTracker:
    """Step losses against samples, and verdicts on batch changes (see the module docstring)."""

    def __init__(self, min_efficiency: float = 0.5, z: float = 2.0, keep: int = 200_000) -> None:
        self.min_efficiency = min_efficiency
        self.z = z
        self.keep = keep  # steps of history kept (older ones are never needed by a probe)
        self._samples: list[float] = []
        self._loss: list[float] = []
        self._batch: list[float] = []
        self._probes: list[_Probe] = []
        self.spike = LossSpike()
        self.rising = False  # whether the loss is rising fast as of the last step (:class:`LossSpike`)

    def record(self, samples: float, loss: float, batch: int) -> None:
        """One optimizer step: cumulative samples after it, its mean loss, its batch."""
        if not math.isfinite(loss):
            return
        self.rising = self.spike.update(float(loss))
        self._samples.append(float(samples))
        self._loss.append(float(loss))
        self._batch.append(float(batch))
        if len(self._samples) > self.keep:
            cut = len(self._samples) - self.keep
            del self._samples[:cut], self._loss[:cut], self._batch[:cut]

    def changed(self, samples: float, old_batch: int, new_batch: int, window: float) -> None:
        """A batch change at ``samples``; it is judged once ``window`` samples have followed it."""
        self._probes.append(_Probe(int(samples), old_batch, new_batch, float(window)))

    def forget(self) -> None:
        """Drop pending probes (a change was reverted: later judgements would mix batches)."""
        self._probes.clear()

    @property
    def pending(self) -> int:
        return len(self._probes)

    def verdicts(self, samples: float) -> list[Verdict]:
        """Judge every probe whose window after the change is complete at ``samples``."""
        done, left = [], []
        for probe in self._probes:
            if samples >= probe.at + probe.window:
                done.append(self._judge(probe))
            else:
                left.append(probe)
        self._probes = left
        return done

    def _judge(self, probe: _Probe) -> Verdict:
        s = np.asarray(self._samples)
        loss, w = np.asarray(self._loss), np.asarray(self._batch)
        before = (s > probe.at - probe.window) & (s <= probe.at)
        after = (s > probe.at) & (s <= probe.at + probe.window)
        b0, se0 = slope(s[before], loss[before], w[before])
        b1, se1 = slope(s[after], loss[after], w[after])
        if not (math.isfinite(b0) and math.isfinite(b1)) or b0 >= 0:
            # no measurable progress before the change: nothing to compare with, except a rising loss
            failed = math.isfinite(b1) and b1 > self.z * se1
            eff = -1.0 if failed else math.nan
            return Verdict(probe.at, probe.old_batch, probe.new_batch, eff, failed)
        efficiency = b1 / b0
        # fails when -b1 < m (-b0) with confidence: (b1 - m b0) / SE > z
        m = self.min_efficiency
        gap = b1 - m * b0
        failed = gap > self.z * math.sqrt(se1 * se1 + m * m * se0 * se0)
        se = abs(efficiency) * math.sqrt((se1 / b1) ** 2 + (se0 / b0) ** 2) if b1 else se1 / abs(b0)
        return Verdict(probe.at, probe.old_batch, probe.new_batch, max(efficiency, -1.0), failed, se)

    def state_dict(self) -> dict[str, Any]:
        return {"samples": list(self._samples), "loss": list(self._loss), "batch": list(self._batch),
                "probes": [vars(p).copy() for p in self._probes], "spike": self.spike.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._samples, self._loss, self._batch = list(state["samples"]), list(state["loss"]), list(state["batch"])
        self._probes = [_Probe(**p) for p in state["probes"]]
        if "spike" in state:  # checkpoints of earlier versions start the detector afresh
            self.spike.load_state_dict(state["spike"])
