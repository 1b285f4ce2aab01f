"""Controller behaviour: exact accumulation, schedules in samples, decisions, determinism, resume, misuse."""

from __future__ import annotations

import copy
import math
import time
import warnings

import pytest
import torch
from torch import nn

from adabatch import AdaptiveBatchController, ConfigError, ControllerConfig, NonFiniteLossError
from adabatch.decide import Decider
from adabatch.noise import NoiseEstimate
from adabatch.progress import LossSpike, Verdict


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def _data(n: int, seed: int = 0):
    """Inputs with learnable labels (a fixed linear teacher plus noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    teacher = torch.randn(10, 3, generator=torch.Generator().manual_seed(99))
    y = (x @ teacher + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    return x, y


def _fixed(batch: int, **kw) -> ControllerConfig:
    return ControllerConfig(initial_batch=batch, min_batch=batch, max_batch=batch, **kw)


def _train(model, ctl, x, y, steps: int, sampler=None):
    """Train through the controller's sampler until ``steps`` optimizer steps."""
    sampler = sampler or ctl.batch_sampler(len(x), seed=1)
    while ctl.steps < steps:
        for idx in sampler:
            ctl.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]))
            ctl.step()
            if ctl.steps >= steps:
                break
    ctl.flush()
    return sampler


# ----------------------------------------------------------------------------- accumulation


def test_accumulation_equals_one_big_batch():
    x, y = _data(32 * 6)
    big, acc = _mlp(), _mlp()
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1, momentum=0.9)
    ctl = AdaptiveBatchController(acc, opt_acc, micro_batch_size=8, config=_fixed(32, lr_rule="none", measure_every=1))
    for s in range(6):
        xb, yb = x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)]
        opt_big.zero_grad()
        nn.functional.cross_entropy(big(xb), yb).backward()
        opt_big.step()
        for xm, ym in zip(xb.split(8), yb.split(8)):  # every step measured: its pieces are set aside and summed
            ctl.backward(nn.functional.cross_entropy(acc(xm), ym))
            ctl.step()
    assert ctl.steps == 6 and ctl.estimator.measurements == 6
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_short_last_micro_batch_still_gives_the_mean_gradient():
    x, y = _data(29)
    big, acc = _mlp(), _mlp()
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1)
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1)
    ctl = AdaptiveBatchController(acc, opt_acc, micro_batch_size=8, config=_fixed(32, lr_rule="none"))
    nn.functional.cross_entropy(big(x), y).backward()
    opt_big.step()
    for xm, ym in zip(x.split(8), y.split(8)):  # 8, 8, 8, 5
        ctl.backward(nn.functional.cross_entropy(acc(xm), ym), batch_size=len(xm))
    assert ctl.step()
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ctl.samples == 29


def test_step_before_enough_micro_batches_does_nothing():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, _fixed(24))
    x, y = _data(8)
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    assert not ctl.step() and ctl.steps == 0


def test_backward_outside_the_controller_is_a_clear_error_not_a_silent_no_op():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8)
    x, y = _data(8)
    nn.functional.cross_entropy(model(x), y).backward()  # the usual loop's habit
    with pytest.raises(RuntimeError, match=r"controller\.backward\(loss\) instead of loss\.backward\(\)"):
        ctl.step()


# ----------------------------------------------------------------------------- LR rules and schedules


def test_lr_factor_applies_only_during_the_step_and_a_per_step_schedule_is_kept_on_request():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cfg = _fixed(32, base_batch=8, lr_rule="linear", schedule="steps")
    ctl = AdaptiveBatchController(model, opt, 8, cfg, scheduler=sched)
    x, y = _data(8)
    for _ in range(4 * 4):
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        ctl.step()
    ctl.flush()
    # scheduler: 0.1, 0.1, 0.05, 0.05 (once per optimizer step); rule: x4 (32 / 8), never seen by the scheduler
    assert [r.lr for r in ctl.history] == pytest.approx([0.4, 0.4, 0.2, 0.2])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("rule, power", [("none", (1, 1)), ("beta2", (1, 4)), ("both", (4, 4))])
