"""The noise-scale estimate: unbiased per step, calibrated intervals, and right while training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.noise import NoiseScaleEstimator, fieller_interval, step_estimates, t_quantile
from adabatch.workloads import linreg_noise_scale


class Population:
    """Per-example gradients g_i = G + noise in ``dim`` dimensions, anisotropic noise (effective rank ~8)."""

    def __init__(self, n: int, dim: int = 64, g_norm: float = 1.0, trace: float = 400.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        scales = torch.tensor([0.7 ** i for i in range(dim)], dtype=torch.float64)
        noise = torch.randn(n, dim, generator=gen, dtype=torch.float64) * scales
        noise -= noise.mean(0)
        noise *= math.sqrt(trace / float((noise * noise).sum(1).mean()))
        direction = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.grads = noise + g_norm * direction / direction.norm()
        self.gen = gen

    @property
    def exact(self) -> tuple[float, float]:
        """(|G|^2, tr(Sigma)) of the population, divisor N, as the per-example oracle computes them."""
        mean = self.grads.mean(0)
        g2 = float(mean @ mean)
        return g2, float((self.grads * self.grads).sum(1).mean()) - g2

    def step(self, pieces: int, piece: int, replace: bool) -> tuple[list[float], list[float], float, float]:
        n = pieces * piece
        idx = (torch.randint(len(self.grads), (n,), generator=self.gen) if replace
               else torch.randperm(len(self.grads), generator=self.gen)[:n])
        parts = self.grads[idx].reshape(pieces, piece, -1).mean(1)
        total = parts.mean(0)
        return [float(p @ p) for p in parts], [piece] * pieces, float(total @ total), n


def test_step_estimates_are_exact_on_exact_expectations():
    g2, tr, n = 2.5, 300.0, 1000
    for b, big in [(8, 32), (16, 256), (1, 2)]:
        assert step_estimates([g2 + tr / b], [b], g2 + tr / big, big) == pytest.approx((g2, tr))
        # without replacement from n examples: E|G_b|^2 = |G|^2 + (1/b - 1/n) S^2, S^2 = n/(n-1) tr
        s2 = tr * n / (n - 1)
        small, total = g2 + (1 / b - 1 / n) * s2, g2 + (1 / big - 1 / n) * s2
        assert step_estimates([small, small], [b, b], total, big, population=n) == pytest.approx((g2, tr))


def test_step_estimates_average_to_the_population_values_only_with_the_finite_population_correction():
    pop = Population(n=512, trace=4000.0)  # B_simple = 4000; steps of 64 = 1/8 of the population
    g2_true, tr_true = pop.exact
    corrected, uncorrected = [], []
    for _ in range(6000):
        pieces, sizes, total, n = pop.step(2, 32, replace=False)
        corrected.append(step_estimates(pieces, sizes, total, n, population=512))
        uncorrected.append(step_estimates(pieces, sizes, total, n))
    mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
    assert mean(corrected, 0) == pytest.approx(g2_true, rel=0.15)
    assert mean(corrected, 1) == pytest.approx(tr_true, rel=0.02)
    # ignoring the correction biases |G|^2 by -tr(Sigma)/N: here -7.8, against a true 1.0
    assert mean(uncorrected, 0) - g2_true == pytest.approx(-tr_true / 512, rel=0.1)


def test_an_outlier_example_moves_the_trace_but_not_the_gradient_norm():
    big = 1e6  # one example whose gradient is a thousand times the others' (Adam's rare coordinates)
    for where in range(4):
        pieces = [1.0] * 4
        pieces[where] += big / 8 ** 2  # |mean over 8|^2 of a piece holding it
        total = 1.0 + big / 32 ** 2
        g2, tr = step_estimates(pieces, [8] * 4, total, 32)
        assert g2 == pytest.approx(1.0, abs=1e-6)  # whichever piece it fell in
        assert tr == pytest.approx(big / 32, rel=1e-9)


def test_fieller_interval_brackets_the_ratio_and_opens_when_the_denominator_is_unresolved():
    lo, hi = fieller_interval(1.0, 100.0, 0.01, 25.0, 0.0, 1.96)
    assert lo < 100.0 < hi < math.inf
    lo2, hi2 = fieller_interval(1.0, 100.0, 0.04, 100.0, 0.0, 1.96)
    assert lo2 < lo and hi2 > hi  # noisier means, wider interval
    lo3, hi3 = fieller_interval(0.05, 100.0, 0.01, 25.0, 0.0, 1.96)  # |G|^2 within 0.5 SE of zero
    assert hi3 == math.inf and 0 < lo3 < 100.0 / (0.05 + 1.96 * 0.1)
    lo4, hi4 = fieller_interval(-0.5, 100.0, 0.01, 25.0, 0.0, 1.96)  # significantly negative: noise around ~0
    assert hi4 == math.inf and lo4 == pytest.approx((100.0 - 1.96 * 5.0) / (1.96 * 0.1))


def test_t_quantile_is_wider_for_few_measurements():
    assert t_quantile(1) > t_quantile(5) > t_quantile(30) > t_quantile(10_000) == 1.96


def _stream(estimator: NoiseScaleEstimator, pop: Population, steps: int, pieces: int, piece: int) -> None:
    for _ in range(steps):
        p, sizes, total, n = pop.step(pieces, piece, replace=True)
        estimator.update_pieces(p, sizes, total, n, samples=n)


@pytest.mark.parametrize("g_norm,trace", [(1.0, 400.0), (1.0, 3000.0)])  # B_simple 400 and 3000, batch 64
def test_interval_covers_the_truth_at_least_90_percent_of_the_time(g_norm, trace):
    pop = Population(n=4096, g_norm=g_norm, trace=trace, seed=1)
    g2, tr = pop.exact
    truth = tr / g2
    inside, widths = 0, []
    runs = 200
    for _ in range(runs):
        est = NoiseScaleEstimator(window_fraction=0.25, min_window=4096)
        _stream(est, pop, 50, 2, 32)
        e = est.estimate()
        inside += e.low <= truth <= e.high
        assert math.isfinite(e.value) and e.value > 0
        if e.resolved:
            widths.append(e.high / e.low)
    assert inside / runs >= 0.90
    assert inside / runs <= 0.995, "an interval that always covers is too wide to decide with"


def test_the_interval_holds_the_present_value_of_a_rising_noise_scale_not_only_the_windows_past():
    """B_simple climbs 4x over the run (as it does while the loss falls). A window's mean reads the
    value of its mean age ago; the interval also holds the lag-extrapolated value, so it holds the
    present; the point estimate stays the window's own."""
    import numpy as np

    rng = np.random.default_rng(0)
    steps, batch = 400, 64
    inside, inside_window_only = 0, 0
    for _ in range(100):
        est = NoiseScaleEstimator(window_fraction=0.25, min_window=2048)
        for i in range(steps):
            truth = 200.0 * (1 + 3 * i / (steps - 1))
            est.update(1.0 + 0.3 * rng.standard_normal(), truth * (1.0 + 0.3 * rng.standard_normal()), samples=batch)
        e, window_only = est.estimate(), est._estimate(est.moments())
        assert e.value == window_only.value
        inside += e.low <= truth <= e.high
        inside_window_only += window_only.low <= truth <= window_only.high
    assert inside_window_only <= 20  # the window trails the climb and its own interval mostly misses
    assert inside >= 80


