"""Training time and energy, with evaluation (or anything else inside ``paused()``) left out.

The throughput profile of the goodput and energy policies, the timed measurement budget and the
``seconds`` / ``energy_j`` of telemetry records all read this clock, so time spent evaluating,
checkpointing or logging never counts as training.

Example:
    >>> import time
    >>> clock = TrainingClock()
    >>> with clock.paused():
    ...     time.sleep(0.05)
    >>> clock.seconds() < 0.05
    True
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator


class TrainingClock:
    """Seconds (``time.perf_counter``) and joules (an optional energy meter) of training only."""

    def __init__(self, meter: Any = None) -> None:
        self.meter = meter
        self._t0 = time.perf_counter()
        self._j0 = self._read_meter()
        self._paused_s = 0.0
        self._paused_j = 0.0
        self._offset_s = 0.0  # carried over from a checkpoint
        self._offset_j = 0.0
        self._pause_depth = 0
        self._pause_start: tuple[float, float | None] | None = None

    def _read_meter(self) -> float | None:
        return None if self.meter is None else float(self.meter.read_joules())

    def seconds(self) -> float:
        """Training seconds since the clock started (or since the run began, after a resume)."""
        now = self._pause_start[0] if self._pause_start is not None else time.perf_counter()
        return self._offset_s + now - self._t0 - self._paused_s

    def joules(self) -> float | None:
        """Training joules from the meter (None without one)."""
        if self.meter is None:
            return None
        now = self._pause_start[1] if self._pause_start is not None else self._read_meter()
        return self._offset_j + now - self._j0 - self._paused_j

    @property
    def is_paused(self) -> bool:
        return self._pause_depth > 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop both clocks inside the block (nests)."""
        if self._pause_depth == 0:
            self._pause_start = (time.perf_counter(), self._read_meter())
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0 and self._pause_start is not None:
                t, j = self._pause_start
                self._pause_start = None
                self._paused_s += time.perf_counter() - t
                if j is not None:
                    self._paused_j += self._read_meter() - j

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "joules": self.joules()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's totals (the clock restarts now)."""
        self._t0, self._j0 = time.perf_counter(), self._read_meter()
        self._paused_s = self._paused_j = 0.0
        self._offset_s = float(state["seconds"])
        self._offset_j = float(state["joules"] or 0.0)
