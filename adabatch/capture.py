"""Squared gradient norms of micro-batches and of the accumulated gradient, without copies.

At measurement steps the controller arms one tensor hook per parameter. A leaf's hook receives the
gradient contribution of the current backward pass before autograd adds it into ``.grad``, so the
hook sees exactly this micro-batch's gradient; it adds |g|^2 to a list of 0-dim device tensors that
are summed once per micro-batch. Nothing is copied and nothing leaves the device: the values are
read at the step's end, where the controller already synchronises. Between measurement steps no
hook is registered at all, so those steps cost nothing.

With a preconditioner P (Adam's 1 / (sqrt(v_hat) + eps)), the norms are |P g|^2, which gives the
preconditioned noise scale of Qiao et al. (2021), Pollux, Sec. 3.1.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def _sq_norm(g: Tensor) -> Tensor:
    if g.is_sparse:
        g = g.coalesce().values()
    if g.dtype in _HALF:
        g = g.float()  # a bf16 dot product would round the sum to 8 bits of mantissa
    flat = g.reshape(-1)
    return torch.dot(flat, flat)


def sum_of_squares(norms: Sequence[Tensor]) -> Tensor:
    """Sum of the squares of 0-dim and 1-dim norm tensors, as one 0-dim tensor."""
    return torch.cat([n.reshape(-1) for n in norms]).square().sum()


def accumulated_norms(params: Sequence[Tensor], precond: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """Per-parameter norms of the accumulated gradients (optionally preconditioned), float32."""
    grads, pcs = [], []
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        grads.append(p.grad)
        pcs.append(precond[i] if precond is not None else None)
    if not grads:
        raise RuntimeError("no parameter has a gradient: call controller.backward(loss) before step()")
    if any(pc is not None for pc in pcs):
        grads = [g * pc if pc is not None else g for g, pc in zip(grads, pcs)]
    if any(g.is_sparse for g in grads):
        return [_sq_norm(g).sqrt() for g in grads]
    return list(torch._foreach_norm(grads, 2, dtype=torch.float32))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """1 / (sqrt(v / (1 - beta2^t)) + eps) per parameter, or None until every one has Adam state."""
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    out = []
    for p in params:
        st = optimizer.state.get(p, {})
        v = st.get("exp_avg_sq")
        if v is None or p not in group_of:
            return None
        group = group_of[p]
        beta2 = group["betas"][1]
        step = float(st["step"])  # a CPU tensor for Adam's default (non-capturable) path
        correction = 1.0 - beta2**step
        out.append(torch.reciprocal(torch.sqrt(v / correction) + group["eps"]))
    return out


class GradNormCapture:
    """Collects the summed |g_i|^2 of the micro-batches of one measured step.

    Two ways to reduce a micro-batch, chosen by model size. Small models are bound by per-op
    launch cost: the hooks only keep references to the incoming gradients and one
    ``_foreach_norm`` per micro-batch reduces them all (incoming gradients live until the end of
    that backward pass, at most one extra gradient's memory). Models above ``inline_above``
    parameters are bound by memory: each hook reduces its own gradient at once and keeps a scalar.

    Example:
        >>> lin = torch.nn.Linear(3, 1)
        >>> cap = GradNormCapture(list(lin.parameters()))
        >>> cap.arm()
        >>> lin(torch.ones(1, 3)).sum().backward(); cap.end_micro_batch()
        >>> cap.disarm(); cap.count, float(sum_of_squares(cap.norms()))  # |d/dw|^2 + |d/db|^2 = 3 + 1
        (1, 4.0)
    """

    def __init__(self, params: Sequence[Tensor], inline_above: int = 50_000_000) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.inline = sum(p.numel() for p in self.params) > inline_above
        self._handles: list = []
        self._parts: list[Tensor] = []
        self._per_micro: list[Tensor] = []
        self.count = 0

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, precond: Sequence[Tensor | None] | None = None) -> None:
        self.disarm()
        self._per_micro, self.count = [], 0
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(self._hook(precond[i] if precond is not None else None)))

    def _hook(self, pc: Tensor | None):
        parts, inline = self._parts, self.inline

        def hook(g: Tensor) -> None:
            if pc is not None:
                g = g * pc
            parts.append(_sq_norm(g) if inline or g.is_sparse else g)

        return hook

    def end_micro_batch(self) -> None:
        """Close one micro-batch: reduce its parts to per-parameter norms on the device."""
        parts = self._parts
        if not parts:
            return
        if self.inline or any(p.dim() == 0 for p in parts):
            self._per_micro.append(torch.stack([p if p.dim() == 0 else _sq_norm(p) for p in parts]).sqrt())
        else:
            self._per_micro.extend(torch._foreach_norm(parts, 2, dtype=torch.float32))
        parts.clear()
        self.count += 1

    def norms(self) -> list[Tensor]:
        """Every norm taken this step (0-dim or 1-dim float32 tensors); their squares sum to sum_i |g_i|^2."""
        return self._per_micro

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._parts.clear()
