"""Goodput, energy and Zeus policies on synthetic profiles whose optimum is known analytically."""

from __future__ import annotations

import json
import math

import pytest

from adabatch.config import ConfigError, ControllerConfig
from adabatch.goodput import GoodputPolicy, LinearFit, ThroughputProfile, candidate_batches, fit_linear, statistical_efficiency
from adabatch.policy import NoiseScalePolicy, PolicyInput, make_policy

# Synthetic machine: seconds per step 0.064 + 0.001 B, joules per step 4 + 1 B. Power per step
# (4 + B) / (0.064 + 0.001 B) rises from 375 W at B=32 to 812 W at B=256, so the time-optimal and
# energy-optimal batches differ. With linear costs a + b B the optimum is B* = sqrt(phi a / b).
A_T, B_T = 0.064, 0.001
A_E, B_E = 4.0, 1.0


def observe(target, batch: int, samples: int, seconds: float, joules: float | None = None,
            measured: bool = False, windows: int = 4) -> None:
    """``samples`` at ``batch`` seen as ``windows`` equal windows between measurements (the profile
    prices a batch size from the median over at least three)."""
    for _ in range(windows):
        target.observe(batch, samples / windows, seconds / windows,
                       None if joules is None else joules / windows, measured)


def synthetic_profile(batches=(32, 64, 128), steps: int = 50) -> ThroughputProfile:
    profile = ThroughputProfile()
    for batch in batches:
        observe(profile, batch, steps * batch, steps * (A_T + B_T * batch), steps * (A_E + B_E * batch))
    return profile


def inp(noise_scale: float, batch: int = 64, granularity: int = 32, min_batch: int = 32,
        max_batch: int = 4096, base_batch: int = 32) -> PolicyInput:
    return PolicyInput(step=1000, batch=batch, base_batch=base_batch, noise_scale=noise_scale,
                       granularity=granularity, min_batch=min_batch, max_batch=max_batch)


def test_statistical_efficiency_matches_pollux_formula() -> None:
    assert statistical_efficiency(32, 32, 500.0) == 1.0
    assert statistical_efficiency(256, 32, 1024.0) == pytest.approx(1056 / 1280)
    assert statistical_efficiency(256, 32, 0.0) == pytest.approx(32 / 256)  # no noise: extra samples wasted
    assert statistical_efficiency(256, 32, 1e12) == pytest.approx(1.0)  # all noise: every sample counts
    assert math.isnan(statistical_efficiency(256, 32, math.nan))
    with pytest.raises(ValueError, match="batch > 0"):
        statistical_efficiency(0, 32, 10.0)
    with pytest.raises(ValueError, match="negative"):
        statistical_efficiency(64, 32, -1.0)


def test_fit_linear_recovers_exact_coefficients_and_stays_physical() -> None:
    fit = fit_linear([(32, 0.096), (64, 0.128), (256, 0.32)])
    assert fit == LinearFit(alpha=0.064, beta=0.001)
    # Per-step time falling faster than proportionally would need a negative overhead: fit through 0.
    through_origin = fit_linear([(10, 1.0), (20, 3.0)])
    assert through_origin.alpha == 0.0 and through_origin.beta == pytest.approx(70 / 500)
    # Per-step time shrinking with the batch would need a negative slope: constant fit.
    flat = fit_linear([(10, 3.0), (20, 2.0)])
    assert flat == LinearFit(alpha=2.5, beta=0.0)
    assert fit_linear([(50, 2.0)]) == LinearFit(alpha=0.0, beta=0.04)  # one point: constant cost per sample
    assert fit_linear([]) is None