def test_a_jump_in_the_noise_scale_restarts_the_window_despite_the_lag_widened_interval():
    import numpy as np

    rng = np.random.default_rng(0)
    restarts, after = 0, []
    for _ in range(50):
        est = NoiseScaleEstimator(window_fraction=0.25, min_window=2048)
        for i in range(600):
            truth = 200.0 if i < 300 else 800.0  # a 4x jump, as after an LR cut
            est.update(1.0 + 0.3 * rng.standard_normal(), truth * (1.0 + 0.3 * rng.standard_normal()), samples=64)
            if i == 340:
                after.append(est.estimate().value / truth)
        restarts += est.changes
    assert restarts >= 40  # the long window restarts from the short one (widened intervals hid it: 0 of 50)
    assert np.median(after) > 0.65  # 40 steps after the jump, against 0.46 without the restart


def test_a_steady_noise_scale_is_not_moved_by_the_lag_correction():
    import numpy as np

    rng = np.random.default_rng(1)
    ratios, inside = [], 0
    for _ in range(100):
        est = NoiseScaleEstimator(window_fraction=0.25, min_window=2048)
        for _ in range(200):
            est.update(1.0 + 0.3 * rng.standard_normal(), 400.0 * (1.0 + 0.3 * rng.standard_normal()), samples=64)
        e = est.estimate()
        ratios.append(e.value / 400.0)
        inside += e.low <= 400.0 <= e.high
    # soft-thresholded at the difference's own spread: noise shifts it rarely and by little
    assert abs(np.median(ratios) - 1) < 0.02 and np.percentile(np.abs(np.array(ratios) - 1), 90) < 0.1
    assert 90 <= inside <= 99