def test_adam_betas_follow_the_batch_during_the_step_and_the_user_keeps_theirs(rule, power):
    """At four times the base batch, a step under ``beta_rule`` is AdamW's step with each scaled beta
    raised to the fourth power (memory constant in samples); param_groups and the optimizer's state
    dict still hold the user's betas."""
    x, y = _data(32 * 5)
    ref, model = _mlp(), _mlp()
    betas = (0.9, 0.99)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01 * 2, betas=(betas[0] ** power[0], betas[1] ** power[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=betas)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(32, base_batch=8, lr_rule="sqrt", beta_rule=rule))
    for s in range(5):
        xb, yb = x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)]
        nn.functional.cross_entropy(ref(xb), yb).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        for m in range(4):
            ctl.backward(nn.functional.cross_entropy(model(xb[8 * m:8 * (m + 1)]), yb[8 * m:8 * (m + 1)]))
            ctl.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["betas"] == betas and opt.state_dict()["param_groups"][0]["betas"] == betas
    assert ctl.stats()["beta_rule"] == rule
    if rule != "none":  # the same steps at the user's betas end elsewhere: the rule is what made them match
        plain = _mlp()
        opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.02, betas=betas)
        for s in range(5):
            nn.functional.cross_entropy(plain(x[32 * s:32 * (s + 1)]), y[32 * s:32 * (s + 1)]).backward()
            opt_plain.step()
            opt_plain.zero_grad()
        assert not torch.allclose(plain[0].weight, model[0].weight, rtol=1e-5, atol=1e-6)


def test_the_beta_rule_keeps_the_half_life_in_samples_and_leaves_optimizers_without_betas_alone():
    from adabatch.betas import BetaScaler, scaled_betas

    for ratio in (0.25, 1.0, 3.0, 64.0):
        b1, b2 = scaled_betas((0.9, 0.999), ratio, "both")
        for new, old in ((b1, 0.9), (b2, 0.999)):
            assert math.log(0.5) / math.log(new) * ratio == pytest.approx(math.log(0.5) / math.log(old))
    sgd = torch.optim.SGD(_mlp().parameters(), lr=0.1, momentum=0.9)
    scaler = BetaScaler("both", base_batch=8)
    saved = scaler.apply(sgd, 64)
    assert "betas" not in sgd.param_groups[0] and sgd.param_groups[0]["momentum"] == 0.9
    scaler.restore(sgd, saved)
    assert "betas" not in sgd.param_groups[0]
    with pytest.raises(ConfigError, match="beta_rule"):
        ControllerConfig(beta_rule="cubic")
    model = _mlp()  # a rule SGD cannot follow is one clear error, not a silent no-op
    with pytest.raises(ConfigError, match="beta_rule='beta2' needs an optimizer with a pair of numeric betas"):
        AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, ControllerConfig(beta_rule="beta2"))


def test_a_schedule_sized_for_the_base_batch_ends_when_the_samples_do_whatever_the_batch():
    budget, base = 1600, 8
    finals = []
    for batch in (8, 32, 64):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=budget // base)
        ctl = AdaptiveBatchController(model, opt, 8, _fixed(batch, base_batch=base), scheduler=sched)
        x, y = _data(budget)
        _train(model, ctl, x, y, steps=budget // batch)
        assert ctl.samples == budget
        assert sched.last_epoch == budget // base - 1  # every base step of the schedule was taken
        finals.append(opt.param_groups[0]["lr"])
        peak = max(range(len(ctl.history)), key=lambda i: ctl.history[i].lr)
        assert ctl.history[peak].samples == pytest.approx(0.3 * budget, abs=2 * batch)  # OneCycle peaks at 30 %
    assert finals[0] == pytest.approx(finals[1]) == pytest.approx(finals[2])


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "cosine"])
def test_a_large_step_moves_the_schedule_as_many_base_steps_as_one_at_a_time_would(kind):
    from adabatch.lr import ScheduleFollower

    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
        if kind == "lambda":
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        if kind == "onecycle":
            return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=500)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=500)

    (opt, sched), (ref_opt, ref) = make(), make()
    follow = ScheduleFollower(sched, base_batch=16)
    calls = []
    real_step = sched.step
    sched.step = lambda: (calls.append(1), real_step())[1]
    owed = 0.0
    for batch in [16, 48, 160, 512, 24, 4096, 4096, 512]:  # OneCycleLR ends at the seventh
        opt.step()
        follow.advance(samples=batch)
        owed += batch / 16
        while ref.last_epoch < min(int(owed), 499 if kind == "onecycle" else 10**9):
            ref_opt.step()
            ref.step()
        # the same LR, momentum and position as stepping once per base step, bit for bit
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["momentum"] == ref_opt.param_groups[0]["momentum"]
        assert sched.last_epoch == ref.last_epoch
    # LambdaLR and OneCycleLR jump (one call per optimizer step); chainable schedulers step one at a time
    assert len(calls) == (8 if kind == "lambda" else 7 if kind == "onecycle" else ref.last_epoch)


