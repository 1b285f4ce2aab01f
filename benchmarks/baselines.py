"""How the non-adaptive baselines pick each step's batch and learning rate.

One small base class, :class:`BatchSchedule`, and one short subclass per baseline:

- :class:`FixedBatch`: a batch B all run long, the workload's LR schedule sized for its own
  budget / B steps, the peak LR scaled from the base batch by the rule adabatch uses.
- :class:`LossThreshold`: the hand-written heuristic (double the batch when the epoch loss falls
  below a share of the loss at the last change).
- :class:`LinearRamp`: batch-size warm-up as in Megatron-LM (``--rampup-batch-size``) and OLMo.
- :class:`Seesaw`: Meterez et al. 2025 (arXiv 2510.14717), LR decay traded for batch growth.

Every schedule but Seesaw runs the workload's LR schedule advanced by samples (progress =
samples / budget) and scales the LR from the base batch B0 (the workload's micro-batch) by
:func:`adabatch.lr.lr_factor`: linear B / B0 for SGD, sqrt(B / B0) for Adam-family optimizers,
exactly as ``ControllerConfig(lr_rule="auto")`` does.
"""

from __future__ import annotations

import math

import torch

from adabatch.lr import lr_factor, resolve_rule
from adabatch.workloads import Workload, lr_schedule, make_optimizer


def lr_rule(wl: Workload) -> str:
    """The LR rule adabatch's ``lr_rule="auto"`` picks for the workload's optimizer.

    Example:
        >>> from adabatch.workloads import get_workload
        >>> lr_rule(get_workload("mnist1d-mlp")), lr_rule(get_workload("mnist1d-mlp-adamw"))
        ('linear', 'sqrt')
    """
    return resolve_rule("auto", make_optimizer(wl.optimizer, [torch.zeros(1, requires_grad=True)], wl.lr))


class BatchSchedule:
    """Batch and learning rate of each step of a baseline run; subclasses say how.

    :meth:`step` gets the samples seen before the step and returns the step's batch and LR. The
    default LR is the workload's schedule at the progress reached after the step, scaled from the
    base batch by :func:`lr_rule`. :meth:`end_epoch` hears each epoch's mean training loss.
    """

    def __init__(self, wl: Workload, budget: int) -> None:
        self.wl, self.budget = wl, budget
        self.base = wl.micro_batch
        self.rule = lr_rule(wl)

    def batch(self, samples: int) -> int:
        raise NotImplementedError

    def step(self, samples: int) -> tuple[int, float]:
        b = self.batch(samples)
        return b, self.wl.lr_at((samples + b) / self.budget) * lr_factor(self.rule, b, self.base)

    def end_epoch(self, mean_loss: float) -> None:
        pass

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "lr_rule": self.rule}


