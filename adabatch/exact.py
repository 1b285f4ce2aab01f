"""Exact noise scales of a model at its current weights: the oracle to check an estimate against.

The controller estimates B_simple = tr(Sigma) / |G|^2 from a few norms per measured step
(:mod:`adabatch.noise`). :func:`exact_noise_scales` computes it from every per-example gradient of a
probe set, and beside it the noise scale of McCandlish et al.'s model (2018, "An empirical model of
large-batch training", eq. 2.8 and App. A), B_noise = tr(H Sigma) / (G^T H G), with H the Hessian
of the probe set's loss: the batch at which, in their model, a step makes half the progress of a
step on the full gradient, and past which a larger batch costs samples. B_simple is B_noise with H
taken to be a multiple of the identity.

Under Adam the controller reads gradients through the preconditioner P = 1 / (sqrt(v_hat) + eps)
(:func:`adabatch.gradnorm.adam_denominators`, as Pollux does): B_simple = tr(P Sigma P) / |P G|^2
and B_noise = tr(P H P Sigma) / (G^T P H P G), the model's noise scale for the update P g.

Per-example gradients come from ``torch.func`` (``vmap`` over ``grad``), ``chunk`` examples at a
time; tr(Sigma) is exact over the probe set, tr(H Sigma) is averaged over ``directions`` per-example
deviations drawn at random (each one Hessian-vector product by double backward), with its standard
error. The cost is a few backward passes per example and per direction: a tool for probe sets of
thousands of examples and models that fit many times in memory, not for every step.

The model is called as it is: put it in ``eval()`` first if dropout or batch statistics would make
one example's gradient depend on the call. ``loss_fn(output, target)`` must be the mean of the
per-example losses.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad(): _ = lin.weight.copy_(torch.tensor([[0.5, 0.0]]))
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    >>> y = torch.tensor([[1.0], [0.0], [2.0], [0.0]])
    >>> s = exact_noise_scales(lin, lambda o, t: ((o - t) ** 2).mean(), x, y, directions=4)
    >>> round(s.b_simple, 3), round(s.b_noise, 3), s.curvature_gradient   # H = [[1.5, .5], [.5, 1]]
    (4.593, 4.508, 1.75)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from adabatch.gradnorm import ADAM_FAMILY, adam_denominators


@dataclass(frozen=True)
class ExactNoiseScales:
    """What :func:`exact_noise_scales` measured over one probe set.

    ``b_noise_rel_se`` is the standard error of tr(H Sigma) over the directions, relative to it;
    ``curvature_gradient`` = (PG)^T H (PG) / |PG|^2 and ``curvature_noise`` = tr(P H P Sigma) /
    tr(P Sigma P), the curvature along the gradient and along the noise, whose ratio
    curvature_noise / curvature_gradient is B_noise / B_simple.
    """

    b_simple: float
    b_noise: float
    b_noise_rel_se: float
    curvature_gradient: float
    curvature_noise: float
    examples: int
    directions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PerExample:
    """One pass over a probe set's per-example gradients g_i (flattened, float64).

    ``total`` is sum_i g_i, ``squares`` sum_i |P g_i|^2, ``scale`` the preconditioner P's diagonal
    (ones without Adam), and ``kept`` the rows asked for, by index.
    """

    total: Tensor
    squares: float
    scale: Tensor
    kept: dict[int, Tensor]
    n: int

    @property
    def mean(self) -> Tensor:
        return self.total / self.n

    @property
    def g2(self) -> float:
        """|P G|^2, G the probe set's mean gradient."""
        pg = self.mean * self.scale
        return float(pg @ pg)


