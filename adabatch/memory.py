"""How large a micro-batch fits: a peak-memory model learned from the steps already run.

Peak memory of a training step grows about linearly with the micro-batch: a fixed part (weights,
optimizer state, gradients) plus activations per sample. Each observed (micro-batch, peak) pair
refines the line peak(u) = fixed + per_unit * u, u counted in base micro-batches. Growth is
allowed up to the largest u whose predicted peak stays under the budget, and never beyond twice the
largest size seen to run, so the line is re-checked on the way up. An out-of-memory error caps u
below the size that failed, for good.

Without a budget (CPU), only the caps from out-of-memory errors apply.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class MicroBatchMemory:
    """Largest micro-batch (in base units) that is expected to fit.

    Example:
        >>> mem = MicroBatchMemory(budget_bytes=1000, baseline_bytes=100)
        >>> mem.observe(1, peak_bytes=200); mem.observe(2, peak_bytes=300)  # 100 + 100 per unit
        >>> mem.cap(64)  # the line allows 9 units, but growth is at most twice the largest seen
        4
        >>> mem.observe(4, peak_bytes=500); mem.cap(64)
        8
        >>> mem.out_of_memory(8)  # an OOM at 8 units: never try 8 again
        4
    """

    def __init__(self, budget_bytes: float | None = None, baseline_bytes: float = 0.0) -> None:
        self.budget_bytes = budget_bytes
        self.baseline_bytes = baseline_bytes
        self.peaks: dict[int, float] = {}  # units -> largest peak seen
        self.failed: int | None = None  # smallest size that ran out of memory

    @classmethod
    def for_device(cls, device: torch.device, fraction: float) -> "MicroBatchMemory":
        """A CUDA device gets a budget of ``fraction`` of its memory; other devices get none."""
        if device.type != "cuda":
            return cls()
        total = torch.cuda.get_device_properties(device).total_memory
        return cls(fraction * total, float(torch.cuda.memory_allocated(device)))

    def observe(self, units: int, peak_bytes: float) -> None:
        self.peaks[units] = max(peak_bytes, self.peaks.get(units, 0.0))

    def out_of_memory(self, units: int) -> int:
        """Record that ``units`` did not fit; return the new cap."""
        self.failed = units if self.failed is None else min(self.failed, units)
        return self.cap(units)

    def cap(self, limit: int) -> int:
        """Largest micro-batch, in units, that may be tried (at most ``limit``, at least 1)."""
        cap = limit
        if self.failed is not None:
            ran = [u for u in self.peaks if u < self.failed]
            cap = min(cap, max(ran) if ran else max(self.failed // 2, 1))
        if self.budget_bytes is not None and self.peaks:
            cap = min(cap, 2 * max(self.peaks))
            fixed, per_unit = self.line()
            if per_unit > 0:
                cap = min(cap, math.floor((self.budget_bytes - fixed) / per_unit))
        return max(int(cap), 1)

    def line(self) -> tuple[float, float]:
        """(fixed, per_unit) of the peak-memory line: least squares over two or more sizes, else
        through the baseline (which over-states per_unit, so it errs on the safe side)."""
        us = sorted(self.peaks)
        if len(us) == 1:
            u = us[0]
            return self.baseline_bytes, max(self.peaks[u] - self.baseline_bytes, 0.0) / u
        mu = sum(us) / len(us)
        mp = sum(self.peaks[u] for u in us) / len(us)
        per_unit = sum((u - mu) * (self.peaks[u] - mp) for u in us) / sum((u - mu) ** 2 for u in us)
        return mp - per_unit * mu, per_unit

    def state_dict(self) -> dict[str, Any]:
        return {"peaks": {str(u): p for u, p in self.peaks.items()}, "failed": self.failed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.peaks = {int(u): float(p) for u, p in state["peaks"].items()}
        self.failed = state["failed"]