def test_reduce_on_plateau_is_stepped_by_the_user_and_refused_as_scheduler():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        AdaptiveBatchController(model, opt, 8, scheduler=plateau)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(16, base_batch=8))
    x, y = _data(64)
    _train(model, ctl, x, y, steps=2)
    plateau.step(1.0)
    plateau.step(2.0)  # no improvement: halve
    _train(model, ctl, x, y, steps=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert ctl.history[-1].lr == pytest.approx(0.05 * 2)  # the controller's factor composes with it


def test_adaptive_optimizers_default_to_sqrt_rule_and_preconditioned_noise():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.AdamW(model.parameters(), lr=1e-3), 8)
    assert ctl.lr_rule == "sqrt" and ctl.noise_kind == "preconditioned"
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=1e-3), 8)
    assert ctl.lr_rule == "linear" and ctl.noise_kind == "simple"


def test_preconditioned_noise_scale_is_estimated_under_adam_after_its_moments_settle():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(32, measure_every=1))
    x, y = _data(4000)
    _train(model, ctl, x, y, steps=60)
    assert ctl.estimator.measurements == 60 - 10  # Adam's first ten steps are not measured
    assert 0 < ctl.noise_scale < math.inf


def test_preconditioned_noise_with_sgd_is_a_clear_error():
    model = _mlp()
    with pytest.raises(ConfigError, match="noise_kind"):
        AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8,
                                ControllerConfig(noise_kind="preconditioned"))


# ----------------------------------------------------------------------------- decisions


def _est(value, low, high, n=50.0):
    return NoiseEstimate(value, low, high, math.isfinite(high), 1.0, value, n)


def _decider(**kw) -> Decider:
    return Decider(ControllerConfig(**kw), granularity=32, min_batch=32, max_batch=4096)


def test_decider_grows_on_the_confident_lower_end_by_at_most_the_change_factor():
    d = _decider(target_factor=2.0, max_change_factor=4.0)
    target = lambda phi: 2.0 * phi  # noqa: E731
    assert d.decide(64, 10_000, 100, _est(400, 300, 550), target) == 256  # min(2 x 300, 4 x 64)
    assert d.decide(256, 20_000, 200, _est(400, 300, 550), target) == 576  # 2 x 300 = 600, snapped down to 32s
    assert d.decide(576, 30_000, 300, _est(400, 300, 550), target) == 576  # 600 < 1.5 x 576: inside the band
    assert [c.new for c in d.changes] == [256, 576]


def test_decider_shrinks_only_on_the_confident_upper_end():
    d = _decider(target_factor=2.0)
    target = lambda phi: 2.0 * phi  # noqa: E731
    assert d.decide(1024, 10_000, 10, _est(200, 150, 300), target) == 1024  # 2 x 300 = 600 > 0.5 x 1024
    assert d.decide(1024, 10_000, 10, _est(100, 80, 120), target) == 256  # max(2 x 120, 1024 / 4)


def test_an_unresolved_noise_scale_grows_on_its_lower_bound():
    d = _decider(target_factor=2.0)
    assert d.decide(32, 5_000, 100, _est(5000, 5000, math.inf), lambda phi: 2.0 * phi) == 128


def test_too_few_measurements_never_move_the_batch():
    d = _decider()
    assert d.decide(32, 5_000, 100, _est(5000, 4000, 6000, n=1.5), lambda phi: 2.0 * phi) == 32


