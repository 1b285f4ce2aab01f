"""Learning-rate rules for a changing batch, applied on top of whatever the scheduler sets.

The factor multiplies each parameter group's learning rate only for the duration of
``optimizer.step()``; outside it, ``group["lr"]`` holds the scheduler's own value, so chainable
schedulers (StepLR, ReduceLROnPlateau, ...) keep working on unscaled numbers and the two never fight.

Rules, for a step of batch B and a base batch B0 the user's learning rate was tuned for:

- ``none``:     1
- ``linear``:   B / B0 (Goyal et al. 2017)
- ``sqrt``:     sqrt(B / B0) (the usual rule for Adam-like optimizers)
- ``adascale``: gain r = (sigma^2 + |G|^2) / (sigma^2 / S + |G|^2), S = B / B0, with sigma^2 the
  gradient variance at B0 (Johnson et al. 2020, AdaScale). With sigma^2 = tr(Sigma) / B0 and
  B_simple = tr(Sigma) / |G|^2 this is r = (B_simple / B0 + 1) / (B_simple / B + 1), in [1, S]
  for S >= 1. Before the noise scale is known, r = 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ADAPTIVE_OPTIMIZERS = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop, torch.optim.SparseAdam,
)


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers that rescale each coordinate by running gradient statistics."""
    return isinstance(optimizer, ADAPTIVE_OPTIMIZERS)


def resolve_rule(rule: str, optimizer: torch.optim.Optimizer) -> str:
    """``auto`` becomes ``sqrt`` for adaptive optimizers and ``linear`` otherwise."""
    if rule == "auto":
        return "sqrt" if is_adaptive(optimizer) else "linear"
    return rule


def lr_factor(rule: str, batch: float, base_batch: float, noise_scale: float = math.nan) -> float:
    """Multiplier of the base learning rate for a step of ``batch`` samples.

    Example:
        >>> lr_factor("linear", 256, 64), lr_factor("sqrt", 256, 64)
        (4.0, 2.0)
        >>> round(lr_factor("adascale", 256, 64, noise_scale=64.0), 4)  # S=4, r=(1+1)/(0.25+1)
        1.6
    """
    ratio = batch / base_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "adascale":
        if not math.isfinite(noise_scale):
            return 1.0 if math.isnan(noise_scale) else ratio
        return (noise_scale / base_batch + 1.0) / (noise_scale / batch + 1.0)
    raise ValueError(f"unknown LR rule {rule!r}; use none, linear, sqrt or adascale")


class LRScaler:
    """Applies a batch-dependent LR factor around ``optimizer.step()``, with an optional ramp.

    After the batch grows, the factor ramps linearly from its old value to the new rule's value
    over ``warmup_samples`` samples (Goyal et al. 2017's gradual warm-up, applied per change and
    counted in samples, so it lasts as long in data at any batch size).
    """

    def __init__(self, rule: str, base_batch: int, warmup_samples: int = 0) -> None:
        self.rule = rule
        self.base_batch = base_batch
        self.warmup_samples = warmup_samples
        self.factor = 1.0  # factor applied at the last step
        self._ramp_from: float | None = None
        self._ramp_start = 0

    @property
    def ramping(self) -> bool:
        """True while a warm-up ramp is under way (the factor changes every step)."""
        return self._ramp_from is not None

    def batch_changed(self, samples: int, old_batch: int, new_batch: int) -> None:
        if self.warmup_samples > 0 and new_batch > old_batch:
            self._ramp_from, self._ramp_start = self.factor, samples

    def factor_for(self, samples: int, batch: int, noise_scale: float) -> float:
        """The factor for a step that starts after ``samples`` samples."""
        target = lr_factor(self.rule, batch, self.base_batch, noise_scale)
        if self._ramp_from is not None:
            done = (samples - self._ramp_start + batch) / self.warmup_samples
            if done >= 1.0:
                self._ramp_from = None
            else:
                target = self._ramp_from + (target - self._ramp_from) * done
        return target

    def apply(self, optimizer: torch.optim.Optimizer, factor: float) -> list[Any]:
        """Scale every group's LR by ``factor``; return the exact values for :meth:`restore`."""
        saved = [g["lr"] for g in optimizer.param_groups]
        self.factor = factor
        if factor != 1.0:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr * factor  # tensor LRs (capturable optimizers) stay tensors
        return saved

    @staticmethod
    def restore(optimizer: torch.optim.Optimizer, saved: list[Any]) -> None:
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "ramp_from": self._ramp_from, "ramp_start": self._ramp_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor, self._ramp_from, self._ramp_start = state["factor"], state["ramp_from"], state["ramp_start"]


