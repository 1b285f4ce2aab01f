"""Per-step telemetry: one record per optimizer step, an in-memory history, and callbacks.

The training step only appends a handful of numbers to flat columns (no object per step, no host
sync). Records are built from the columns when someone looks: when callbacks are registered, in
groups at the measurement steps where the controller already synchronises with the device;
otherwise only when ``history`` is read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

RECORD_FIELDS = (
    "step", "samples", "batch", "micro_batches", "micro_batch_size", "b_simple", "grad_sq",
    "trace_sigma", "lr", "loss", "measured", "seconds", "energy_j", "noise_low", "noise_high",
)

_NAN5 = (math.nan,) * 5


@dataclass
class StepRecord:
    """What happened at one optimizer step.

    ``samples`` counts all samples seen up to and including this step; ``micro_batch_size`` is the
    size of the step's first micro-batch on one process; ``b_simple``, ``grad_sq`` and
    ``trace_sigma`` are the smoothed estimates in force after the step (nan before the first
    measurement), ``noise_low`` and ``noise_high`` the 95 % interval of ``b_simple`` (``noise_high``
    is inf while |G|^2 is not resolved; ``b_simple`` is then the lower bound); ``lr`` is the
    learning rate of the first parameter group as applied to this step; ``seconds`` is training
    wall time since the controller started (evaluation inside ``controller.paused()`` excluded);
    ``energy_j`` is cumulative training joules from the controller's energy meter at measured
    steps, if it has one (see ``energy_source``).
    """

    step: int
    samples: int
    batch: int
    micro_batches: int
    micro_batch_size: int
    b_simple: float
    grad_sq: float
    trace_sigma: float
    lr: float
    loss: float
    measured: bool
    seconds: float
    energy_j: float | None = None
    energy_source: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    noise_low: float = math.nan
    noise_high: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Callback = Callable[[StepRecord], None]


class Telemetry:
    """Columns of per-step values, turned into :class:`StepRecord` s on demand.

    Steps ``[first, first + len(columns))`` are held in columns; steps before ``emitted`` have been
    released to callbacks and, with ``keep_history``, are readable through :attr:`history`.

    Example:
        >>> tel = Telemetry()
        >>> tel.add(batch=64, micro_batches=2, micro_batch_size=32, lr=0.1, loss=2.3, seconds=0.5)
        >>> tel.measured(0, (100.0, 1.0, 100.0, 80.0, 130.0))
        >>> tel.emit_until(1)
        >>> r = tel.history[0]; (r.step, r.samples, r.b_simple, r.measured)
        (0, 64, 100.0, True)
    """

    def __init__(self, keep_history: bool = True) -> None:
        self.keep_history = keep_history
        self.callbacks: list[Callback] = []
        self.steps = 0  # steps added so far
        self.emitted = 0  # steps released to callbacks and history
        self._first = 0  # step of column index 0
        self._samples_before = 0  # samples of the steps before _first
        self._in_force = _NAN5  # estimates in force before _first
        self._batch: list[int] = []
        self._micro_batches: list[int] = []
        self._micro_size: list[int] = []
        self._lr: list[float] = []
        self._loss: list[Any] = []
        self._seconds: list[float] = []
        self._estimates: dict[int, tuple[float, ...]] = {}  # measured step -> estimates after it
        self._energy: dict[int, tuple[float | None, str | None]] = {}
        self._metrics: dict[int, dict[str, float]] = {}
        self._records: list[StepRecord] = []  # built records of steps [_first, _first + len)

    def restart(self, first_step: int, samples_before: int, estimates: tuple[float, ...]) -> None:
        """Start the columns over at ``first_step`` (a resumed run); earlier records are dropped."""
        callbacks = self.callbacks
        self.__init__(self.keep_history)
        self.callbacks = callbacks
        self.steps = self.emitted = self._first = first_step
        self._samples_before, self._in_force = samples_before, estimates

    def add(self, batch: int, micro_batches: int, micro_batch_size: int, lr: float, loss: Any,
            seconds: float) -> None:
        """Append one optimizer step (``loss`` may be a device scalar; it is read at emission)."""
        self._batch.append(batch)
        self._micro_batches.append(micro_batches)
        self._micro_size.append(micro_batch_size)
        self._lr.append(lr)
        self._loss.append(loss)
        self._seconds.append(seconds)
        self.steps += 1

    def measured(self, step: int, estimates: tuple[float, ...], energy_j: float | None = None,
                 energy_source: str | None = None) -> None:
        """Mark ``step`` as measured; ``estimates`` (B_simple, |G|^2, tr Sigma, low, high) hold from it on."""
        self._estimates[step] = estimates
        if energy_j is not None:
            self._energy[step] = (energy_j, energy_source)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step < self.emitted:
            built = self._built(step)
            if built is not None:
                built.metrics.update(metrics)
                return
        self._metrics.setdefault(step, {}).update(metrics)

    def emit_until(self, stop: int) -> None:
        """Release steps ``[emitted, stop)``: callbacks see them now, in order."""
        stop = min(stop, self.steps)
        if stop <= self.emitted:
            return
        if self.callbacks or not self.keep_history:
            for rec in self._build(self.emitted, stop):
                for cb in self.callbacks:
                    cb(rec)
        self.emitted = stop
        if not self.keep_history:
            self._drop_until(stop)

    @property
    def history(self) -> list[StepRecord]:
        """Records of every released step (built on first access)."""
        if not self.keep_history:
            return []
        self._build(self._first, self.emitted)
        return self._records[:self.emitted - self._first]

    def column(self, name: str) -> list[Any]:
        """One field across the history, e.g. ``telemetry.column("batch")``."""
        return [getattr(r, name) for r in self.history]

    # ------------------------------------------------------------------ internals

    def _built(self, step: int) -> StepRecord | None:
        i = step - self._first
        return self._records[i] if 0 <= i < len(self._records) else None

    def _build(self, start: int, stop: int) -> list[StepRecord]:
        """Records of steps [start, stop), building (in order) those not built yet."""
        have = self._first + len(self._records)
        if stop > have:
            self._materialise(have, stop)
        return self._records[start - self._first:stop - self._first]

    def _materialise(self, start: int, stop: int) -> None:
        lo, hi = start - self._first, stop - self._first
        losses = self._loss[lo:hi]
        tensors = [i for i, v in enumerate(losses) if isinstance(v, torch.Tensor)]
        if tensors:  # one read-back for the whole group
            values = torch.stack([losses[i].reshape(()).float() for i in tensors]).tolist()
            for i, v in zip(tensors, values):
                losses[i] = v
            self._loss[lo:hi] = losses
        if self._records:
            last = self._records[-1]
            samples, in_force = last.samples, _estimates_of(last)
        else:
            samples, in_force = self._samples_before, self._in_force
        for j in range(lo, hi):
            step = self._first + j
            samples += self._batch[j]
            est = self._estimates.get(step)
            in_force = est or in_force
            energy, source = self._energy.get(step, (None, None))
            self._records.append(StepRecord(
                step=step, samples=samples, batch=self._batch[j], micro_batches=self._micro_batches[j],
                micro_batch_size=self._micro_size[j], b_simple=in_force[0], grad_sq=in_force[1],
                trace_sigma=in_force[2], lr=float(self._lr[j]), loss=float(self._loss[j]), measured=est is not None,
                seconds=self._seconds[j], energy_j=energy, energy_source=source,
                metrics=self._metrics.pop(step, {}), noise_low=in_force[3], noise_high=in_force[4],
            ))

    def _drop_until(self, stop: int) -> None:
        n = stop - self._first
        if self._records and len(self._records) >= n:
            last = self._records[n - 1]
            self._samples_before, self._in_force = last.samples, _estimates_of(last)
        for col in (self._batch, self._micro_batches, self._micro_size, self._lr, self._loss, self._seconds):
            del col[:n]
        del self._records[:n]
        for table in (self._estimates, self._energy):
            for step in [s for s in table if s < stop]:
                del table[step]
        self._first = stop


def _estimates_of(record: StepRecord) -> tuple[float, ...]:
    return (record.b_simple, record.grad_sq, record.trace_sigma, record.noise_low, record.noise_high)
