"""Batch policies: what effective batch to aim for, given a noise scale.

A policy proposes a *target* batch from what is known now (a noise scale, the current batch, and for
goodput or energy policies an online throughput profile). Targets never fall as the noise scale
rises, so :class:`~adabatch.decide.Decider` can map the noise scale's confidence interval to a range
of targets and move only when the whole range says so. Pass a :class:`BatchPolicy` instance to the
controller, or name one in ``ControllerConfig.policy`` (:func:`make_policy` is the registry).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

from adabatch.config import ConfigError, ControllerConfig


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

    def observe(self, batch: int, samples: int, seconds: float, joules: float | None,
                measured: bool = False) -> None:
        """Learn from steps run at ``batch`` (``measured``: the controller's measured steps).
        Policies without a profile ignore it."""

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


def make_policy(config: ControllerConfig) -> BatchPolicy:
    """The policy ``config.policy`` names (the one registry of policy names).

    ``zeus`` reads ``max_power_w`` from ``config.extra`` if set.

    Example:
        >>> type(make_policy(ControllerConfig(policy="energy"))).__name__
        'GoodputPolicy'
    """
    if config.policy == "noise":
        return NoiseScalePolicy(config.target_factor)
    from adabatch.goodput import GoodputPolicy

    if config.policy == "goodput":
        return GoodputPolicy("time")
    if config.policy == "energy":
        return GoodputPolicy("energy")
    if config.policy == "zeus":
        power = config.extra.get("max_power_w")
        if power is not None and not (isinstance(power, (int, float)) and not isinstance(power, bool)
                                      and math.isfinite(power) and power > 0):
            raise ConfigError(f"ControllerConfig.extra['max_power_w']={power!r} is invalid: accepted a "
                              "number of watts > 0, or leave it out to use the highest power observed.")
        return GoodputPolicy("zeus", eta=config.eta, max_power_w=None if power is None else float(power))
    raise ConfigError(f"ControllerConfig.policy={config.policy!r} has no policy; accepted noise, goodput, "
                      "energy, zeus.")