def test_patience_and_cooldown_count_samples_not_steps():
    d = _decider(patience_samples=1000, cooldown_samples=5000)
    target = lambda phi: 2.0 * phi  # noqa: E731
    grow = _est(400, 300, 550)
    assert d.decide(64, 10_000, 10, grow, target) == 64  # the condition starts holding
    assert d.decide(64, 10_500, 500, grow, target) == 64  # many steps, but only 500 samples
    assert d.decide(64, 11_000, 11, grow, target) == 256  # 1,000 samples later
    assert d.decide(256, 15_000, 4000, _est(100, 80, 120), target) == 256  # cooldown: 4,000 < 5,000 samples
    assert d.decide(256, 16_000, 4001, _est(60, 40, 60), target) == 256  # a shrink starts to hold
    assert d.decide(256, 17_000, 4002, _est(60, 40, 60), target) == 128  # 1,000 samples later: max(2 x 60, 256 / 4)


def test_a_growth_that_failed_its_evidence_is_reverted_and_capped_for_a_while():
    d = _decider()
    est = _est(4000, 3000, 6000)
    bad = Verdict(at=10_000, old_batch=64, new_batch=256, efficiency=0.1, failed=True)
    assert d.judge(256, 14_000, 100, [bad], est) == 64
    assert d.cap(14_000) == 224 and d.cap(28_000) == 4096  # capped below 256 until the run doubles
    assert d.decide(64, 15_000, 110, est, lambda phi: 2.0 * phi) == 224
    ok = Verdict(at=10_000, old_batch=64, new_batch=256, efficiency=0.9, failed=False)
    assert _decider().judge(256, 14_000, 100, [ok], est) == 256
    assert [c.reason for c in d.changes] == ["revert", "grow"]


def test_a_sudden_rise_of_the_loss_is_flagged_and_noise_or_a_slow_trend_is_not():
    for seed in range(3):  # mini-batch losses with skewed noise (CV 0.1), falling 20-fold over 10k steps
        noise = torch.empty(10_000).exponential_(1.0, generator=torch.Generator().manual_seed(seed))
        spike = LossSpike()
        assert not any(spike.update(2.0 * 0.9997 ** i * (0.9 + 0.1 * float(e))) for i, e in enumerate(noise))
    spike = LossSpike()
    assert not any(spike.update(1.0 + i / 500 + 0.05 * (i % 3)) for i in range(500))  # doubles, slowly
    for i in range(50):
        assert not spike.update(2.0 + 0.05 * (i % 3))
    flags = [spike.update(v) for v in (4.5, 5.5, 5.0, 4.8, 5.2, 5.1)]  # more than doubles at once
    assert True in flags[:5] and not any(flags[:2])  # the median of five moves on the third high loss


def _diverging_linreg(min_efficiency: float, steps: int):
    """SGD at lr 0.2 on a batch of 8, linear LR rule, growth pushed hard: past batch 80 the LR
    exceeds the curvature's limit (2 for unit-variance inputs) and the loss explodes."""
    torch.manual_seed(0)
    model = nn.Linear(16, 1, bias=False)
    cfg = ControllerConfig(initial_batch=8, target_factor=50.0, min_efficiency=min_efficiency, lr_rule="linear",
                           max_batch=512, max_micro_batch=512)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.2), 8, cfg)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    losses = []
    while ctl.steps < steps:
        n = ctl.next_micro_batch_size()
        x = torch.randn(n, 16, generator=g)
        loss = 0.5 * ((model(x).squeeze(1) - x @ w - 0.5 * torch.randn(n, generator=g)) ** 2).mean()
        ctl.backward(loss)
        if ctl.step():
            losses.append(loss.item())
    return ctl, losses


def test_a_growth_that_makes_the_loss_explode_is_undone_at_once_and_the_run_survives():
    ctl, losses = _diverging_linreg(min_efficiency=0.5, steps=80)
    rescue = next(c for c in ctl.decider.changes if c.reason == "rescue")
    assert (rescue.old, rescue.new) == (128, 32)  # LR x16 exploded within a few steps: back to 32
    assert rescue.step - ctl.decider.changes[ctl.decider.changes.index(rescue) - 1].step <= 5
    assert max(c.new for c in ctl.decider.changes[ctl.decider.changes.index(rescue):]) <= 64  # below sqrt(32 x 128)
    assert ctl.lr_limit.value == pytest.approx(0.2 * 8, rel=1e-6)  # 0.2 x sqrt(4 x 16): between the two steps' LRs
    after = [r.lr for r in ctl.history if r.step > rescue.step]
    assert len(after) > 20 and max(after) <= ctl.lr_limit.value * (1 + 1e-9)
    assert min(losses[rescue.step:rescue.step + 10]) < 0.5  # back at the noise floor (0.125) within ten steps
    with pytest.warns(RuntimeWarning, match="non-finite loss"), pytest.raises(NonFiniteLossError):
        _diverging_linreg(min_efficiency=0, steps=80)  # without the evidence checks the run is lost