def test_profile_predicts_unseen_batches_and_survives_a_state_round_trip() -> None:
    profile = synthetic_profile()
    assert profile.batches("time") == [32, 64, 128] == profile.batches("energy")
    assert profile.seconds_per_sample(512) == pytest.approx(A_T / 512 + B_T)
    assert profile.joules_per_sample(512) == pytest.approx(A_E / 512 + B_E)
    assert profile.max_power_w() == pytest.approx((A_E + 128 * B_E) / (A_T + 128 * B_T))

    restored = ThroughputProfile()
    restored.load_state_dict(json.loads(json.dumps(profile.state_dict())))
    assert restored.seconds_per_sample(700) == profile.seconds_per_sample(700)
    assert restored.joules_per_sample(700) == profile.joules_per_sample(700)


def test_profile_with_one_batch_assumes_constant_cost_per_sample() -> None:
    profile = ThroughputProfile()
    observe(profile, 64, 6400, 2.0, None)
    assert profile.seconds_per_sample(64) == profile.seconds_per_sample(4096) == pytest.approx(2.0 / 6400)
    assert math.isnan(profile.joules_per_sample(64)) and math.isnan(profile.max_power_w())


def test_profile_rejects_impossible_windows_and_ignores_empty_ones() -> None:
    profile = ThroughputProfile()
    profile.observe(64, 0, 0.0, None)
    assert profile.batches() == []
    with pytest.raises(ValueError, match="seconds > 0"):
        profile.observe(64, 640, 0.0, None)
    with pytest.raises(ValueError, match="joules"):
        profile.observe(64, 640, 1.0, -5.0)


def test_time_and_energy_objectives_pick_their_analytic_optima_and_differ() -> None:
    phi = 1024.0
    time_choice = GoodputPolicy("time", profile=synthetic_profile()).propose(inp(phi))
    energy_choice = GoodputPolicy("energy", profile=synthetic_profile()).propose(inp(phi))
    assert time_choice == math.sqrt(phi * A_T / B_T) == 256.0
    assert energy_choice == math.sqrt(phi * A_E / B_E) == 64.0


@pytest.mark.parametrize("phi", [50.0, 300.0, 1500.0, 20000.0])
def test_time_objective_lands_within_one_sample_of_sqrt_phi_a_over_b(phi: float) -> None:
    policy = GoodputPolicy("time", profile=synthetic_profile())
    choice = policy.propose(inp(phi, granularity=1, min_batch=1, max_batch=100_000))
    optimum = math.sqrt(phi * A_T / B_T)
    # 100_000 multiples are too many, so the candidates form a geometric grid of 1024 points.
    gap = optimum * ((100_000 ** (1 / 1023)) - 1)  # the best grid point neighbours the optimum
    assert abs(choice - optimum) <= max(1.0, gap)


def test_zeus_interpolates_between_time_and_energy() -> None:
    for phi in (100.0, 1024.0, 5000.0):
        time_choice = GoodputPolicy("time", profile=synthetic_profile()).propose(inp(phi))
        energy_choice = GoodputPolicy("energy", profile=synthetic_profile()).propose(inp(phi))
        assert GoodputPolicy("zeus", eta=0.0, profile=synthetic_profile()).propose(inp(phi)) == time_choice
        assert GoodputPolicy("zeus", eta=1.0, profile=synthetic_profile()).propose(inp(phi)) == energy_choice
    # eta = 0.5, P = 500 W: cost per step 0.5 (4 + B) + 0.5 * 500 (0.064 + 0.001 B) = 18 + 0.75 B,
    # so B* = sqrt(1024 * 18 / 0.75) = 156.8.
    zeus = GoodputPolicy("zeus", eta=0.5, max_power_w=500.0, profile=synthetic_profile())
    choice = zeus.propose(inp(1024.0, granularity=1, min_batch=1))
    assert abs(choice - math.sqrt(1024.0 * 18 / 0.75)) <= 1.0


def test_policy_has_no_opinion_without_noise_scale_or_data() -> None:
    assert math.isnan(GoodputPolicy("time", profile=synthetic_profile()).propose(inp(math.nan)))
    assert math.isnan(GoodputPolicy("time").propose(inp(1024.0)))
    time_only = ThroughputProfile()
    for batch in (32, 64):
        observe(time_only, batch, 100 * batch, 1.0, None)
    assert math.isnan(GoodputPolicy("energy", profile=time_only).propose(inp(1024.0)))
    assert math.isnan(GoodputPolicy("zeus", profile=time_only).propose(inp(1024.0)))


