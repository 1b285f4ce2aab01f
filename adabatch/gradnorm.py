"""Squared gradient norms for the two-batch-size estimator, read from ``.grad`` without hooks.

A measured step accumulates k >= 2 micro-batches of n_1, ..., n_k samples. The controller weights
micro-batch i's mean loss by n_i / P (P the samples the step planned), so micro-batch i alone
contributes (n_i / P) G_{n_i} and the step's sum is (N / P) G_N, with G_n the mean gradient over n
samples and N = sum n_i. The estimator needs |G_{n_i}|^2 (small batches) and |G_N|^2 (the big one).

:class:`MicroBatchNorms` gets micro-batches 1..k-1 alone without a hook and without a copy: before
micro-batch i it moves the accumulated ``.grad`` tensors aside (a reference swap), so autograd
writes micro-batch i's gradient into fresh ``.grad`` tensors, exactly as it does for the first
micro-batch of any step; it takes their norms and adds them into the set-aside sums, which go back
into ``.grad``. The last micro-batch accumulates in place as usual (under DDP, its backward is the
one whose all-reduce must see the whole sum), and the norm of the sum is taken at the step. A step
of k micro-batches thus reads the gradients 2k - 1 times (k norms, k - 2 additions) and reads
nothing back until the step.

With a preconditioner P_A (Adam's 1 / (sqrt(v_hat) + eps)), the norms are |P_A g|^2, which gives
the preconditioned noise scale of Qiao et al. (2021), Pollux, Sec. 3.1.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Above this many parameters, a preconditioned norm is taken one tensor at a time, so the
# temporary P_A g never holds more than one parameter's worth of memory.
FOREACH_MAX_NUMEL = 50_000_000

SecondMoment = tuple  # (exp_avg_sq, 1 - beta2^t, eps) of one parameter


def grad_norms(params: Sequence[Tensor], moments: Sequence[SecondMoment] | None = None) -> list[Tensor]:
    """Per-parameter norms |P_A g_p| of the current ``.grad`` (0-dim float32 device tensors).

    ``moments`` (from :func:`adam_second_moments`) turns on Adam's preconditioner.

    Example:
        >>> lin = torch.nn.Linear(3, 1)
        >>> lin(torch.ones(1, 3)).sum().backward()
        >>> round(sum(float(n) ** 2 for n in grad_norms(list(lin.parameters()))), 5)  # |d/dw|^2 + |d/db|^2
        4.0
    """
    grads, mom = [], []
    for i, p in enumerate(params):
        if p.grad is not None:
            grads.append(p.grad)
            if moments is not None:
                mom.append(moments[i])
    if not grads:
        raise RuntimeError("no parameter has a gradient: call controller.backward(loss) before step()")
    sparse = any(g.is_sparse for g in grads)
    if mom and (sparse or sum(g.numel() for g in grads) > FOREACH_MAX_NUMEL):
        return [_norm(g / (v / c).sqrt().add_(eps)) for g, (v, c, eps) in zip(grads, mom)]
    if sparse:
        return [_norm(g) for g in grads]
    if mom:
        den = torch._foreach_div([v for v, _, _ in mom], [c for _, c, _ in mom])
        torch._foreach_sqrt_(den)
        torch._foreach_add_(den, [eps for _, _, eps in mom])
        grads = torch._foreach_div(grads, den)
    if all(g.dtype == torch.float32 for g in grads):
        return list(torch._foreach_norm(grads, 2))  # the dtype argument would cost a slower kernel
    return list(torch._foreach_norm(grads, 2, dtype=torch.float32))  # bf16 sums would keep 8 bits


class MicroBatchNorms:
    """Norms of each micro-batch's own gradient and of the step's sum, during one measured step.

    Call :meth:`before_backward` and :meth:`after_backward` around each of the step's k
    micro-batches, telling the last one; then :meth:`finish` at the step. ``alone`` holds the
    per-parameter norms of micro-batches 1..k-1 taken alone, ``total`` those of the sum. The last
    micro-batch is never set aside: it accumulates into the sum in place (under DDP, that is the
    backward whose all-reduce must see the whole sum), and one norm of the sum replaces two passes.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> cap = MicroBatchNorms(list(lin.parameters()))
        >>> for i, x in enumerate(([[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 0.0]])):
        ...     cap.before_backward(last=i == 2); lin(torch.tensor(x)).sum().backward(); cap.after_backward()
        >>> cap.finish()
        >>> [float(n[0]) for n in cap.alone], round(float(cap.total[0]) ** 2, 4), lin.weight.grad.tolist()
        ([1.0, 2.0], 20.0, [[4.0, 2.0]])
    """

    def __init__(self, params: Sequence[Tensor], moments: Sequence[SecondMoment] | None = None) -> None:
        self.params = params
        self.moments = moments
        self.alone: list[list[Tensor]] = []
        self.total: list[Tensor] = []
        self._sums: list[Tensor | None] | None = None
        self._last = False

    def before_backward(self, last: bool) -> None:
        self._last = last
        if self.alone and not last:  # set the running sum aside; autograd fills fresh .grad tensors
            self._sums = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None

    def after_backward(self) -> None:
        if self._last:
            return
        self.alone.append(grad_norms(self.params, self.moments))
        sums, self._sums = self._sums, None
        if sums is None:
            return
        fresh = [p.grad for p in self.params]
        pairs = [(s, g) for s, g in zip(sums, fresh) if s is not None and g is not None]
        if any(s.is_sparse or g.is_sparse for s, g in pairs):
            for s, g in pairs:
                s.add_(g)
        elif pairs:
            torch._foreach_add_([s for s, _ in pairs], [g for _, g in pairs])
        for p, s, g in zip(self.params, sums, fresh):
            p.grad = s if s is not None else g

    def finish(self) -> None:
        self.total = grad_norms(self.params, self.moments)


def _norm(g: Tensor) -> Tensor:
    if g.is_sparse:
        g = g.coalesce().values()
    return torch.linalg.vector_norm(g, dtype=torch.float32)



def adam_second_moments(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[SecondMoment] | None:
    """(v, 1 - beta2^t, eps) per parameter, so P_A = 1 / (sqrt(v / (1 - beta2^t)) + eps); None until
    every parameter has Adam state (before the first step)."""
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
        step = float(st["step"])  # a CPU tensor for Adam's default (non-capturable) path
        out.append((v, 1.0 - group["betas"][1] ** step, group["eps"]))
    return out
