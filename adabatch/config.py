"""The controller's knobs, in one validated object.

Every threshold that a study may tune lives here. Construction validates each field and names it
in the error, with the accepted range, so a bad study file or a typo fails at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

LR_RULES = ("auto", "none", "linear", "sqrt", "adascale")
NOISE_KINDS = ("auto", "simple", "preconditioned")
POLICIES = ("noise", "goodput", "energy", "zeus")


class ConfigError(ValueError):
    """A controller setting is outside its accepted range."""


def _check(cond: bool, name: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"ControllerConfig.{name}={value!r} is invalid: accepted {accepted}.")


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of :class:`~adabatch.AdaptiveBatchController`.

    Batch sizes count samples in one optimizer step across all processes. ``None`` bounds are
    filled in by the controller from the micro-batch size it is given.

    Example:
        >>> from adabatch import ControllerConfig
        >>> cfg = ControllerConfig(max_batch=1024, target_factor=0.5, lr_rule="sqrt")
        >>> cfg.replace(cooldown_steps=10).cooldown_steps
        10
    """

    # Bounds of the effective batch (samples per optimizer step).
    min_batch: int | None = None
    max_batch: int = 4096
    # The batch the user's learning rate was tuned for; defaults to the starting batch.
    base_batch: int | None = None
    # Effective batch at step 0; defaults to base_batch, else the micro-batch size.
    initial_batch: int | None = None
    # Target batch = target_factor * B_noise (McCandlish et al. 2018: B_crit ~ B_noise).
    target_factor: float = 0.5
    # Grow when target >= grow_threshold * batch; shrink when target <= shrink_threshold * batch.
    # The gap between them is the hysteresis band that keeps a noisy estimate from thrashing.
    grow_threshold: float = 1.5
    shrink_threshold: float = 0.5
    # Move only when the target is this many standard errors outside the band (0: point estimate).
    confidence_z: float = 2.0
    # Consecutive decisions the target must stay outside the band before the batch moves. Counted
    # at the measure_every cadence: measurements spaced further apart need proportionally fewer.
    patience: int = 3
    # Largest factor by which one decision may change the batch.
    max_change_factor: float = 2.0
    # Optimizer steps after a change during which the batch stays put.
    cooldown_steps: int = 50
    # Decay of the separate EMAs of |G|^2 and tr(Sigma), per measurement.
    ema_decay: float = 0.9
    # Measurements before the first decision (at the measure_every cadence, as patience).
    warmup_measurements: int = 5
    # Measure the noise scale at most every this many optimizer steps (the rest do no extra work).
    measure_every: int = 4
    # Largest share of training time measurements may take: the interval between measured steps
    # stretches (up to max_measure_every, never below measure_every) until their timed cost fits. None: every measure_every
    # steps exactly, which makes runs with fixed seeds reproducible bit for bit.
    measure_budget: float | None = 0.005
    max_measure_every: int = 64
    # Largest micro-batch (samples per process) the controller may grow to; None keeps the
    # micro-batch the controller was given. Growth needs the loader to follow the controller
    # (``controller.batch_sampler``). On CUDA, growth also stops where the measured peak memory
    # predicts more than ``memory_fraction`` of the device's memory.
    max_micro_batch: int | None = None
    memory_fraction: float = 0.9
    # Learning-rate rule: auto picks sqrt for adaptive optimizers (Adam family), linear otherwise.
    lr_rule: str = "auto"
    # Optimizer steps over which the LR factor ramps to its new value after the batch grows.
    lr_warmup_steps: int = 0
    # Noise scale flavour: auto picks preconditioned (Qiao et al. 2021) for Adam-family optimizers.
    noise_kind: str = "auto"
    # Which target the policy pursues: the noise scale, goodput (progress per second),
    # energy (progress per joule) or Zeus's blend of both with weight eta on energy.
    policy: str = "noise"
    eta: float = 0.5
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("min_batch", "base_batch", "initial_batch"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 1), name, value, "None or an integer >= 1")
        _check(_is_int(self.max_batch) and self.max_batch >= 1, "max_batch", self.max_batch, "an integer >= 1")
        if self.min_batch is not None:
            _check(self.min_batch <= self.max_batch, "min_batch", self.min_batch,
                   f"at most max_batch={self.max_batch}")
        if self.initial_batch is not None:
            lo = self.min_batch or 1
            _check(lo <= self.initial_batch <= self.max_batch, "initial_batch", self.initial_batch,
                   f"between min_batch={lo} and max_batch={self.max_batch}")
        _check(_finite(self.target_factor) and self.target_factor > 0, "target_factor", self.target_factor, "a number > 0")
        _check(_finite(self.grow_threshold) and self.grow_threshold > 1, "grow_threshold", self.grow_threshold,
               "a number > 1")
        _check(_finite(self.shrink_threshold) and 0 < self.shrink_threshold < 1, "shrink_threshold",
               self.shrink_threshold, "a number in (0, 1)")
        _check(_finite(self.max_change_factor) and self.max_change_factor > 1, "max_change_factor",
               self.max_change_factor, "a number > 1")
        _check(_finite(self.confidence_z) and self.confidence_z >= 0, "confidence_z", self.confidence_z,
               "a number >= 0")
        _check(_is_int(self.patience) and self.patience >= 1, "patience", self.patience, "an integer >= 1")
        _check(_is_int(self.cooldown_steps) and self.cooldown_steps >= 0, "cooldown_steps", self.cooldown_steps,
               "an integer >= 0")
        _check(_finite(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in [0, 1)")
        _check(_is_int(self.warmup_measurements) and self.warmup_measurements >= 1, "warmup_measurements",
               self.warmup_measurements, "an integer >= 1")
        _check(_is_int(self.measure_every) and self.measure_every >= 1, "measure_every", self.measure_every,
               "an integer >= 1")
        _check(self.measure_budget is None or (_finite(self.measure_budget) and 0 < self.measure_budget < 1),
               "measure_budget", self.measure_budget, "None or a number in (0, 1)")
        _check(_is_int(self.max_measure_every) and self.max_measure_every >= 1, "max_measure_every",
               self.max_measure_every, "an integer >= 1")
        _check(self.max_micro_batch is None or (_is_int(self.max_micro_batch) and self.max_micro_batch >= 1),
               "max_micro_batch", self.max_micro_batch, "None or an integer >= 1")
        _check(_finite(self.memory_fraction) and 0 < self.memory_fraction <= 1, "memory_fraction",
               self.memory_fraction, "a number in (0, 1]")
        _check(self.lr_rule in LR_RULES, "lr_rule", self.lr_rule, f"one of {', '.join(LR_RULES)}")
        _check(_is_int(self.lr_warmup_steps) and self.lr_warmup_steps >= 0, "lr_warmup_steps",
               self.lr_warmup_steps, "an integer >= 0")
        _check(self.noise_kind in NOISE_KINDS, "noise_kind", self.noise_kind, f"one of {', '.join(NOISE_KINDS)}")
        _check(self.policy in POLICIES, "policy", self.policy, f"one of {', '.join(POLICIES)}")
        _check(_finite(self.eta) and 0 <= self.eta <= 1, "eta", self.eta, "a number in [0, 1]")

    def replace(self, **changes: Any) -> "ControllerConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControllerConfig":
        """Build from a mapping; unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ControllerConfig field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(sorted(known))}.")
        return cls(**dict(data))

    def save(self, path: str | Path) -> Path:
        """Write as JSON; :meth:`load` reads it back."""
        path = Path(path)
        path.write_text(json.dumps({"adabatch_controller_config": self.to_dict()}, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ControllerConfig":
        """Read a config written by :meth:`save` (or ``adabatch study export``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no controller config at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "adabatch_controller_config" not in data:
            raise ConfigError(f"{path} holds no 'adabatch_controller_config' object.")
        return cls.from_dict(data["adabatch_controller_config"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
