"""Per-step telemetry: one record per optimizer step, an in-memory history, and callbacks.

Records are delivered in small groups, at the measurement steps where the controller already
synchronises with the device, so telemetry adds no host sync of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

RECORD_FIELDS = (
    "step", "samples", "batch", "micro_batches", "micro_batch_size", "b_simple", "grad_sq",
    "trace_sigma", "lr", "loss", "measured", "seconds", "energy_j",
)


@dataclass
class StepRecord:
    """What happened at one optimizer step.

    ``samples`` counts all samples seen up to and including this step; ``b_simple``, ``grad_sq``
    and ``trace_sigma`` are the smoothed estimates in force after the step (nan before the first
    measurement); ``lr`` is the learning rate of the first parameter group as applied to this
    step; ``seconds`` is wall time since the controller started; ``energy_j`` is cumulative
    joules from the controller's energy meter, if it has one (see ``energy_source``).
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Callback = Callable[[StepRecord], None]


class Telemetry:
    """Keeps the history (optionally bounded) and fans records out to callbacks."""

    def __init__(self, keep_history: bool = True) -> None:
        self.keep_history = keep_history
        self.history: list[StepRecord] = []
        self.callbacks: list[Callback] = []

    def emit(self, records: Iterable[StepRecord]) -> None:
        for rec in records:
            if self.keep_history:
                self.history.append(rec)
            for cb in self.callbacks:
                cb(rec)

    def column(self, name: str) -> list[Any]:
        """One field across the history, e.g. ``telemetry.column("batch")``."""
        return [getattr(r, name) for r in self.history]
