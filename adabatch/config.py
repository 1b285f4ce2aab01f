"""The controller's knobs, in one validated object.

Every threshold that a study may tune lives here. Construction validates each field and names it
in the error, with the accepted range, so a bad study file or a typo fails at once. Counts that
pace decisions (patience, cooldown, the estimator's window, the LR ramp) are in samples, so they
mean the same thing at every batch size.
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
SCHEDULE_MODES = ("samples", "progress", "steps")
MEASUREMENTS = ("auto", "examples", "pieces")
BETA_RULES = ("none", "beta2", "both")  # adabatch.betas

# Fields of earlier versions, and what replaced them (for a clear error when an old file is loaded).
RENAMED = {
    "cooldown_steps": "cooldown_samples (now counted in samples)",
    "patience": "patience_samples (now counted in samples)",
    "ema_decay": "window_fraction and min_window (the estimate is now averaged over a window of samples)",
    "warmup_measurements": "nothing: decisions wait until the estimate's interval is decisive",
    "confidence_z": "confidence (1.0 = 95 % intervals)",
    "lr_warmup_steps": "lr_warmup_samples (now counted in samples)",
}


class ConfigError(ValueError):
    """A controller setting is outside its accepted range."""


def _check(cond: bool, name: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"ControllerConfig.{name}={value!r} is invalid: accepted {accepted}.")


def config_changes(text: str) -> dict[str, Any]:
    """ControllerConfig field changes from a JSON object (a command-line argument), checked.

    Example:
        >>> config_changes('{"window_fraction": 0.2}')
        {'window_fraction': 0.2}
    """
    try:
        changes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config changes {text[:60]!r} are not JSON: {exc.msg}") from None
    ControllerConfig.from_dict(changes)  # unknown fields and bad values: one clear error
    return changes


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of :class:`~adabatch.AdaptiveBatchController`.

    Batch sizes count samples in one optimizer step across all processes. ``None`` bounds are
    filled in by the controller from the micro-batch size it is given.

    Example:
        >>> from adabatch import ControllerConfig
        >>> cfg = ControllerConfig(max_batch=1024, target_factor=2.0, lr_rule="sqrt")
        >>> cfg.replace(cooldown_samples=4096).cooldown_samples
        4096
    """

    # Bounds of the effective batch (samples per optimizer step).
    min_batch: int | None = None
    max_batch: int = 4096
    # The batch the user's learning rate (and LR schedule) was tuned for; defaults to the starting batch.
    base_batch: int | None = None
    # Effective batch at step 0; defaults to base_batch, else the micro-batch size.
    initial_batch: int | None = None
    # Which target the policy pursues: the noise scale (deterministic), or, from measured wall time
    # (opt-in, not reproducible bit for bit), goodput (progress per second), energy (progress per
    # joule) or Zeus's blend of both with weight eta on energy.
    policy: str = "noise"
    eta: float = 0.5
    # Noise policy: target batch = target_factor x B_simple. McCandlish et al.'s B_crit ~ B_noise
    # trains at twice the minimum samples; a larger factor trades samples for throughput. 1.0 was
    # the best single value on the benchmark suite (2.0 overshot on the AdamW workloads).
    target_factor: float = 1.0
    # Grow when even the target's confident lower end reaches grow_threshold x batch; shrink when
    # even its upper end falls to shrink_threshold x batch. The gap keeps decisions from thrashing.
    grow_threshold: float = 1.5
    shrink_threshold: float = 0.5
    # Width of the intervals decisions use: 1.0 is a 95 % interval; 0 acts on point estimates.
    confidence: float = 1.0
    # Largest factor by which one decision may change the batch.
    max_change_factor: float = 4.0
    # Samples a grow/shrink condition must hold before the batch moves, and samples after a change
    # during which the batch stays put.
    patience_samples: int = 0
    cooldown_samples: int = 0
    # The estimate averages per-step measurements over a window of max(min_window,
    # window_fraction x samples so far) samples.
    window_fraction: float = 0.1
    min_window: int = 2048
    # Measure every max(1, window / (measurements_per_window x batch)) steps, at most every
    # max_measure_every: measurements a window's horizon apart / this many (an exponential window
    # then averages about twice as many). A measured step costs about four passes over the
    # gradients; the others nothing.
    measurements_per_window: int = 16
    # Or measure every this many optimizer steps, whatever the window (None: the spacing above).
    measure_every: int | None = None
    # How a step is measured: per-example norms from hooks on Linear and convolution layers
    # ("examples", more precise; needs every trainable parameter in a torch.nn.Linear, Conv1d or
    # Conv2d), or the step's pieces taken alone ("pieces", any model). "auto" uses examples where
    # they are cheap (Linear layers: row norms, or Gram matrices of sequences without Adam) and
    # pieces elsewhere; "examples" also forms per-example gradients (convolutions, Adam on
    # sequences), which cost about a forward pass of the layer per measured step.
    measurement: str = "auto"
    # Opt-in: stretch the interval (up to max_measure_every) while the controller's own timing says
    # measuring takes more than this share of training time. Depends on wall-clock timing, so runs
    # are no longer reproducible bit for bit.
    measure_budget: float | None = None
    max_measure_every: int = 64
    # Evidence check: after a growth, compare the loss decrease per sample with the same span
    # before it; revert (and do not try that batch again for a while) when it fell significantly
    # below this share. With it, a growth in use when the step loss suddenly more than doubles is
    # undone at that step (adabatch.progress.LossSpike). 0 turns both off.
    min_efficiency: float = 0.5
    # Largest micro-batch (samples per process). None: as large as the step when the loader follows
    # the controller (its batch_sampler or next_micro_batch_size), and on CUDA as large as the
    # measured peak memory allows under memory_fraction of the device.
    max_micro_batch: int | None = None
    memory_fraction: float = 0.9
    # Learning-rate rule: auto picks sqrt for adaptive optimizers (Adam family), linear otherwise.
    lr_rule: str = "auto"
    # Samples over which the LR factor ramps to its new value after the batch grows.
    lr_warmup_samples: int = 0
    # Adam's betas for a changing batch (adabatch.betas): "beta2" raises beta2 to the power
    # batch / base_batch for each step, so the second moment remembers as many samples at every
    # batch; "both" does the same for beta1; "none" leaves them as set.
    beta_rule: str = "none"
    # How the controller steps the scheduler it is given: by samples / base_batch (a schedule sized
    # for the base batch ends when the sample budget does), by AdaScale's gain-weighted progress,
    # or once per optimizer step.
    schedule: str = "samples"
    # Noise scale flavour: auto picks preconditioned (Qiao et al. 2021) for Adam-family optimizers.
    noise_kind: str = "auto"
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
        _check(self.policy in POLICIES, "policy", self.policy, f"one of {', '.join(POLICIES)}")
        _check(_finite(self.eta) and 0 <= self.eta <= 1, "eta", self.eta, "a number in [0, 1]")
        _check(_finite(self.target_factor) and self.target_factor > 0, "target_factor", self.target_factor,
               "a number > 0")
        _check(_finite(self.grow_threshold) and self.grow_threshold > 1, "grow_threshold", self.grow_threshold,
               "a number > 1")
        _check(_finite(self.shrink_threshold) and 0 < self.shrink_threshold < 1, "shrink_threshold",
               self.shrink_threshold, "a number in (0, 1)")
        _check(_finite(self.confidence) and 0 <= self.confidence <= 10, "confidence", self.confidence,
               "a number in [0, 10] (1 = 95 % intervals)")
        _check(_finite(self.max_change_factor) and self.max_change_factor > 1, "max_change_factor",
               self.max_change_factor, "a number > 1")
        for name in ("patience_samples", "cooldown_samples", "min_window", "lr_warmup_samples"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, name, value, "an integer >= 0 (samples)")
        _check(_finite(self.window_fraction) and 0 < self.window_fraction <= 1, "window_fraction",
               self.window_fraction, "a number in (0, 1]")
        _check(_is_int(self.measurements_per_window) and self.measurements_per_window >= 2,
               "measurements_per_window", self.measurements_per_window, "an integer >= 2")
        _check(self.measure_every is None or (_is_int(self.measure_every) and self.measure_every >= 1),
               "measure_every", self.measure_every, "None or an integer >= 1")
        _check(self.measurement in MEASUREMENTS, "measurement", self.measurement, f"one of {', '.join(MEASUREMENTS)}")
        _check(self.measure_budget is None or (_finite(self.measure_budget) and 0 < self.measure_budget < 1),
               "measure_budget", self.measure_budget, "None or a number in (0, 1)")
        _check(_is_int(self.max_measure_every) and self.max_measure_every >= (self.measure_every or 1),
               "max_measure_every", self.max_measure_every, f"an integer >= measure_every={self.measure_every or 1}")
        _check(_finite(self.min_efficiency) and 0 <= self.min_efficiency < 1, "min_efficiency",
               self.min_efficiency, "a number in [0, 1) (0 turns the evidence check off)")
        _check(self.max_micro_batch is None or (_is_int(self.max_micro_batch) and self.max_micro_batch >= 1),
               "max_micro_batch", self.max_micro_batch, "None or an integer >= 1")
        _check(_finite(self.memory_fraction) and 0 < self.memory_fraction <= 1, "memory_fraction",
               self.memory_fraction, "a number in (0, 1]")
        _check(self.lr_rule in LR_RULES, "lr_rule", self.lr_rule, f"one of {', '.join(LR_RULES)}")
        _check(self.beta_rule in BETA_RULES, "beta_rule", self.beta_rule, f"one of {', '.join(BETA_RULES)}")
        _check(self.schedule in SCHEDULE_MODES, "schedule", self.schedule, f"one of {', '.join(SCHEDULE_MODES)}")
        _check(self.noise_kind in NOISE_KINDS, "noise_kind", self.noise_kind, f"one of {', '.join(NOISE_KINDS)}")
        _check(isinstance(self.extra, Mapping), "extra", self.extra, "a mapping")

    def replace(self, **changes: Any) -> "ControllerConfig":
        """A copy with ``changes`` applied (and validated)."""
        _no_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        return out

    def diff(self, other: "ControllerConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (this value, other value)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControllerConfig":
        """Build from a mapping; unknown keys are an error that lists the known ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a ControllerConfig needs a mapping of field names to values, got {type(data).__name__}.")
        _no_unknown(data)
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
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read controller config {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "adabatch_controller_config" not in data:
            raise ConfigError(f"{path} holds no 'adabatch_controller_config' object.")
        return cls.from_dict(data["adabatch_controller_config"])


def _no_unknown(data: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ControllerConfig)}
    unknown = sorted(set(data) - known)
    if not unknown:
        return
    renamed = [f"{k} was replaced by {RENAMED[k]}" for k in unknown if k in RENAMED]
    others = [k for k in unknown if k not in RENAMED]
    parts = renamed + ([f"unknown ControllerConfig field(s) {', '.join(others)}; known fields: "
                        f"{', '.join(sorted(known))}"] if others else [])
    raise ConfigError("; ".join(parts) + ".")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