class FixedBatch(BatchSchedule):
    """Batch B throughout; step s of its budget // B steps runs at the schedule's (s + 1) / (budget // B).

    Example:
        >>> from adabatch.workloads import get_workload
        >>> wl = get_workload("mnist1d-mlp-adamw")
        >>> fixed = FixedBatch(wl, budget=6400, batch=128)   # 50 steps, sqrt(128 / 32) = 2x the LR
        >>> fixed.step(0) == (128, 2 * wl.lr_at(1 / 50))
        True
    """

    def __init__(self, wl: Workload, budget: int, batch: int) -> None:
        super().__init__(wl, budget)
        self.fixed = batch
        self.total_steps = max(1, budget // batch)

    def batch(self, samples: int) -> int:
        return self.fixed

    def step(self, samples: int) -> tuple[int, float]:
        progress = (samples // self.fixed + 1) / self.total_steps
        return self.fixed, self.wl.lr_at(progress) * lr_factor(self.rule, self.fixed, self.base)

    def describe(self) -> dict:
        return {**super().describe(), "batch": self.fixed}


class LossThreshold(BatchSchedule):
    """The hand-written heuristic: after an epoch whose mean training loss is below ``ratio`` times
    the loss of the epoch where the batch last changed (the first epoch to begin with), double the
    batch, up to ``cap``.

    Example:
        >>> from adabatch.workloads import get_workload
        >>> h = LossThreshold(get_workload("linreg"), budget=10_000, ratio=0.7, cap=64)
        >>> for loss in (3.0, 2.5, 2.0, 1.0, 0.5):
        ...     h.end_epoch(loss)
        >>> h.batch(0)   # 2.0 < 0.7 * 3.0 doubled 16 to 32; 1.0 < 0.7 * 2.0 doubled it again
        64
    """

    def __init__(self, wl: Workload, budget: int, ratio: float, cap: int) -> None:
        super().__init__(wl, budget)
        self.ratio, self.cap = ratio, cap
        self.current = self.base
        self.reference: float | None = None

    def batch(self, samples: int) -> int:
        return self.current

    def end_epoch(self, mean_loss: float) -> None:
        if self.reference is None:
            self.reference = mean_loss
        elif mean_loss < self.ratio * self.reference and self.current < self.cap:
            self.current, self.reference = min(2 * self.current, self.cap), mean_loss

    def describe(self) -> dict:
        return {**super().describe(), "ratio": self.ratio, "cap": self.cap}


class LinearRamp(BatchSchedule):
    """Batch warm-up: from the base batch B0 to ``end`` in equal steps of B0 over the first ``share``
    of the sample budget, then ``end``.

    As Megatron-LM's ``--rampup-batch-size START INCREMENT SAMPLES`` (and OLMo's batch warm-up): with
    n = (end - B0) / B0 increments spread over R = share x budget samples, the batch after s samples
    is B0 + min(n, floor(s n / R)) B0. The LR follows the batch by the LR rule and the schedule
    advances by samples.

    Example:
        >>> from adabatch.workloads import get_workload
        >>> ramp = LinearRamp(get_workload("mnist1d-mlp"), budget=100_000, end=512, share=0.25)
        >>> [ramp.batch(s) for s in (0, 1_700, 12_500, 24_999, 25_000, 99_000)]
        [32, 64, 256, 480, 512, 512]
    """

    def __init__(self, wl: Workload, budget: int, end: int, share: float) -> None:
        super().__init__(wl, budget)
        if end < self.base or end % self.base:
            raise ValueError(f"LinearRamp: end={end} must be a multiple of the base batch {self.base}, at least it")
        if not 0 < share <= 1:
            raise ValueError(f"LinearRamp: share={share} must be in (0, 1]")
        self.end, self.share = end, share
        self.increments = (end - self.base) // self.base
        self.ramp_samples = share * budget

    def batch(self, samples: int) -> int:
        done = min(self.increments, math.floor(samples * self.increments / self.ramp_samples))
        return self.base + done * self.base

    def describe(self) -> dict:
        return {**super().describe(), "end": self.end, "share": self.share}


def seesaw_points(wl: Workload, max_halvings: int = 64) -> list[float]:
    """Progress values at which the workload's LR schedule has halved since the last point.

    After the warm-up (the peak), point k is where the schedule first falls to 2^-k of the peak, for
    every k whose level the schedule reaches by the end of the run; found by bisection on the
    decreasing part. A constant schedule has none.

    Example:
        >>> from adabatch.workloads import get_workload
        >>> wl = get_workload("mnist1d-mlp-adamw")          # cosine from the peak down to 0.1 of it
        >>> [round(wl.lr_at(p) / wl.lr, 3) for p in seesaw_points(wl)]
        [0.5, 0.25, 0.125]
    """
    level = lambda p: lr_schedule(wl.schedule, p, wl.warmup, wl.final_lr)  # noqa: E731
    end = level(1.0)
    points = []
    for k in range(1, max_halvings + 1):
        goal = 2.0 ** -k
        if goal < end:
            break
        lo, hi = wl.warmup, 1.0  # level(lo) = 1 > goal >= level(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if level(mid) > goal else (lo, mid)
        points.append(hi)
    return points


class Seesaw(BatchSchedule):
    """Seesaw (Meterez et al. 2025, arXiv 2510.14717): where the LR schedule would cut the LR by a
    factor a, cut it by sqrt(a) and multiply the batch by a instead.

    The cosine (or one-cycle) decay is discretised into the points where the scheduled LR has halved
    since the last change (:func:`seesaw_points`); at each, the batch doubles and the LR is multiplied
    by 1 / sqrt(2). After k points the step runs at batch 2^k B0 and LR eta_peak 2^(-k/2), in place of
    the schedule's eta_peak 2^-k at B0; the warm-up before the peak is kept as it is. The paper derives
    the rule for Adam (normalised SGD in the variance-dominated regime) and applies it to cosine
    schedules; it replaces the LR rule, which Seesaw does not apply on top. Once the batch reaches
    ``max_batch``, further points halve the LR as the plain schedule would.

    Example:
        >>> from adabatch.workloads import get_workload
        >>> wl = get_workload("mnist1d-mlp-adamw")
        >>> seesaw = Seesaw(wl, budget=100_000, max_batch=128)
        >>> [round(p, 3) for p in seesaw.points]
        [0.559, 0.746, 0.899]
        >>> [seesaw.batch(s) for s in (0, 60_000, 80_000, 90_000)]
        [32, 64, 128, 128]
        >>> [round(seesaw.step(s)[1] / wl.lr, 3) for s in (50_000, 60_000, 80_000, 90_000)]
        [1.0, 0.707, 0.5, 0.25]
    """

    def __init__(self, wl: Workload, budget: int, max_batch: int) -> None:
        super().__init__(wl, budget)
        self.points = seesaw_points(wl)
        self.max_doublings = max(0, int(math.log2(max_batch // self.base)))

    def _passed(self, samples: int) -> int:
        return sum(samples >= p * self.budget for p in self.points)

    def batch(self, samples: int) -> int:
        return self.base * 2 ** min(self._passed(samples), self.max_doublings)

    def step(self, samples: int) -> tuple[int, float]:
        k = self._passed(samples)
        doublings = min(k, self.max_doublings)
        progress = (samples + self.base * 2 ** doublings) / self.budget
        if progress < self.wl.warmup:
            lr = self.wl.lr_at(progress)  # the warm-up is no decay: kept as scheduled
        else:
            lr = self.wl.lr * 2.0 ** (-doublings / 2) * 2.0 ** -(k - doublings)
        return self.base * 2 ** doublings, lr

    def describe(self) -> dict:
        return {**super().describe(), "points": self.points, "max_doublings": self.max_doublings}
