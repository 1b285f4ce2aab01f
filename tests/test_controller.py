"""Controller behaviour: exact accumulation, LR composition, policy dynamics, robustness, resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from adabatch import AdaptiveBatchController, ConfigError, ControllerConfig, NonFiniteLossError
from adabatch.policy import Hysteresis, NoiseScalePolicy, PolicyInput


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
    return ControllerConfig(initial_batch=batch, min_batch=batch, max_batch=batch, measure_budget=None, **kw)


# ----------------------------------------------------------------------------- accumulation


def test_accumulation_equals_one_big_batch():
    x, y = _data(32 * 6)
    big, acc = _mlp(), _mlp()
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1, momentum=0.9)
    ctl = AdaptiveBatchController(acc, opt_acc, micro_batch_size=8, config=_fixed(32, lr_rule="none"))
    for s in range(6):
        xb, yb = x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)]
        opt_big.zero_grad()
        nn.functional.cross_entropy(big(xb), yb).backward()
        opt_big.step()
        for xm, ym in zip(xb.split(8), yb.split(8)):
            ctl.backward(nn.functional.cross_entropy(acc(xm), ym))
            ctl.step()
    assert ctl.steps == 6
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
    assert ctl.history == [] and ctl.samples == 29


def test_step_before_enough_micro_batches_does_nothing():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, _fixed(24))
    x, y = _data(8)
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    assert not ctl.step() and ctl.steps == 0


# ----------------------------------------------------------------------------- LR rules


def test_lr_is_scaled_only_during_the_step_and_composes_with_a_scheduler():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cfg = _fixed(32, base_batch=8, lr_rule="linear", measure_every=1000)
    ctl = AdaptiveBatchController(model, opt, 8, cfg, scheduler=sched)
    x, y = _data(8)
    for _ in range(4 * 4):
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        ctl.step()
    ctl.flush()
    applied = [r.lr for r in ctl.history]
    # scheduler: 0.1, 0.1, 0.05, 0.05; rule: x4 (32 / 8); the scheduler itself never sees the factor
    assert applied == pytest.approx([0.4, 0.4, 0.2, 0.2])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_adaptive_optimizers_default_to_sqrt_rule_and_preconditioned_noise():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.AdamW(model.parameters(), lr=1e-3), 8)
    assert ctl.lr_rule == "sqrt" and ctl.noise_kind == "preconditioned"
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=1e-3), 8)
    assert ctl.lr_rule == "linear" and ctl.noise_kind == "simple"


def test_preconditioned_noise_scale_is_estimated_under_adam():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(32, measure_every=1))
    x, y = _data(4000)
    g = torch.Generator().manual_seed(0)
    while ctl.steps < 60:
        idx = torch.randint(0, len(x), (8,), generator=g)
        ctl.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]))
        ctl.step()
    assert ctl.estimator.measurements == 59  # the first step has no second moments yet
    assert 0 < ctl.noise_scale < math.inf


def test_preconditioned_noise_with_sgd_is_a_clear_error():
    model = _mlp()
    with pytest.raises(ConfigError, match="noise_kind"):
        AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8,
                                ControllerConfig(noise_kind="preconditioned"))


# ----------------------------------------------------------------------------- policy


def _inp(batch: int, noise: float, step: int = 1000) -> PolicyInput:
    return PolicyInput(step=step, batch=batch, base_batch=32, noise_scale=noise, granularity=32, min_batch=32,
                       max_batch=4096)


def test_hysteresis_grows_shrinks_and_holds_inside_the_band():
    cfg = ControllerConfig(cooldown_steps=0, patience=1)
    h, p = Hysteresis(cfg), NoiseScalePolicy(0.5)
    assert h.decide(_inp(128, 2000.0), p.propose(_inp(128, 2000.0))) == 256  # capped at 2x
    assert h.decide(_inp(256, 100.0), p.propose(_inp(256, 100.0))) == 128
    assert h.decide(_inp(128, 300.0), p.propose(_inp(128, 300.0))) == 128  # target 150: inside the band
    assert h.decide(_inp(128, math.nan), math.nan) == 128


def test_infinite_noise_scale_means_grow():
    h = Hysteresis(ControllerConfig(cooldown_steps=0, patience=1))
    assert h.decide(_inp(64, math.inf), math.inf) == 128


def test_cooldown_blocks_a_second_change():
    h = Hysteresis(ControllerConfig(cooldown_steps=50, patience=1))
    assert h.decide(_inp(64, 0, step=10), 1000.0) == 128
    assert h.decide(_inp(128, 0, step=40), 1000.0) == 128
    assert h.decide(_inp(128, 0, step=60), 1000.0) == 256


def _linreg_run(noise_schedule, steps: int, cfg: ControllerConfig, dim: int = 16, seed: int = 0):
    """Frozen noisy linear regression whose label noise (hence B_simple) follows noise_schedule(step)."""
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 / math.sqrt(dim))  # |w - w*|^2 = 1, w* = 0
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.0), 8, cfg)
    g = torch.Generator().manual_seed(seed)
    planned = []
    while ctl.steps < steps:
        x = torch.randn(8, dim, generator=g)
        y = math.sqrt(noise_schedule(ctl.steps)) * torch.randn(8, generator=g)
        ctl.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean())
        if ctl.step():
            planned.append(ctl.batch_size)
    return planned


def test_controller_grows_when_noise_rises_and_shrinks_when_it_falls():
    cfg = ControllerConfig(initial_batch=32, min_batch=16, max_batch=1024, cooldown_steps=20, measure_every=1, measure_budget=None,
                           ema_decay=0.8)
    # B_simple = 16 (1 + s) + 1: about 100 for s=4, 1000 for s=60
    batches = _linreg_run(lambda s: 4.0 if s < 400 else (60.0 if s < 900 else 4.0), 1400, cfg)
    early, mid, late = batches[390], batches[880], batches[-1]
    assert mid >= 4 * early
    assert late <= mid / 2


def test_controller_does_not_oscillate_on_a_noisy_constant_signal():
    cfg = ControllerConfig(initial_batch=32, min_batch=16, max_batch=1024, measure_budget=None)  # fixed cadence, default knobs otherwise
    for seed in (3, 4):
        batches = _linreg_run(lambda s: 8.0, 3000, cfg, seed=seed)  # B_simple ~ 145: target ~ 72
        changes = [b for a, b in zip(batches, batches[1:]) if a != b]
        directions = [1 if b > a else -1 for a, b in zip(batches, batches[1:]) if a != b]
        assert 1 <= len(changes) <= 2, f"batch changed {len(changes)} times: {changes}"
        assert all(d == directions[0] for d in directions), f"the batch reversed direction: {changes}"
        assert 48 <= batches[-1] <= 112


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
    assert after["grad_sq_ema"] == est["grad_sq_ema"] and after["trace_ema"] == est["trace_ema"]
    assert ctl.skipped_steps == 1 and ctl.estimator.rejected == 1
    ctl.backward(nn.functional.cross_entropy(model(x), y))  # training continues afterwards
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    assert ctl.step()


def test_nan_loss_raises_when_asked():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 8, _fixed(8),
                                  on_nonfinite="raise")
    x, y = _data(8)
    ctl.backward(nn.functional.cross_entropy(model(x), y) * math.inf)
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(NonFiniteLossError, match="weights are unchanged"):
        ctl.step()


def _scaled_run(scaler, inject_inf_at=None):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = AdaptiveBatchController(model, opt, 8, _fixed(32, measure_every=1, ema_decay=0.5), scaler=scaler,
                                  on_nonfinite="ignore")
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
    assert scaled.estimator.grad_sq == pytest.approx(plain.estimator.grad_sq, rel=1e-4)


def test_steps_skipped_by_grad_scaler_never_touch_the_estimate_and_are_counted():
    ctl, _ = _scaled_run(torch.amp.GradScaler("cpu", init_scale=2.0**12), inject_inf_at=41)
    assert ctl.amp_skipped_steps == 1
    assert ctl.estimator.rejected == 1
    assert math.isfinite(ctl.noise_scale)


@pytest.mark.parametrize("field,value", [
    ("grow_threshold", 0.9), ("shrink_threshold", 1.2), ("ema_decay", 1.0), ("lr_rule", "cubic"),
    ("cooldown_steps", -1), ("measure_every", 0), ("max_batch", 0), ("policy", "fastest"),
])
def test_config_errors_name_the_field_and_range(field, value):
    with pytest.raises(ConfigError, match=f"ControllerConfig.{field}=.*accepted"):
        ControllerConfig(**{field: value})


def test_config_bounds_that_cannot_hold_a_micro_batch_are_rejected():
    model = _mlp()
    with pytest.raises(ConfigError, match="max_batch"):
        AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 64,
                                ControllerConfig(max_batch=32))


def test_config_round_trips_through_a_file(tmp_path):
    cfg = ControllerConfig(target_factor=0.3, lr_rule="sqrt", max_batch=512)
    assert ControllerConfig.load(cfg.save(tmp_path / "c.json")) == cfg
    (tmp_path / "bad.json").write_text('{"adabatch_controller_config": {"grow_treshold": 2}}')
    with pytest.raises(ConfigError, match="grow_treshold"):
        ControllerConfig.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- resume


def _stream(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)


def _make(seed: int = 0):
    model = _mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=500)
    cfg = ControllerConfig(initial_batch=8, max_batch=256, cooldown_steps=5, measure_every=2, measure_budget=None, warmup_measurements=2,
                           target_factor=2.0, lr_warmup_steps=3)
    return model, opt, sched, AdaptiveBatchController(model, opt, 8, cfg, scheduler=sched)


def _train(parts, start_micro: int, steps: int) -> int:
    model, _, _, ctl = parts
    i = start_micro
    while ctl.steps < steps:
        x, y = _stream(i)
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        ctl.step()
        i += 1
    return i


def test_resume_reproduces_the_uninterrupted_trajectory_bitwise():
    full = _make()
    _train(full, 0, 120)
    full[3].flush()

    first = _make()
    micro = _train(first, 0, 60)
    saved = {"model": copy.deepcopy(first[0].state_dict()), "opt": copy.deepcopy(first[1].state_dict()),
             "sched": first[2].state_dict(), "ctl": copy.deepcopy(first[3].state_dict())}
    head = [(r.batch, r.lr) for r in first[3].history]

    second = _make(seed=123)  # different init: everything must come from the checkpoint
    second[0].load_state_dict(saved["model"])
    second[1].load_state_dict(saved["opt"])
    second[2].load_state_dict(saved["sched"])
    second[3].load_state_dict(saved["ctl"])
    _train(second, micro, 120)
    second[3].flush()

    resumed = head + [(r.batch, r.lr) for r in second[3].history]
    uninterrupted = [(r.batch, r.lr) for r in full[3].history]
    assert len(set(b for b, _ in uninterrupted)) > 2, "the trajectory should include batch changes"
    assert resumed == uninterrupted
    for p, q in zip(full[0].parameters(), second[0].parameters()):
        assert torch.equal(p, q)


def test_state_dict_mid_step_is_refused():
    model, _, _, ctl = _make()
    ctl.batch_size = 16
    ctl._plan_step()
    x, y = _stream(0)
    ctl.backward(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        ctl.state_dict()


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
    assert all(math.isfinite(r.b_simple) for r in ctl.history)
    assert [r.b_simple for r in ctl.history[:3]] == [ctl.history[0].b_simple] * 3