class LRLimit:
    """A learning rate found too large, and the largest batch whose LR stays below it from now on.

    When a growth makes the loss explode (a rescue), the step's LR, scheduled LR x the rule's
    factor, crossed the curvature's limit somewhere between the factors of the old and the new
    batch. The limit is kept at their geometric mean, scheduled LR x sqrt(f(old) f(new)), for the
    rest of the run (the lowest such value if several rescues happen); a batch is allowed while its
    LR stays below it, so a schedule that decays the LR frees larger batches as it goes.

    Example:
        >>> limit = LRLimit("linear", base_batch=32)
        >>> limit.failed(scheduled_lr=0.05, old_batch=128, new_batch=512)  # 0.2 was fine, 0.8 exploded
        >>> round(limit.value, 6), limit.largest_batch(0.05, 32, 32, 4096), limit.largest_batch(0.01, 32, 32, 4096)
        (0.4, 256, 1280)
    """

    def __init__(self, rule: str, base_batch: int) -> None:
        self.rule, self.base_batch = rule, base_batch
        self.value: float | None = None

    def failed(self, scheduled_lr: float, old_batch: int, new_batch: int, noise_scale: float = math.nan) -> None:
        f_old = lr_factor(self.rule, old_batch, self.base_batch, noise_scale)
        f_new = lr_factor(self.rule, new_batch, self.base_batch, noise_scale)
        limit = scheduled_lr * math.sqrt(f_old * f_new)
        self.value = limit if self.value is None else min(self.value, limit)

    def largest_batch(self, scheduled_lr: float, granularity: int, lo: int, hi: int,
                      noise_scale: float = math.nan) -> int:
        """Largest multiple of ``granularity`` in [lo, hi] whose LR stays at or below the limit (lo at least)."""
        if self.value is None or not scheduled_lr > 0:
            return hi
        ok = lambda b: scheduled_lr * lr_factor(self.rule, b, self.base_batch, noise_scale) <= self.value  # noqa: E731
        first, last = -(-lo // granularity), hi // granularity
        if ok(last * granularity):
            return last * granularity
        while first < last:  # factors grow with the batch: the last multiple that is ok
            mid = (first + last + 1) // 2
            if ok(mid * granularity):
                first = mid
            else:
                last = mid - 1
        return max(first * granularity, lo)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


SCHEDULE_MODES = ("samples", "progress", "steps")


class ScheduleFollower:
    """Steps the user's LR scheduler so that it follows samples, not optimizer steps.

    A scheduler sized for the base batch B0 (``total_steps = sample budget / B0``) ends when the
    sample budget ends, whatever batches were used, when it is advanced by samples / B0 after each
    step (``mode="samples"``, the default). ``mode="progress"`` advances it by AdaScale's
    scale-invariant iterations instead, the sum of the gains r_t (Johnson et al. 2020, Sec. 3), which
    counts a large step as worth less than its samples when the noise is small. ``mode="steps"``
    steps it once per optimizer step (a schedule sized in optimizer steps).

    Fractions carry over, so the scheduler has been stepped floor(progress) times at any point.
    Schedulers with a fixed length (``OneCycleLR``'s ``total_steps``) are never stepped past it.
    ``ReduceLROnPlateau`` needs a metric and is stepped by the user, not here.

    A step of B samples owes the scheduler B / B0 steps. ``LambdaLR`` and ``OneCycleLR`` compute
    their LR from ``last_epoch`` alone, so they jump there in one ``step()`` call, with the values
    stepping one at a time would give (their lambdas are called at the steps reached, not at every
    step in between). Chainable schedulers (``CosineAnnealingLR``, ``StepLR``, ``LinearLR``,
    ``SequentialLR``, ...) derive each LR from the previous one and are stepped one at a time, about
    10 us per base-batch step on a CPU: at B / B0 = 128 that is about a millisecond per optimizer step.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        >>> follow = ScheduleFollower(sched, base_batch=32)
        >>> opt.step()  # the controller steps the optimizer, then advances the schedule
        >>> follow.advance(samples=128)  # one optimizer step of 128 samples: four base steps
        >>> sched.last_epoch, round(opt.param_groups[0]["lr"], 3)
        (4, 0.2)
    """

    def __init__(self, scheduler: Any, base_batch: int, mode: str = "samples") -> None:
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"schedule mode {mode!r}: use one of {', '.join(SCHEDULE_MODES)}")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("ReduceLROnPlateau steps on a metric: call scheduler.step(metric) yourself and do "
                            "not pass it as scheduler= (the controller's LR factor composes with it).")
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler={scheduler!r} has no step() method; pass a torch.optim.lr_scheduler "
                            "object (or None).")
        self.scheduler = scheduler
        self.base_batch = base_batch
        self.mode = mode
        self.progress = 0.0  # base-batch steps owed to the scheduler so far
        self.stepped = 0  # scheduler.step() calls made

    def advance(self, samples: float, gain: float = 1.0) -> None:
        """Account for one optimizer step of ``samples`` samples (``gain``: AdaScale's r, mode "progress")."""
        if self.mode == "steps":
            self.progress += 1.0
        elif self.mode == "samples":
            self.progress += samples / self.base_batch
        else:
            self.progress += gain
        due = int(math.floor(self.progress + 1e-9))
        if self.stepped < due and _closed_form(self.scheduler):
            owed = due - self.stepped
            total = getattr(self.scheduler, "total_steps", None)
            if isinstance(total, int):
                owed = min(owed, total - 1 - self.scheduler.last_epoch)
            if owed > 0:
                self.scheduler.last_epoch += owed - 1  # step() adds the last one and sets the LRs there
                self.scheduler.step()
                self.stepped += owed
            return
        while self.stepped < due and not _at_end(self.scheduler):
            self.scheduler.step()
            self.stepped += 1

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress, "stepped": self.stepped, "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress, self.stepped = float(state["progress"]), int(state["stepped"])


_CLOSED_FORM = (torch.optim.lr_scheduler.LambdaLR.get_lr, torch.optim.lr_scheduler.OneCycleLR.get_lr)


def _closed_form(scheduler: Any) -> bool:
    """True when the scheduler's LR is a function of ``last_epoch`` alone (it may jump there)."""
    cls = type(scheduler)
    return (getattr(cls, "get_lr", None) in _CLOSED_FORM and cls.step is torch.optim.lr_scheduler.LRScheduler.step
            and isinstance(getattr(scheduler, "last_epoch", None), int))


def _at_end(scheduler: Any) -> bool:
    """True when a fixed-length scheduler (OneCycleLR) would raise on one more step."""
    total = getattr(scheduler, "total_steps", None)
    return isinstance(total, int) and scheduler.last_epoch >= total - 1
