"""Adam's moving averages for a changing batch: their memory kept constant in samples.

Adam keeps exponential averages of the gradient (``beta1``) and of its square (``beta2``) over
*steps*: with ``beta2 = 0.999`` the second moment remembers about 1 / (1 - beta2) = 1,000 steps.
When the batch grows from B0 to B, each step holds B / B0 times the samples, so the same betas
remember B / B0 times as much data, and after a change of batch the averages lag by that much: the
squared gradient of a large, less noisy batch is smaller, and a second moment still full of the
small batch's noisier gradients shrinks every step. Keeping the memory constant in samples means
raising each beta to the power of the ratio:

    beta' = beta ** (B / B0)

which keeps the half-life ln(1/2) / ln(beta') * B samples where it was at the base batch. This is
the exponential form of the SDE scaling rule for Adam (Malladi, Lyu, Panigrahi and Arora 2022,
"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms": with the LR scaled by sqrt(B / B0),
1 - beta scales by B / B0), which the linear form cannot follow past B / B0 = 1 / (1 - beta1) = 10;
Marek et al. 2025 ("Small Batch Size Training for Language Models") keep beta2's half-life in
tokens fixed across batch sizes the same way.

Rules (``ControllerConfig.beta_rule``):

- ``none``:  the betas stay as the user set them;
- ``beta2``: only the second moment's memory follows the batch;
- ``both``:  both betas follow it (at a sixteenfold batch, beta1 = 0.9 ** 16 = 0.19: little momentum
  left, as the SDE rule prescribes).

As with the learning rate (:mod:`adabatch.lr`), the betas are set only for the duration of
``optimizer.step()`` and restored right after, so ``param_groups`` and the optimizer's state dict
hold the user's values. A rule set for an optimizer without a ``betas`` pair of numbers (SGD, or
tensor betas) is a :class:`~adabatch.config.ConfigError`; groups without one are left alone.

Example:
    >>> [round(b, 4) for b in scaled_betas((0.9, 0.999), 4.0, "beta2")]
    [0.9, 0.996]
    >>> [round(b, 4) for b in scaled_betas((0.9, 0.999), 4.0, "both")]
    [0.6561, 0.996]
"""

from __future__ import annotations

from typing import Any

import torch

from adabatch.config import BETA_RULES, ConfigError


def scaled_betas(betas: tuple[float, float], ratio: float, rule: str) -> tuple[float, float]:
    """The betas for a step of ``ratio`` times the base batch under ``rule``."""
    b1, b2 = betas
    if rule == "none" or ratio == 1.0:
        return b1, b2
    if rule == "beta2":
        return b1, float(b2) ** ratio
    if rule == "both":
        return float(b1) ** ratio, float(b2) ** ratio
    raise ValueError(f"unknown beta rule {rule!r}; use one of {', '.join(BETA_RULES)}")


def _pair_of_numbers(betas: Any) -> bool:
    return (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas))


class BetaScaler:
    """Sets every group's betas for the step's batch around ``optimizer.step()`` (see the module docstring)."""

    def __init__(self, rule: str, base_batch: int) -> None:
        if rule not in BETA_RULES:
            raise ValueError(f"unknown beta rule {rule!r}; use one of {', '.join(BETA_RULES)}")
        self.rule, self.base_batch = rule, base_batch

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """A clear error when the rule is set for an optimizer it cannot act on (no numeric betas)."""
        if self.rule != "none" and not any(_pair_of_numbers(g.get("betas")) for g in optimizer.param_groups):
            raise ConfigError(f"ControllerConfig.beta_rule={self.rule!r} needs an optimizer with a pair of numeric "
                              f"betas in its parameter groups (Adam, AdamW, NAdam, RAdam, Adamax, ...), not "
                              f"{type(optimizer).__name__}; use 'none'.")

    def apply(self, optimizer: torch.optim.Optimizer, batch: int) -> list[Any] | None:
        """Set the betas for a step of ``batch`` samples; the user's values for :meth:`restore`, or None."""
        ratio = batch / self.base_batch
        if self.rule == "none" or ratio == 1.0:
            return None
        saved = [g.get("betas") for g in optimizer.param_groups]
        for g, betas in zip(optimizer.param_groups, saved):
            if _pair_of_numbers(betas):
                g["betas"] = scaled_betas(tuple(betas), ratio, self.rule)
        return saved

    @staticmethod
    def restore(optimizer: torch.optim.Optimizer, saved: list[Any] | None) -> None:
        if saved is None:
            return
        for g, betas in zip(optimizer.param_groups, saved):
            if betas is not None:
                g["betas"] = betas
