"""What each optimizer step looks like: its micro-batches, and whether (and how) it is measured.

One :class:`StepPlanner` answers both the controller (how many micro-batches make this step, which
of them are taken alone for the noise measurement) and the loader (what size the next micro-batch
should be: :meth:`StepPlanner.next_size`, used by :class:`~adabatch.sampler.AdaptiveBatchSampler`).

A step of ``batch`` samples (all processes) holds ``units = batch / granularity`` base micro-batches
per process. When the loader follows the plan, the micro-batch grows to the largest divisor of
``units`` under the cap (memory, ``max_micro_batch``), so a larger batch raises throughput instead
of only accumulating. A plain loader keeps the base micro-batch and the step accumulates.

Measured steps keep the step's samples, batch and learning rate: the step's micro-batches are
grouped into two pieces that are each taken alone (:mod:`adabatch.measure`); a step planned as one
micro-batch is split into two smaller ones of the same samples. Only a plain loader at one
micro-batch per step cannot be split: its measured step takes a second micro-batch (the one case
where measuring changes the step; the controller's sampler avoids it). Under DDP the last
micro-batch accumulates in place, since its backward is the one whose all-reduce must see the sum.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StepPlan:
    """Micro-batch sizes (samples per process) of one step and, when measured, its pieces.

    ``groups`` lists how many consecutive micro-batches form each piece taken alone; micro-batches
    after the last piece (under DDP, the final one) accumulate in place without a norm.

    Example:
        >>> p = StepPlan(sizes=(16, 16, 16, 16), groups=(2, 2))
        >>> p.samples, p.measured, p.piece_sizes()
        (64, True, [32, 32])
    """

    sizes: tuple[int, ...]
    groups: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return len(self.sizes)

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    @property
    def measured(self) -> bool:
        return bool(self.groups)

    def piece_sizes(self) -> list[int]:
        out, at = [], 0
        for g in self.groups:
            out.append(sum(self.sizes[at:at + g]))
            at += g
        return out


def largest_divisor(n: int, at_most: int) -> int:
    """Largest divisor of ``n`` that is <= ``at_most`` (1 at least).

    Example:
        >>> largest_divisor(12, 5), largest_divisor(7, 6)
        (4, 1)
    """
    for d in range(min(n, max(at_most, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def plan_step(batch: int, granularity: int, micro: int, cap_units: int, *, measured: bool, follows: bool,
              ddp: bool) -> StepPlan:
    """The plan of one step of ``batch`` samples over all processes.

    ``micro`` is the base micro-batch per process, ``granularity`` = micro x processes, ``cap_units``
    the largest micro-batch in base units, ``follows`` whether the loader takes sizes from the plan.

    Example:
        >>> plan_step(128, 32, 32, 8, measured=False, follows=True, ddp=False).sizes
        (128,)
        >>> plan_step(128, 32, 32, 8, measured=True, follows=True, ddp=False)
        StepPlan(sizes=(64, 64), groups=(1, 1))
        >>> plan_step(128, 32, 32, 8, measured=True, follows=False, ddp=False)
        StepPlan(sizes=(32, 32, 32, 32), groups=(2, 2))
    """
    units = batch // granularity
    m = largest_divisor(units, cap_units) if follows else 1
    sizes = [m * micro] * (units // m)
    if not measured:
        return StepPlan(tuple(sizes))
    if len(sizes) == 1:
        if follows and sizes[0] >= 2:
            s = sizes[0]
            half = (s // 2 // micro) * micro if units >= 2 else s // 2  # whole base micro-batches if possible
            sizes = [half, s - half]
        else:
            sizes = sizes * 2  # a plain loader cannot split a micro-batch: the step takes a second one
    k = len(sizes)
    pieces = k - 1 if ddp else k  # under DDP the last micro-batch syncs in place
    if pieces < 2:
        return StepPlan(tuple(sizes), (pieces,) if pieces else ())
    first = pieces // 2
    return StepPlan(tuple(sizes), (first, pieces - first))


class StepPlanner:
    """Plans the step in progress and, for a loader that prefetches, the steps after it.

    ``measure_at(step)`` says which steps are measured; the batch and the micro-batch cap are read
    from the callables given whenever a step is planned. A plan made while walking ahead for the
    loader is kept and used as made, so a step always runs exactly as the loader prepared it; a new
    batch decision applies from the first step not yet handed out. Sizes handed out are remembered
    in order, so ``controller.backward`` knows each micro-batch's size without being told.

    Example:
        >>> planner = StepPlanner(granularity=8, micro=8, ddp=False, batch=lambda: 16,
        ...                       cap_units=lambda: 2, measure_at=lambda step: step == 1)
        >>> planner.follows = True; _ = planner.start_step(0)  # a loader that follows the plan
        >>> [planner.next_size() for _ in range(4)]  # step 0: one of 16; step 1 (measured): 8 + 8
        [16, 8, 8, 16]
    """

    def __init__(self, granularity: int, micro: int, ddp: bool, batch: Callable[[], int],
                 cap_units: Callable[[], int], measure_at: Callable[[int], bool]) -> None:
        self.granularity, self.micro, self.ddp = granularity, micro, ddp
        self._batch, self._cap_units, self._measure_at = batch, cap_units, measure_at
        self.follows = False  # set once a loader asks for sizes: micro-batches may then grow and split
        self.issued: deque[int] = deque()  # sizes handed to the loader, not yet consumed by backward()
        self.step = 0  # index of the step in progress
        self.done_in_step = 0  # micro-batches of the step in progress already consumed
        self._ahead: dict[int, StepPlan] = {}  # plans of later steps, made while walking ahead
        self.current = self.plan(0)

    def plan(self, step: int) -> StepPlan:
        return plan_step(self._batch(), self.granularity, self.micro, self._cap_units(),
                         measured=self._measure_at(step), follows=self.follows, ddp=self.ddp)

    def start_step(self, step: int) -> StepPlan:
        """Begin step ``step``: the plan made for it while walking ahead, else a fresh one."""
        self.step, self.done_in_step = step, 0
        self.current = self._ahead.pop(step, None) or self.plan(step)
        for old in [s for s in self._ahead if s < step]:
            del self._ahead[old]
        return self.current

    def replan(self) -> StepPlan:
        """Drop every plan made ahead (the cap or the cadence changed) and plan the current step anew.

        Only valid before the step's first micro-batch; sizes already handed out are forgotten too.
        """
        self._ahead.clear()
        self.issued.clear()
        self.current = self.plan(self.step)
        return self.current

    def next_size(self, size: int | None = None) -> int:
        """Reserve the next micro-batch the loader will produce; ``size`` overrides (a short batch)."""
        self.follows = True
        if size is None:
            ahead = self.done_in_step + len(self.issued)
            plan, step = self.current, self.step
            while ahead >= plan.k:  # walk forward to the step this micro-batch will belong to
                ahead -= plan.k
                step += 1
                if step not in self._ahead:
                    self._ahead[step] = self.plan(step)
                plan = self._ahead[step]
            size = plan.sizes[ahead]
        self.issued.append(int(size))
        return int(size)

    def state_dict(self) -> dict:
        """The plans already made for the step in progress and later ones, and whether the loader follows.

        A plan made ahead (for a prefetching loader, or at the end of a pass) fixed that step's sizes
        and whether it is measured under the cadence of its time; a resumed run must reuse it, not
        plan again under the cadence of the checkpoint, to follow the same trajectory.
        """
        plans = {self.step: self.current, **self._ahead}
        return {"follows": self.follows,
                "plans": {str(k): [list(p.sizes), list(p.groups)] for k, p in sorted(plans.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Reuse the saved plans (their step's plan is taken by the next :meth:`start_step`)."""
        self.follows = bool(state["follows"])
        self._ahead = {int(k): StepPlan(tuple(sizes), tuple(groups)) for k, (sizes, groups) in state["plans"].items()}

    def take(self) -> int | None:
        """The size of the micro-batch arriving now, if the loader reserved it."""
        self.done_in_step += 1
        return self.issued.popleft() if self.issued else None

    def discard(self, last: int | None = None) -> None:
        """Forget the ``last`` reserved sizes (all with None): those batches will not come."""
        if last is None:
            self.issued.clear()
            return
        for _ in range(min(last, len(self.issued))):
            self.issued.pop()