def test_an_unresolvable_noise_scale_reads_as_a_finite_lower_bound_not_inf():
    pop = Population(n=4096, g_norm=0.1, trace=4000.0, seed=2)  # B_simple 400,000 at batch 64
    est = NoiseScaleEstimator(min_window=4096)
    _stream(est, pop, 40, 2, 32)
    e = est.estimate()
    g2, tr = pop.exact
    assert not e.resolved and e.high == math.inf
    assert math.isfinite(e.value) and e.value == e.low
    assert 64 < e.low < tr / g2  # confidently far above the batch, and below the truth


def test_the_window_is_counted_in_samples():
    est = NoiseScaleEstimator(window_fraction=0.1, min_window=1000)
    for _ in range(4):
        est.update(1.0, 100.0, samples=100)
    early = est.estimate().value
    est.advance(50_000)  # far beyond the window: the old measurements carry no weight any more
    for _ in range(4):
        est.update(1.0, 400.0, samples=100)
    assert early == pytest.approx(100.0)
    assert est.estimate().value == pytest.approx(400.0, rel=1e-3)
    assert est.window() == pytest.approx(max(1000, 0.1 * est.samples, 8 * est.gap))


def test_a_gradient_that_shrinks_a_hundredfold_does_not_let_old_measurements_dominate():
    est = NoiseScaleEstimator(window_fraction=1.0, min_window=0)
    for i in range(200):  # |G|^2 and tr(Sigma) both fall 100x; their ratio stays at 50
        scale = 100.0 ** (-i / 199)
        est.update(2.0 * scale, 100.0 * scale, samples=32)
    assert est.estimate().value == pytest.approx(50.0, rel=1e-6)


def test_nonfinite_measurements_are_rejected_and_counted():
    est = NoiseScaleEstimator()
    est.update_pieces([11.0, 11.0], [10, 10], 3.5, 40, samples=40)
    before = est.state_dict()
    assert not est.update_pieces([math.nan, 11.0], [10, 10], 3.5, 40, samples=40)
    assert not est.update(math.inf, 1.0, samples=40)
    assert est.rejected == 2 and est.measurements == before["measurements"]


def test_state_round_trip_reproduces_the_estimate():
    pop = Population(n=2048, seed=3)
    a = NoiseScaleEstimator()
    _stream(a, pop, 30, 2, 32)
    b = NoiseScaleEstimator()
    b.load_state_dict(a.state_dict())
    assert b.estimate() == a.estimate()


# ----------------------------------------------------------------------------- in training


def _linreg_controller(dim: int, noise_var: float, lr: float, cfg: ControllerConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 / math.sqrt(dim))  # |w - w*|^2 = 1, w* = 0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, AdaptiveBatchController(model, opt, 8, cfg)


def test_estimate_tracks_the_analytic_noise_scale_of_linear_regression_through_training():
    """Stream data (no finite population), the default controller at a constant LR: B_simple =
    (d (|delta|^2 + s^2) + |delta|^2) / |delta|^2 climbs as |w - w*|^2 shrinks; the estimate follows it
    within 25 % and its interval holds the analytic value."""
    dim, noise_var = 16, 4.0
    model, ctl = _linreg_controller(dim, noise_var, lr=0.002, cfg=ControllerConfig(lr_rule="none"))
    g = torch.Generator().manual_seed(1)
    checks = []
    for stop in (20_000, 80_000, 160_000):
        while ctl.samples < stop:
            x = torch.randn(8, dim, generator=g)
            y = math.sqrt(noise_var) * torch.randn(8, generator=g)
            ctl.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean())
            ctl.step()
        delta_sq = float(model.weight.detach().pow(2).sum())
        checks.append((ctl.noise_scale, linreg_noise_scale(delta_sq, dim, noise_var), ctl.noise_interval,
                       ctl.batch_size))
    assert checks[-1][1] > 3 * checks[0][1], "the noise scale should climb during training"
    assert checks[-1][3] > 4 * checks[0][3] / 2, "and the batch with it"
    for est, exact, (lo, hi), _ in checks:
        assert est == pytest.approx(exact, rel=0.25), checks
        assert lo <= exact <= hi, checks