def test_no_batch_decision_is_taken_while_the_loss_climbs_fast():
    ctl, _ = _diverging_linreg(min_efficiency=0.5, steps=40)
    est = NoiseEstimate(1e4, 5e3, 2e4, True, 1.0, 1e4, 50.0)  # a confident estimate far above the batch
    batch, changes = ctl.batch_size, len(ctl.decider.changes)
    ctl.progress.rising = True  # as at the step of a rescue: the growth just undone must not come back at once
    ctl._decide(est)
    assert ctl.batch_size == batch and len(ctl.decider.changes) == changes
    ctl.progress.rising = False
    ctl._decide(est)
    assert ctl.batch_size > batch  # the same estimate grows the batch once the loss is calm


def _linreg_run(noise_schedule, samples: int, cfg: ControllerConfig, dim: int = 16, seed: int = 0):
    """Frozen noisy linear regression whose label noise (hence B_simple) follows noise_schedule(samples)."""
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 / math.sqrt(dim))  # |w - w*|^2 = 1, w* = 0
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.0), 8, cfg)
    g = torch.Generator().manual_seed(seed)
    trace = []
    while ctl.samples < samples:
        x = torch.randn(8, dim, generator=g)
        y = math.sqrt(noise_schedule(ctl.samples)) * torch.randn(8, generator=g)
        ctl.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean())
        if ctl.step():
            trace.append((ctl.samples, ctl.batch_size))
    return trace, ctl


def test_controller_grows_fast_when_the_noise_rises_and_shrinks_when_it_falls():
    # B_simple = 16 (1 + s) + 1: about 80 for s = 4, 1,000 for s = 60; target = 2 x B_simple
    cfg = ControllerConfig(initial_batch=16, min_batch=16, max_batch=4096, min_efficiency=0, target_factor=2.0)
    schedule = lambda s: 4.0 if s < 100_000 else (60.0 if s < 400_000 else 4.0)  # noqa: E731
    trace, _ = _linreg_run(schedule, 600_000, cfg)
    at = lambda s: next(b for x, b in trace if x >= s)  # noqa: E731
    assert 96 <= at(90_000) <= 256
    assert at(200_000) >= 1024, "the batch should follow a rising noise scale within a small share of the run"
    assert at(590_000) <= at(390_000) * 0.8, "and come back down when it falls"


def test_controller_does_not_oscillate_on_a_noisy_constant_signal():
    cfg = ControllerConfig(initial_batch=16, min_batch=16, max_batch=4096, min_efficiency=0, target_factor=2.0)
    for seed in (3, 4):
        trace, _ = _linreg_run(lambda s: 8.0, 400_000, cfg, seed=seed)  # B_simple ~ 145: target ~ 290
        batches = [b for _, b in trace]
        changes = [(a, b) for a, b in zip(batches, batches[1:]) if a != b]
        assert all(b > a for a, b in changes), f"the batch reversed direction: {changes}"
        assert 192 <= batches[-1] <= 416  # target 2 x 145; it stops within the hysteresis band


# ----------------------------------------------------------------------------- measuring never changes training


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x[:, None, :])).flatten(1))


@pytest.mark.parametrize("measurement, expected", [("auto", "pieces"), ("examples", "examples")])
def test_convolutional_models_measure_with_pieces_unless_they_ask_for_per_example_norms(measurement, expected):
    model = _ConvNet()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 16,
                                  _fixed(64, measure_every=1, measurement=measurement))
    x, y = _data(2048)
    _train(model, ctl, x, y, 20)
    assert ctl.measurement == expected
    assert ctl.estimator.measurements == 20 and ctl.estimator.rejected == 0
    est = ctl.estimator.estimate()
    assert 0 < est.low <= est.value and math.isfinite(est.value)


def _sampled_run(cfg: ControllerConfig, steps: int = 40):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = AdaptiveBatchController(model, opt, 16, cfg)
    x, y = _data(2048)
    _train(model, ctl, x, y, steps)
    return model, ctl


