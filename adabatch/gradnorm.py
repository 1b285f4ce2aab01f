"""Gradient norms read from ``.grad`` after backward, optionally under Adam's preconditioner.

:func:`grad_norms` gives per-parameter norms as device tensors (one ``_foreach_norm`` for dense
gradients, nothing read back); :func:`squared_norm` sums them into one 0-dim tensor.

With Adam's preconditioner P_A = 1 / (sqrt(v_hat) + eps), from the optimizer's state before the
step (so it does not depend on the samples being measured), the norms are |P_A g|, which gives the
preconditioned noise scale of Qiao et al. (2021), Pollux, Sec. 3.1. :func:`adam_denominators`
computes the denominators once per measured step.

A coordinate that is almost never active (a rarely firing ReLU unit) has v_hat near 0, and the one
example that activates it has |P_A g| up to 1e5 times the median: on the MNIST-1D MLP under AdamW,
one example held 26 % of tr(P Sigma P) at step 100. Adam's own update is bounded there (its v
includes the current g^2). The denominator is therefore floored at ``RELATIVE_FLOOR`` times the
tensor's RMS of sqrt(v_hat): that changed the exact preconditioned B_simple by less than 3 % at
every checkpoint measured (steps 100 to 3,000), and brought the largest single example's share of
tr(P Sigma P) to 0.3 %.

Sharded gradients (FSDP2, ``torch.distributed.fsdp.fully_shard``): parameters and gradients are
DTensors and each rank holds one shard. The norms here are of the local shard only, so nothing is
communicated per parameter; the squared shard norms add up to the full squared norm, and the
controller sums them over ranks once per measurement, in the all-reduce it makes anyway. A mesh
dimension along which a tensor is replicated (HSDP) holds the same shard several times: its
squared norm is divided by the number of copies so that the sum over ranks counts it once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

RELATIVE_FLOOR = 1e-2  # of the tensor's RMS sqrt(v_hat): see the module docstring
# optimizers whose state holds Adam's second moments (exp_avg_sq), read by adam_denominators
ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)


def grad_norms(params: Sequence[Tensor], denominators: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Per-parameter norms |g_p / d_p| of the current ``.grad`` (0-dim float32 device tensors).

    ``denominators`` (from :func:`adam_denominators`, aligned with ``params``) turns on Adam's
    preconditioner. Parameters without a gradient are skipped.

    Example:
        >>> lin = torch.nn.Linear(3, 1)
        >>> lin(torch.ones(1, 3)).sum().backward()
        >>> round(sum(float(n) ** 2 for n in grad_norms(list(lin.parameters()))), 5)  # |d/dw|^2 + |d/db|^2
        4.0
    """
    grads, den, copies = [], [], []
    for i, p in enumerate(params):
        if p.grad is not None:
            g, c = local_shard(p.grad)
            grads.append(g)
            copies.append(c)
            if denominators is not None:
                den.append(local_shard(denominators[i])[0])
    if not grads:
        return [torch.zeros((), device=params[0].device)] if params else []
    if any(c != 1 for c in copies):
        return [n / c ** 0.5 for n, c in zip(_local_norms(grads, den), copies)]
    return _local_norms(grads, den)


def _local_norms(grads: list[Tensor], den: list[Tensor]) -> list[Tensor]:
    """Norms of plain (local) gradient tensors, divided by ``den`` when it is not empty."""
    if any(g.is_sparse for g in grads):
        return [_norm(g if not den else g / d) for g, d in zip(grads, den or grads)]
    if den:
        grads = torch._foreach_div(grads, den)
    if all(g.dtype == torch.float32 for g in grads):
        return list(torch._foreach_norm(grads, 2))  # the dtype argument would cost a slower kernel
    return list(torch._foreach_norm(grads, 2, dtype=torch.float32))  # bf16 sums would keep 8 bits


def local_shard(t: Tensor) -> tuple[Tensor, int]:
    """(the local tensor, the number of ranks holding a copy of it) of a DTensor; (t, 1) otherwise.

    Raises ValueError for a pending reduction (a ``Partial`` placement), whose local value is not
    a shard of the tensor.

    Example:
        >>> local_shard(torch.ones(2))
        (tensor([1., 1.]), 1)
    """
    placements = getattr(t, "placements", None)
    if placements is None or not hasattr(t, "to_local"):
        return t, 1
    copies = 1
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(f"a gradient is a DTensor with a pending reduction ({placement}); adabatch reads "
                             "sharded (Shard) or replicated (Replicate) gradients, as FSDP2 and DDP leave them.")
        if placement.is_replicate():
            copies *= t.device_mesh.size(dim)
    return t.to_local(), copies


def squared_norm(params: Sequence[Tensor], denominators: Sequence[Tensor] | None = None) -> Tensor:
    """|P_A g|^2 summed over ``params`` as one 0-dim float32 tensor (no read-back).

    Example:
        >>> lin = torch.nn.Linear(3, 1)
        >>> lin(torch.ones(1, 3)).sum().backward()
        >>> float(squared_norm(list(lin.parameters())))
        4.0
    """
    return torch.stack(grad_norms(params, denominators)).square().sum()


def _norm(g: Tensor) -> Tensor:
    if g.is_sparse:
        g = g.coalesce().values()
    return torch.linalg.vector_norm(g, dtype=torch.float32)


def adam_denominators(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """sqrt(v_hat) + max(eps, RELATIVE_FLOOR x RMS(sqrt(v_hat))) per parameter, from Adam's state.

    v_hat = v / (1 - beta2^t); aligned with ``params``. None until every parameter has Adam state
    (before the first step).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> adam_denominators(opt, [w]) is None
        True
        >>> (w * torch.tensor([1.0, 2.0])).sum().backward(); opt.step()
        >>> [round(float(x), 4) for x in adam_denominators(opt, [w])[0]]  # sqrt(v_hat) = 1, 2; floor 0.01 x 1.58
        [1.0158, 2.0158]
    """
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    v, corrections, eps = [], [], []
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st or p not in group_of:
            return None
        group = group_of[p]
        v.append(st["exp_avg_sq"])
        corrections.append(1.0 - group["betas"][1] ** float(st["step"]))  # step: a CPU tensor by default
        eps.append(group["eps"])
    with torch.no_grad():
        den = torch._foreach_div(v, corrections)
        torch._foreach_sqrt_(den)
        norms = torch._foreach_norm(den)  # |sqrt(v_hat)| = sqrt(n) x RMS(sqrt(v_hat))
        for d, norm, e in zip(den, norms, eps):
            if hasattr(norm, "full_tensor"):  # a shard's norm (FSDP2): the floor is the whole tensor's RMS
                norm = norm.full_tensor()
            local_shard(d)[0].add_(torch.clamp(norm * (RELATIVE_FLOOR / d.numel() ** 0.5), min=e))
    return list(den)