def test_policy_explores_batch_sizes_four_times_apart_before_trusting_the_fit() -> None:
    policy = GoodputPolicy("time")
    observe(policy, 32, 3200, 100 * (A_T + B_T * 32), None)
    assert policy.propose(inp(1024.0, batch=32)) == 128.0  # x4 once the current batch has data
    assert policy.propose(inp(1024.0, batch=96)) == 96.0  # stays until this batch has data
    observe(policy, 64, 6400, 100 * (A_T + B_T * 64), None)
    assert policy.propose(inp(1024.0, batch=64)) == 256.0  # 32 and 64 are too close to extrapolate from
    at_top = GoodputPolicy("time")
    observe(at_top, 1024, 10240, 1.0, None)
    assert at_top.propose(inp(1024.0, batch=1024, max_batch=1024)) == 512.0
    observe(policy, 128, 12800, 100 * (A_T + B_T * 128), None)
    assert policy.propose(inp(1024.0, batch=128)) == 256.0  # 32 to 128 known: the fitted optimum


def test_policy_is_deterministic_and_restores_from_state() -> None:
    policy = GoodputPolicy("zeus", eta=0.3, profile=synthetic_profile())
    first = policy.propose(inp(777.0))
    assert policy.propose(inp(777.0)) == first
    restored = GoodputPolicy("zeus", eta=0.3)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.propose(inp(777.0)) == first


def test_candidates_cover_the_range_on_a_geometric_grid_when_it_is_large() -> None:
    grid = candidate_batches(current=777, granularity=1, min_batch=1, max_batch=100_000)
    assert grid[0] == 1 and grid[-1] == 100_000 and 777 in grid
    assert len(grid) <= 1025 and grid == sorted(set(grid))
    assert candidate_batches(current=100, granularity=32, min_batch=40, max_batch=150) == [64, 96, 100, 128]


def test_make_policy_maps_config_policies() -> None:
    noise = make_policy(ControllerConfig(policy="noise", target_factor=0.25))
    assert isinstance(noise, NoiseScalePolicy) and noise.target_factor == 0.25
    assert make_policy(ControllerConfig(policy="goodput")).objective == "time"
    assert make_policy(ControllerConfig(policy="energy")).objective == "energy"
    zeus = make_policy(ControllerConfig(policy="zeus", eta=0.7, extra={"max_power_w": 300}))
    assert (zeus.objective, zeus.eta, zeus.max_power_w) == ("zeus", 0.7, 300.0)
    assert make_policy(ControllerConfig(policy="zeus")).max_power_w is None
    with pytest.raises(ConfigError, match=r"extra\['max_power_w'\]"):
        make_policy(ControllerConfig(policy="zeus", extra={"max_power_w": -1}))
    with pytest.raises(ValueError, match="objective='speed'"):
        GoodputPolicy("speed")


