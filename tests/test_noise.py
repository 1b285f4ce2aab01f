"""The noise-scale estimate against closed-form and exact per-example truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.noise import BiasCorrectedEMA, NoiseScaleEstimator, unbiased_grad_sq, unbiased_trace_sigma
from adabatch.workloads import linreg_noise_scale, mlp, mnist1d_data


def test_two_batch_estimators_are_unbiased_on_exact_expectations():
    g2, tr = 2.5, 300.0
    for b, big in [(8, 32), (16, 256), (1, 2)]:
        small, large = g2 + tr / b, g2 + tr / big
        assert unbiased_grad_sq(small, large, b, big) == pytest.approx(g2)
        assert unbiased_trace_sigma(small, large, b, big) == pytest.approx(tr)


def test_two_batch_estimator_rejects_equal_sizes():
    with pytest.raises(ValueError, match="b < B"):
        unbiased_grad_sq(1.0, 1.0, 8, 8)


def test_bias_corrected_ema_has_no_startup_bias():
    ema = BiasCorrectedEMA(0.99)
    for _ in range(3):
        ema.update(7.0)
    assert ema.value == pytest.approx(7.0)


def test_ema_stderr_matches_the_spread_of_the_ema_over_independent_runs():
    g = torch.Generator().manual_seed(0)
    values, stderrs = [], []
    for _ in range(400):
        ema = BiasCorrectedEMA(0.9)
        for x in (3.0 + 2.0 * torch.randn(60, generator=g)).tolist():
            ema.update(x)
        values.append(ema.value)
        stderrs.append(ema.stderr)
    spread = float(torch.tensor(values).std())
    # stationary EMA of iid data: std = sigma * sqrt((1 - d) / (1 + d)) = 2 * 0.229
    assert spread == pytest.approx(2.0 * math.sqrt(0.1 / 1.9), rel=0.15)
    assert sum(stderrs) / len(stderrs) == pytest.approx(spread, rel=0.15)


def test_noise_scale_bounds_bracket_the_point_estimate_and_widen_with_z():
    est = NoiseScaleEstimator(0.9)
    g = torch.Generator().manual_seed(1)
    smalls = (11.0 + torch.randn(50, generator=g)).tolist()
    bigs = (2.0 + 0.1 * torch.randn(50, generator=g)).tolist()
    for small, big in zip(smalls, bigs):
        est.update(small, big, 10, 100)
    lo1, hi1 = est.b_simple_bounds(1.0)
    lo2, hi2 = est.b_simple_bounds(2.0)
    assert lo2 < lo1 < est.b_simple < hi1 < hi2
    assert est.b_simple_bounds(0.0) == (pytest.approx(est.b_simple), pytest.approx(est.b_simple))


def test_estimator_rejects_and_counts_nonfinite_measurements():
    est = NoiseScaleEstimator(0.5)
    est.update(11.0, 2.0, 10, 100)
    before = est.state_dict()
    assert not est.update(math.nan, 2.0, 10, 100)
    assert not est.update(11.0, math.inf, 10, 100)
    assert est.rejected == 2
    after = est.state_dict()
    after.pop("rejected"), before.pop("rejected")
    assert after == before


def _frozen_linreg(delta_sq: float, noise_var: float, dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.ones(1, dim) * math.sqrt(delta_sq / dim))  # w* = 0
    return model


def _linreg_batches(dim: int, noise_var: float, micro: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(micro, dim, generator=g)
        y = math.sqrt(noise_var) * torch.randn(micro, generator=g)
        yield x, y


def test_estimate_matches_analytic_noise_on_linear_regression():
    dim, noise_var, delta_sq = 16, 4.0, 1.0
    model = _frozen_linreg(delta_sq, noise_var, dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen weights: the truth stays put
    cfg = ControllerConfig(measure_every=1, measure_budget=None, ema_decay=0.99, initial_batch=64, min_batch=64, max_batch=64)
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=8, config=cfg)
    batches = _linreg_batches(dim, noise_var, 8, seed=1)
    while ctl.steps < 1500:
        x, y = next(batches)
        ctl.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean())
        ctl.step()
    true_trace = dim * (delta_sq + noise_var) + delta_sq
    assert ctl.estimator.grad_sq == pytest.approx(delta_sq, rel=0.10)
    assert ctl.estimator.trace_sigma == pytest.approx(true_trace, rel=0.10)
    assert ctl.noise_scale == pytest.approx(linreg_noise_scale(delta_sq, dim, noise_var), rel=0.10)


def _exact_b_simple(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(Sigma) / |G|^2 from every per-example gradient (torch.func), population statistics."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    sq_sum = 0.0
    for xs, ys in zip(x.split(500), y.split(500)):
        grads = per_example(params, xs, ys)
        for k, g in grads.items():
            total[k] += g.sum(0)
            sq_sum += float(g.pow(2).sum())
    n = len(x)
    g_sq = sum(float((t / n).pow(2).sum()) for t in total.values())
    trace = sq_sum / n - g_sq
    return trace / g_sq


def _estimate_frozen(model, data, micro: int, k: int, steps: int, autocast: bool = False, seed: int = 0):
    """Controller estimate at fixed weights, micro-batches drawn with replacement from the train set."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = micro * k
    cfg = ControllerConfig(measure_every=1, measure_budget=None, ema_decay=0.99, initial_batch=batch, min_batch=batch, max_batch=batch)
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=micro, config=cfg)
    g = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    while ctl.steps < steps:
        idx = torch.randint(0, n, (micro,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(data.x_train[idx])
        loss = nn.functional.cross_entropy(out.float(), data.y_train[idx])
        ctl.backward(loss)
        ctl.step()
    return ctl.noise_scale


@pytest.fixture(scope="module")
def mnist1d():
    return mnist1d_data(0)


def test_estimate_matches_exact_per_example_noise_scale_on_mnist1d_mlp(mnist1d):
    torch.manual_seed(0)
    model = mlp()
    train_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    checkpoints = {0: None, 300: None, 1500: None}  # optimizer steps at batch 32
    step = 0
    while True:
        if step in checkpoints:
            exact = _exact_b_simple(model, mnist1d.x_train, mnist1d.y_train)
            est = _estimate_frozen(model, mnist1d, micro=16, k=4, steps=1000, seed=step)
            checkpoints[step] = (exact, est)
        if step == max(checkpoints):
            break
        idx = torch.randint(0, len(mnist1d.x_train), (32,), generator=g)
        train_opt.zero_grad()
        nn.functional.cross_entropy(model(mnist1d.x_train[idx]), mnist1d.y_train[idx]).backward()
        train_opt.step()
        step += 1
    exacts = [e for e, _ in checkpoints.values()]
    assert exacts[-1] > 2 * exacts[0], "the checkpoints should span a real change in the noise scale"
    for at, (exact, est) in checkpoints.items():
        assert est == pytest.approx(exact, rel=0.20), f"step {at}: estimate {est:.1f} vs exact {exact:.1f}"


def test_bf16_autocast_estimate_agrees_with_fp32(mnist1d):
    torch.manual_seed(1)
    model = mlp()
    fp32 = _estimate_frozen(model, mnist1d, micro=16, k=4, steps=400, seed=5)
    bf16 = _estimate_frozen(model, mnist1d, micro=16, k=4, steps=400, autocast=True, seed=5)
    assert bf16 == pytest.approx(fp32, rel=0.05)
