"""Batch policies: what effective batch to aim for, and when to actually move to it.

A policy proposes a *target* batch from what is known now (the noise-scale estimate, the current
batch, and for goodput or energy policies an online throughput profile). :class:`Hysteresis` turns
targets into decisions: it moves only when the target leaves a dead band around the current batch,
never by more than ``max_change_factor`` at once, never during a cooldown, and always to a multiple
of the batch granularity (micro-batch size times the number of processes).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable

from adabatch.config import ControllerConfig


@dataclass(frozen=True)
class PolicyInput:
    """What a policy knows when it is asked for a target."""

    step: int
    batch: int
    base_batch: int
    noise_scale: float  # B_simple (or its preconditioned form); nan while unknown
    granularity: int
    min_batch: int
    max_batch: int


class BatchPolicy(abc.ABC):
    """Proposes the effective batch size to aim for."""

    @abc.abstractmethod
    def propose(self, inp: PolicyInput) -> float:
        """Return the target effective batch (samples); nan means "no opinion yet"."""

    def observe(self, batch: int, samples: int, seconds: float, joules: float | None) -> None:
        """Learn from a window of steps run at ``batch``. Policies without a profile ignore it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NoiseScalePolicy(BatchPolicy):
    """Aim at ``target_factor * B_noise``.

    McCandlish et al. (2018), Sec. 2.2: training at B = B_crit ~ B_noise costs twice the minimum
    steps and twice the minimum examples; B_simple over-estimates B_noise when the Hessian is
    ill-conditioned, so the default factor is below 1.

    Example:
        >>> p = NoiseScalePolicy(target_factor=0.5)
        >>> p.propose(PolicyInput(step=0, batch=32, base_batch=32, noise_scale=400.0,
        ...                       granularity=32, min_batch=32, max_batch=1024))
        200.0
    """

    def __init__(self, target_factor: float = 0.5) -> None:
        self.target_factor = target_factor

    def propose(self, inp: PolicyInput) -> float:
        return self.target_factor * inp.noise_scale


def round_to_granularity(batch: float, granularity: int, min_batch: int, max_batch: int) -> int:
    """Nearest multiple of ``granularity`` within [min_batch, max_batch] (bounds rounded inward)."""
    lo = max(granularity, math.ceil(min_batch / granularity) * granularity)
    hi = max(lo, (max_batch // granularity) * granularity)
    snapped = int(round(batch / granularity)) * granularity
    return int(min(max(snapped, lo), hi))


class Hysteresis:
    """Turns a policy's targets into batch changes without thrashing.

    Rules, in order: no decision while the target is unknown (nan) or a cooldown runs; grow only when
    the target's lower bound is ``>= grow_threshold * batch``, shrink only when its upper bound is
    ``<= shrink_threshold * batch``;
    the target must stay on the same side of the band for ``patience`` consecutive decisions; the
    step is capped at ``max_change_factor`` and snapped to the granularity and bounds.
    """

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.last_change_step: int | None = None
        self.streak = 0  # consecutive decisions outside the band, signed: + grow, - shrink

    def decide(self, inp: PolicyInput, target: float,
               bounds: Callable[[], tuple[float, float]] | None = None, patience: int | None = None) -> int:
        """New batch for ``target``; ``bounds()`` gives the target's (low, high) uncertainty.

        The batch grows only if even ``low`` clears the grow threshold and shrinks only if even
        ``high`` is under the shrink threshold, so an estimate that is merely noisy never moves it.
        ``bounds`` is called only when the point target is outside the band. ``patience`` overrides
        the config's (the controller lowers it when measurements are spaced further apart).
        """
        cfg = self.config
        if math.isnan(target) or target <= 0:
            return inp.batch  # no opinion; +inf (no signal left in the mean gradient) means grow
        if self.last_change_step is not None and inp.step - self.last_change_step < cfg.cooldown_steps:
            return inp.batch
        batch = inp.batch
        outside = target >= cfg.grow_threshold * batch or target <= cfg.shrink_threshold * batch
        low, high = bounds() if outside and bounds is not None else (target, target)
        if low >= cfg.grow_threshold * batch:
            self.streak = max(self.streak, 0) + 1
            wanted = min(target, batch * cfg.max_change_factor)
        elif high <= cfg.shrink_threshold * batch:
            self.streak = min(self.streak, 0) - 1
            wanted = max(target, batch / cfg.max_change_factor)
        else:
            self.streak = 0
            return batch
        if abs(self.streak) < (cfg.patience if patience is None else patience):
            return batch
        new = round_to_granularity(wanted, inp.granularity, inp.min_batch, inp.max_batch)
        if new != batch:
            self.last_change_step = inp.step
            self.streak = 0
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"last_change_step": self.last_change_step, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_change_step, self.streak = state["last_change_step"], state["streak"]