@pytest.mark.parametrize("method", ["examples", "pieces"])
def test_measuring_keeps_every_step_s_samples_batch_and_lr(method):
    measured, m_ctl = _sampled_run(_fixed(128, measure_every=1, measurement=method))
    plain, p_ctl = _sampled_run(_fixed(128, measure_every=10_000, max_measure_every=10_000))  # only step 0
    assert m_ctl.measurement == method
    assert m_ctl.estimator.measurements == 40 and p_ctl.estimator.measurements == 1
    assert [(r.samples, r.batch, r.lr) for r in m_ctl.history] == [(r.samples, r.batch, r.lr) for r in p_ctl.history]
    if method == "examples":  # hooks only read: the very same computation, bit for bit
        assert {r.micro_batches for r in m_ctl.history} == {1}
        assert all(torch.equal(p, q) for p, q in zip(measured.parameters(), plain.parameters()))
    else:  # one micro-batch of 128, measured as 64 + 64: the same samples, another float order
        assert {r.micro_batches for r in m_ctl.history} == {2}
        for p, q in zip(measured.parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_same_seeds_give_the_same_trajectory_bit_for_bit_at_the_default_config():
    runs = [_sampled_run(ControllerConfig(), steps=150) for _ in range(2)]
    (m1, c1), (m2, c2) = runs
    key = lambda c: [(r.batch, r.lr, r.b_simple, r.noise_low, r.noise_high) for r in c.history]  # noqa: E731
    assert len({r.batch for r in c1.history}) > 1, "the trajectory should include batch changes"
    assert key(c1) == key(c2)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


# ----------------------------------------------------------------------------- robustness


def test_nan_loss_is_skipped_and_leaves_weights_and_estimate_untouched():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(16, measure_every=1))
    x, y = _data(8)
    for _ in range(8):
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        ctl.step()
    weights, est = copy.deepcopy(model.state_dict()), ctl.estimator.state_dict()
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        ctl.backward(nn.functional.cross_entropy(model(x), y) * math.nan)
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        assert not ctl.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    after = ctl.estimator.state_dict()
    assert after["sums"] == est["sums"]
    assert ctl.skipped_steps == 1 and ctl.estimator.rejected == 1
    ctl.backward(nn.functional.cross_entropy(model(x), y))  # training continues afterwards
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    assert ctl.step()


def test_nan_loss_raises_when_asked():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, _fixed(16),
                                  on_nonfinite="raise")
    x, y = _data(8)
    ctl.backward(nn.functional.cross_entropy(model(x), y) * math.inf)
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(NonFiniteLossError, match="weights are unchanged"):
        ctl.step()


def _scaled_run(scaler, inject_inf_at=None):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(32, measure_every=1), scaler=scaler, on_nonfinite="ignore")
    x, y = _data(32 * 20)
    for i, (xm, ym) in enumerate(zip(x.split(8), y.split(8))):
        loss = nn.functional.cross_entropy(model(xm), ym)
        if inject_inf_at is not None and i == inject_inf_at:
            handle = model[0].weight.register_hook(lambda g: torch.full_like(g, math.inf))
            ctl.backward(loss)
            handle.remove()
        else:
            ctl.backward(loss)
        ctl.step()
    ctl.flush()
    return ctl, model