def test_a_batch_size_counts_only_after_enough_timed_steps() -> None:
    # Seen in a run: many steps at 16 (0.64 ms each), 8 at 32 (0.83 ms), one at 128 that took 3.9 ms
    # (its first call at the new shape, and measured). Counting that one step as a point of the fit
    # made the cost per sample look constant, and the policy went back to 16 for good.
    def profile(min_steps):
        p = ThroughputProfile() if min_steps is None else ThroughputProfile(min_steps=min_steps, min_windows=1)
        observe(p, 16, 33 * 16, 33 * 0.64e-3, None, windows=33)  # one window per step
        observe(p, 32, 8 * 32, 8 * 0.83e-3, None, windows=8)
        p.observe(128, 128, 3.87e-3, None)
        return p

    trusting = GoodputPolicy("time", profile=profile(min_steps=1))
    assert trusting.profile.batches() == [16, 32, 128]
    assert trusting.propose(inp(1000.0, batch=128, granularity=16, min_batch=16, base_batch=16)) <= 32.0  # back down
    waiting = GoodputPolicy("time", profile=profile(min_steps=None))
    assert waiting.profile.batches() == [16, 32]
    fit = waiting.profile.time_fit()
    assert fit.alpha == pytest.approx(0.45e-3) and fit.beta == pytest.approx(0.19e-3 / 16)
    assert waiting.propose(inp(1000.0, batch=128, granularity=16, min_batch=16, base_batch=16)) == 128.0  # timing it
    observe(waiting, 128, 7 * 128, 7 * (0.45e-3 + 128 * 0.19e-3 / 16), None, windows=7)  # 8 steps: the slow one and 7 more
    assert waiting.profile.batches() == [16, 32, 128]
    # about 0.45 ms per step + 0.012 ms per sample: B* = sqrt(phi a / b), near sqrt(1000 x 37.9) = 195
    assert 160.0 <= waiting.propose(inp(1000.0, batch=128, granularity=16, min_batch=16, base_batch=16)) <= 240.0
    with pytest.raises(ValueError, match="min_steps"):
        ThroughputProfile(min_steps=0)
    with pytest.raises(ValueError, match="min_windows"):
        ThroughputProfile(min_windows=0)


def test_a_disturbed_window_moves_the_price_of_a_step_little() -> None:
    # nine windows of 8 steps at 0.5 ms, one in which something else held the core for 66 ms
    def profile(**kwargs):
        p = ThroughputProfile(**kwargs)
        observe(p, 656, 9 * 8 * 656, 9 * 8 * 0.5e-3, None, windows=9)
        p.observe(656, 8 * 656, 8 * 0.5e-3 + 0.066, None)
        return p

    assert profile().step_costs() == {656: pytest.approx(0.5e-3)}  # the mean would be 1.3 ms
    assert profile(min_windows=11).step_costs() == {}  # 80 steps, but in 10 windows


def _simulated_goodput_run(measured_extra: float, deciding: float = 0.0):
    """Simulated time: a step costs 10 ms + 0.01 ms per sample, the first step at a new batch size
    0.5 s more (a new shape: compilation, allocation), a measured step ``measured_extra`` more
    (the estimator's work), and each proposal of the policy ``deciding``. Returns the controller
    after 400k samples of linear regression."""
    import torch
    from torch import nn

    from adabatch import AdaptiveBatchController

    torch.manual_seed(0)
    dim = 16
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 / math.sqrt(dim))
    cfg = ControllerConfig(initial_batch=16, min_batch=16, max_batch=4096, policy="goodput", min_efficiency=0)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.0), 8, cfg)
    now = [0.0]
    ctl.clock.seconds = lambda: now[0]
    propose = ctl.policy.propose

    def slow_propose(inp):
        now[0] += deciding
        return propose(inp)

    ctl.policy.propose = slow_propose
    g = torch.Generator().manual_seed(0)
    seen, starting = set(), True
    while ctl.samples < 400_000:
        if starting:
            now[0] += 0.010 + (0.5 if ctl.batch_size not in seen else 0.0)
            now[0] += measured_extra if ctl._norms is not None else 0.0
            seen.add(ctl.batch_size)
        now[0] += 0.01e-3 * 8
        x = torch.randn(8, dim, generator=g)
        y = math.sqrt(60.0) * torch.randn(8, generator=g)  # B_simple about 16 x 61 = 980
        ctl.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean())
        starting = ctl.step()
    return ctl


