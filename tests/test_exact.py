"""The exact noise scales the estimate is checked against: per-example gradients and Hessian-vector products."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from adabatch.exact import exact_noise_scales
from adabatch.gradnorm import adam_denominators


def test_exact_noise_scales_match_an_explicit_hessian_under_adams_preconditioner():
    """B_simple and B_noise of a small GELU net after two AdamW steps equal what the full Hessian
    (torch.autograd.functional.hessian) and per-example gradients taken one at a time give, with
    every example a direction, preconditioned by the denominators the controller reads."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    x, y = torch.randn(24, 3), torch.randn(24, 2)
    loss_fn = torch.nn.functional.mse_loss
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    got = exact_noise_scales(net, loss_fn, x, y, optimizer=opt, directions=len(x), chunk=5)

    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def unflat(v):
        out, at = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[at:at + s.numel()].reshape(s)
            at += s.numel()
        return out

    p = 1 / torch.cat([d.reshape(-1) for d in adam_denominators(opt, params)]).double()
    net64 = net.double()
    h = torch.autograd.functional.hessian(lambda v: loss_fn(functional_call(net64, unflat(v), (x.double(),)), y.double()),
                                          flat0)
    g = torch.stack([torch.autograd.functional.jacobian(
        lambda v: loss_fn(functional_call(net64, unflat(v), (x[i:i + 1].double(),)), y[i:i + 1].double()), flat0)
        for i in range(len(x))])
    sigma = torch.cov(g.T)  # unbiased
    pg = p * g.mean(0)
    php = p[:, None] * h * p[None, :]
    b_simple = float((p * p * torch.diagonal(sigma)).sum() / (pg @ pg))
    b_noise = float(torch.trace(php @ sigma) / (g.mean(0) @ php @ g.mean(0)))
    assert got.b_simple == pytest.approx(b_simple, rel=1e-4)
    assert got.b_noise == pytest.approx(b_noise, rel=1e-4)
    assert got.b_noise / got.b_simple == pytest.approx(got.curvature_noise / got.curvature_gradient, rel=1e-4)


def test_chunks_change_nothing_and_adam_before_its_first_step_gives_none():
    """The per-example gradients and Hessian-vector products taken a few examples at a time give the
    values taken all at once; with Adam and no second moments yet there is no preconditioner to read
    through, a probe set of one example has no spread, and where the mean gradient vanishes every
    batch is all noise."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    ce = torch.nn.functional.cross_entropy
    whole = exact_noise_scales(net, ce, x, y, directions=10, chunk=40)
    pieces = exact_noise_scales(net, ce, x, y, directions=10, chunk=7)
    for key in ("b_simple", "b_noise", "curvature_gradient", "curvature_noise"):
        assert getattr(pieces, key) == pytest.approx(getattr(whole, key), rel=1e-6)  # float32 sums in another order
    assert exact_noise_scales(net, ce, x, y, optimizer=torch.optim.Adam(net.parameters())) is None
    with pytest.raises(ValueError, match="at least two examples"):
        exact_noise_scales(net, ce, x[:1], y[:1])
    line = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        line.weight.zero_()  # example gradients -2 y x = -2 and +2: the mean gradient is exactly 0
    flat = exact_noise_scales(line, torch.nn.functional.mse_loss, torch.tensor([[1.0], [-1.0]]), torch.ones(2, 1))
    assert flat.b_simple == flat.b_noise == float("inf")