def test_grad_scaler_norms_are_unscaled():
    plain, _ = _scaled_run(None)
    scaled, _ = _scaled_run(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert scaled.noise_scale == pytest.approx(plain.noise_scale, rel=1e-4)
    assert scaled.noise.grad_sq == pytest.approx(plain.noise.grad_sq, rel=1e-4)


def test_steps_skipped_by_grad_scaler_never_touch_the_estimate_and_are_counted():
    ctl, _ = _scaled_run(torch.amp.GradScaler("cpu", init_scale=2.0**12), inject_inf_at=41)
    assert ctl.amp_skipped_steps == 1
    assert ctl.estimator.rejected == 1
    assert math.isfinite(ctl.noise_scale)


@pytest.mark.parametrize("field,value", [
    ("grow_threshold", 0.9), ("shrink_threshold", 1.2), ("window_fraction", 0.0), ("lr_rule", "cubic"),
    ("cooldown_samples", -1), ("measure_every", 0), ("max_batch", 0), ("policy", "fastest"),
    ("micro_batch", None), ("max_measure_every", 0), ("min_efficiency", 1.0), ("schedule", "epochs"),
])
def test_config_errors_name_the_field_and_range(field, value):
    if field == "micro_batch":
        pytest.skip("not a config field")
    with pytest.raises(ConfigError, match=f"ControllerConfig.{field}=.*accepted"):
        ControllerConfig(**{field: value})


def test_fields_of_earlier_versions_say_what_replaced_them():
    with pytest.raises(ConfigError, match="cooldown_steps was replaced by cooldown_samples"):
        ControllerConfig.from_dict({"cooldown_steps": 50})


def test_config_round_trips_through_a_file(tmp_path):
    cfg = ControllerConfig(target_factor=0.3, lr_rule="sqrt", max_batch=512)
    assert ControllerConfig.load(cfg.save(tmp_path / "c.json")) == cfg
    (tmp_path / "bad.json").write_text('{"adabatch_controller_config": {"grow_treshold": 2}}')
    with pytest.raises(ConfigError, match="grow_treshold"):
        ControllerConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("change,message", [
    (dict(model=None), "model="), (dict(optimizer=None), "optimizer="), (dict(config={}), "not a dict"),
    (dict(micro_batch_size=True), "micro_batch_size"), (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(model=nn.ReLU()), "no parameters"), (dict(scheduler=object()), "scheduler="),
    (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(on_nonfinite="maybe"), "on_nonfinite"),
    (dict(dataset_size=0), "dataset_size"), (dict(keep_history="yes"), "keep_history"),
    (dict(policy="noise"), "policy="), (dict(energy_meter=object()), "energy_meter"),
])
def test_bad_controller_arguments_get_one_clear_error(change, message):
    model = _mlp()
    kwargs = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=8)
    kwargs.update(change)
    with pytest.raises(ConfigError, match=message):
        AdaptiveBatchController(**kwargs)


def test_an_optimizer_of_another_model_is_refused():
    with pytest.raises(ConfigError, match="belong to the model"):
        AdaptiveBatchController(_mlp(), torch.optim.SGD(_mlp(1).parameters(), lr=0.1), 8)


def test_config_bounds_that_cannot_hold_a_micro_batch_are_rejected():
    model = _mlp()
    with pytest.raises(ConfigError, match="max_batch"):
        AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 64,
                                ControllerConfig(max_batch=32))


def test_paused_time_is_left_out_of_the_training_clock():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, _fixed(16))
    x, y = _data(8)
    for _ in range(2):
        for _ in range(2):
            ctl.backward(nn.functional.cross_entropy(model(x), y))
        assert ctl.step()
        with ctl.paused():
            time.sleep(0.2)  # an evaluation
    ctl.flush()
    assert ctl.history[1].seconds - ctl.history[0].seconds < 0.1
    assert ctl.clock.seconds() < 0.15


# ----------------------------------------------------------------------------- resume


def _parts(seed: int = 0, micro: int = 16, adam: bool = False):
    """SGD at the default config, or (``adam``) AdamW with its betas following the batch."""
    model = _mlp(seed)
    if adam:
        opt = torch.optim.AdamW(model.parameters(), lr=0.005)
        cfg = ControllerConfig(lr_warmup_samples=256, beta_rule="beta2")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cfg = ControllerConfig(lr_warmup_samples=256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2000)
    ctl = AdaptiveBatchController(model, opt, micro, cfg, scheduler=sched)
    return model, opt, sched, ctl


def _checkpoint(parts, sampler) -> dict:
    model, opt, sched, ctl = parts
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "ctl": ctl.state_dict(), "sampler": sampler.state_dict()})