def per_example_gradients(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                          optimizer: torch.optim.Optimizer | None = None, chunk: int = 256,
                          keep: Sequence[int] = ()) -> PerExample | None:
    """Sums over the per-example gradients of ``loss_fn(model(x[i:i+1]), y[i:i+1])``, ``chunk`` at a time.

    With an Adam-family ``optimizer`` (Adam, AdamW, NAdam, RAdam) the norms are read through its
    preconditioner as the controller reads them; None before its first step (no second moments
    yet). Any other optimizer, or none, reads them as they are.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    scale = torch.ones(sum(p.numel() for p in params), dtype=torch.float64, device=params[0].device)
    if isinstance(optimizer, ADAM_FAMILY):
        den = adam_denominators(optimizer, params)
        if den is None:
            return None
        scale = 1.0 / torch.cat([d.reshape(-1) for d in den]).double()
    detached = {name: p.detach() for name, p in zip(names, params)}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    total = torch.zeros_like(scale)
    squares = 0.0
    kept: dict[int, Tensor] = {}
    for at in range(0, len(x), chunk):
        per = per_example(detached, x[at:at + chunk], y[at:at + chunk])
        g = torch.cat([per[name].reshape(len(per[name]), -1) for name in names], 1).double()
        total += g.sum(0)
        squares += float(((g * scale) ** 2).sum())
        kept.update({i: g[i - at].clone() for i in keep if at <= i < at + len(g)})
    return PerExample(total, squares, scale, kept, len(x))


def exact_noise_scales(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                       optimizer: torch.optim.Optimizer | None = None, directions: int = 32, seed: int = 0,
                       chunk: int = 256) -> ExactNoiseScales | None:
    """B_simple and B_noise of ``loss_fn(model(x), y)`` over the probe set (x, y), at the current weights.

    The gradients are read as :func:`per_example_gradients` reads them (None before an Adam-family
    optimizer's first step). tr(P Sigma P) is the unbiased (n / (n - 1)) mean square of the
    deviations u_i = P (g_i - G); tr(P H P Sigma) the mean of u_i^T H u_i over ``directions``
    examples drawn with ``seed``, with the same n / (n - 1).
    """
    n = len(x)
    if n < 2:
        raise ValueError(f"exact_noise_scales needs at least two examples, got {n}")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(directions, n)].tolist()
    sums = per_example_gradients(model, loss_fn, x, y, optimizer, chunk, keep=pick)
    if sums is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    mean, scale, g2 = sums.mean, sums.scale, sums.g2
    pg = mean * scale
    trace = (sums.squares - n * g2) / (n - 1)
    if g2 == 0.0:  # a stationary point of the probe set's loss: every batch is all noise
        return ExactNoiseScales(math.inf, math.inf, math.nan, math.nan, math.nan, n, 0)

    def hvp(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        for at in range(0, n, chunk):
            xs, ys = x[at:at + chunk], y[at:at + chunk]
            grads = torch.autograd.grad(loss_fn(model(xs), ys), params, create_graph=True)
            flat = torch.cat([q.reshape(-1) for q in grads])
            hv = torch.autograd.grad(flat @ v.to(flat.dtype), params)
            out += torch.cat([q.reshape(-1) for q in hv]).double() * (len(xs) / n)
        return out

    g_curv = float(pg @ hvp(pg)) / g2
    u = [(sums.kept[i] - mean) * scale for i in pick]
    quads = [float(v @ hvp(v)) for v in u]
    u2 = statistics.fmean(float(v @ v) for v in u)
    trace_h = statistics.fmean(quads) * n / (n - 1)  # deviations from the probe set's own mean, as for tr(Sigma)
    se_h = statistics.stdev(quads) * n / (n - 1) / math.sqrt(len(quads)) if len(quads) > 1 else math.inf
    return ExactNoiseScales(
        b_simple=trace / g2, b_noise=trace_h / (g2 * g_curv) if g_curv > 0 else math.inf,
        b_noise_rel_se=se_h / abs(trace_h) if trace_h else math.inf, curvature_gradient=g_curv,
        curvature_noise=statistics.fmean(quads) / u2 if u2 else math.nan, examples=n, directions=len(quads))