def test_goodput_controller_leaves_each_batch_warm_up_out_of_its_profile() -> None:
    """The optimum is B* = sqrt(phi x 1000); a profile that counted the first steps would price
    every new batch at up to +60 ms per step."""
    ctl = _simulated_goodput_run(measured_extra=0.0)
    costs = ctl.policy.profile.step_costs()
    assert len(costs) >= 2
    for batch, seconds in costs.items():
        assert seconds == pytest.approx(0.010 + 0.01e-3 * batch, rel=1e-6)  # no warm-up in any point
    optimum = math.sqrt(ctl.noise.value * 1000)
    assert optimum / 2 <= ctl.batch_size <= 2 * optimum, (ctl.batch_size, optimum, ctl.decisions)


def test_goodput_controller_prices_measured_steps_apart_from_training() -> None:
    """A measured step costs 40 ms more than an ordinary one (a small model, where the estimator's
    hooks and read-back dwarf the arithmetic). The controller measures every so many samples, so the
    larger the batch, the larger the share of its steps that is measured: averaged together, the
    profile charged large batches for the estimator's work. Kept apart, every batch size is priced
    at its training cost, and the batch lands near the same optimum as without the extra cost. Each
    decision also takes 20 ms (fitting the profile); that is the controller's time, not a step's."""
    ctl = _simulated_goodput_run(measured_extra=0.040, deciding=0.020)
    profile = ctl.policy.profile
    costs = profile.step_costs()
    assert len(costs) >= 2
    for batch, seconds in costs.items():
        assert seconds == pytest.approx(0.010 + 0.01e-3 * batch, rel=0.05), (batch, seconds)
    optimum = math.sqrt(ctl.noise.value * 1000)
    assert optimum / 2 <= ctl.batch_size <= 2 * optimum, (ctl.batch_size, optimum, ctl.decisions)
    # what the steps cost on average, measured ones included, is well above the training cost
    windows = {b: [w for (size, _), recent in profile._cost["time"].items() if size == b for w in recent] for b in costs}
    mixed = {b: sum(c for _, c in ws) / sum(n for n, _ in ws) for b, ws in windows.items()}
    assert max(mixed[b] / costs[b] for b in costs) > 1.5, mixed


def test_profile_prices_batches_measured_on_every_step_from_the_measured_extra_cost() -> None:
    # training 10 ms + 0.01 ms/sample; a measured step 40 ms + 0.005 ms/sample more
    def train(b):
        return 0.010 + 0.01e-3 * b

    def extra(b):
        return 0.040 + 0.005e-3 * b

    profile = ThroughputProfile()
    for batch in (16, 64):  # timed both ways
        observe(profile, batch, 80 * batch, 80 * train(batch), None)
        observe(profile, batch, 10 * batch, 10 * (train(batch) + extra(batch)), None, measured=True)
    observe(profile, 1024, 20 * 1024, 20 * (train(1024) + extra(1024)), None, measured=True)  # every step measured
    costs = profile.step_costs()
    assert list(costs) == [16, 64, 1024]
    for batch, seconds in costs.items():
        assert seconds == pytest.approx(train(batch), rel=1e-9)
    only_measured = ThroughputProfile()  # nothing timed both ways: nothing to subtract, so the mean of all steps
    observe(only_measured, 256, 10 * 256, 10 * 0.03, None, measured=True)
    observe(only_measured, 1024, 10 * 1024, 10 * 0.05, None, measured=True)
    assert only_measured.step_costs() == {256: pytest.approx(0.03), 1024: pytest.approx(0.05)}
    restored = ThroughputProfile()
    restored.load_state_dict(json.loads(json.dumps(profile.state_dict())))
    assert restored.step_costs() == costs
    # a profile saved before the two kinds were kept apart cannot be split: a new profile starts
    restored.load_state_dict({"time": [[64, 100.0, 0.5]], "energy": []})
    assert restored.step_costs() == {} and restored.batches() == []
    restored.load_state_dict(profile.state_dict())
    restored.load_state_dict({"time": [[64, False, 80.0, 10, [[8.0, 0.004]] * 10]], "energy": [], "metered": []})
    assert restored.step_costs() == {}  # another layout: a new profile, not a misread one