@pytest.mark.parametrize("adam", [False, True], ids=["default-sgd", "adamw-beta2"])
def test_resume_reproduces_the_uninterrupted_trajectory_bit_for_bit_at_the_default_config(adam):
    x, y = _data(2048)
    full = _parts(adam=adam)
    _train(full[0], full[3], x, y, 300)

    first = _parts(adam=adam)
    sampler = _train(first[0], first[3], x, y, 137)
    saved = _checkpoint(first, sampler)
    head = [(r.batch, r.lr, r.b_simple) for r in first[3].history]

    second = _parts(seed=123, adam=adam)  # different init: everything must come from the checkpoint
    second[0].load_state_dict(saved["model"])
    second[1].load_state_dict(saved["opt"])
    second[2].load_state_dict(saved["sched"])
    second[3].load_state_dict(saved["ctl"])
    resumed_sampler = second[3].batch_sampler(len(x), seed=1)
    resumed_sampler.load_state_dict(saved["sampler"])
    _train(second[0], second[3], x, y, 300, sampler=resumed_sampler)

    resumed = head + [(r.batch, r.lr, r.b_simple) for r in second[3].history]
    uninterrupted = [(r.batch, r.lr, r.b_simple) for r in full[3].history]
    assert len({b for b, _, _ in uninterrupted}) > 2, "the trajectory should include batch changes"
    assert resumed == uninterrupted
    for p, q in zip(full[0].parameters(), second[0].parameters()):
        assert torch.equal(p, q)
    if adam:  # the checkpoint holds the user's betas, not a step's scaled ones
        assert saved["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_state_dict_mid_step_is_refused():
    model, _, _, ctl = _parts()
    x, y = _data(16)
    ctl.backward(nn.functional.cross_entropy(model(x[:16]), y[:16]))  # a measured first step has two pieces
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        ctl.state_dict()


def test_a_checkpoint_of_another_config_or_version_is_refused_clearly():
    x, y = _data(256)
    a = _parts()
    _train(a[0], a[3], x, y, 5)
    state = a[3].state_dict()
    model = _mlp()
    other = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 16,
                                    ControllerConfig(target_factor=3.0))
    with pytest.raises(ConfigError, match="target_factor: checkpoint 1.0, this controller 3.0"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="version 1"):
        a[3].load_state_dict({**state, "version": 1})
    with pytest.raises(ConfigError, match="made by AdaptiveBatchController.state_dict"):
        a[3].load_state_dict({})


def test_elastic_resume_re_rounds_the_global_batch_to_the_new_granularity(caplog):
    x, y = _data(4096)
    a = _parts(micro=16)
    _train(a[0], a[3], x, y, 120)
    state = a[3].state_dict()
    b = _parts(micro=48)  # as if the job came back on three processes of 16
    with caplog.at_level("WARNING", logger="adabatch.controller"):
        b[3].load_state_dict(state)
    expected = max(48, round(state["batch_size"] / 48) * 48)
    assert b[3].batch_size == expected
    assert f"global batch {state['batch_size']} is re-rounded to {expected}" in caplog.text
    assert b[3].noise.value == a[3].noise.value and b[3].samples == a[3].samples


def test_callbacks_receive_every_step_in_order():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, _fixed(16, measure_every=3))
    seen = []
    ctl.add_callback(lambda r: seen.append(r.step))
    x, y = _data(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(20):
            ctl.backward(nn.functional.cross_entropy(model(x), y))
            ctl.step()
    ctl.flush()
    assert seen == list(range(ctl.steps)) and ctl.steps == 10
    # every record carries the estimate in force after its step, not only the measured ones
    assert all(math.isfinite(r.b_simple) for r in ctl.history[3:])
    assert [r.b_simple for r in ctl.history[3:6]] == [ctl.history[3].b_simple] * 3


@pytest.mark.parametrize("how", ["paused", "no_grad", "plain"])
def test_an_evaluation_between_steps_is_not_mistaken_for_the_step_s_examples(how):
    """Per-example norms hook the model's Linear layers on measured steps; a forward pass between
    steps (an evaluation) must not count as a second call of the layer, which would make the
    controller give per-example norms up for the rest of the run. Inside ``paused()`` or under
    ``no_grad`` it is ignored; a plain forward with gradients on is indistinguishable from training
    and falls back, as documented."""
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.05), 16, _fixed(32, measure_every=1))
    x, y = _data(1024)
    probe = torch.randn(64, 10)
    sampler = ctl.batch_sampler(len(x), seed=1)
    while ctl.steps < 30:
        for idx in sampler:
            ctl.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]))
            if ctl.step():
                if how == "paused":
                    with ctl.paused():
                        model(probe)
                elif how == "no_grad":
                    with torch.no_grad():
                        model(probe)
                else:
                    model(probe)
            if ctl.steps >= 30:
                break
    assert ctl.measurement == ("pieces" if how == "plain" else "examples")
    assert ctl.estimator.measurements >= 29
