"""Micro-batch growth, the controller-driven sampler, out-of-memory recovery, and the measurement budget."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.memory import MicroBatchMemory


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def _dataset(n: int = 2048) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g) + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    return TensorDataset(x, y)


def _run(config: ControllerConfig, steps: int, loader_workers: int = 0, model: nn.Module | None = None):
    model = model or _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = AdaptiveBatchController(model, opt, 16, config)
    ds = _dataset()
    loader = DataLoader(ds, batch_sampler=ctl.batch_sampler(len(ds), seed=3), num_workers=loader_workers)
    sizes = []
    while ctl.steps < steps:
        for x, y in loader:
            sizes.append(len(x))
            ctl.backward(nn.functional.cross_entropy(model(x), y))
            ctl.step()
            if ctl.steps >= steps:
                break
    ctl.flush()
    return model, ctl, sizes


def _fixed(batch: int, **kw) -> ControllerConfig:
    return ControllerConfig(initial_batch=batch, min_batch=batch, max_batch=batch, lr_rule="none", **kw)


def test_grown_micro_batches_train_exactly_like_accumulated_ones():
    small, ctl_small, sizes_small = _run(_fixed(128, max_micro_batch=16, measure_every=4, measurement="pieces"), 40)
    grown, ctl_grown, sizes_grown = _run(_fixed(128, measure_every=4, measurement="pieces"), 40)  # follows the batch
    assert set(sizes_small) == {16}
    assert max(sizes_grown) == 128  # one micro-batch per unmeasured step
    assert 64 in sizes_grown  # measured steps split the batch in two, never a 2x bigger step
    assert [r.batch for r in ctl_grown.history] == [128] * 40
    for p, q in zip(small.parameters(), grown.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_micro_batch_follows_a_growing_batch_up_to_its_cap():
    cfg = ControllerConfig(initial_batch=16, max_batch=512, max_micro_batch=64, measure_every=1, target_factor=50.0,
                           min_efficiency=0)
    _, ctl, _ = _run(cfg, 60)
    grown = [r for r in ctl.history if r.batch >= 64]
    assert grown and max(r.batch for r in grown) >= 256, "a large target factor should have grown the batch"
    # above the cap the batch moves in whole micro-batches of 64, so every micro-batch is full
    assert all(r.batch % 64 == 0 and r.micro_batches == r.batch // 64 * (2 if r.batch == 64 else 1)
               for r in grown if not r.measured or r.batch > 64)


def test_prefetching_workers_get_the_planned_sizes():
    _, ctl, sizes = _run(_fixed(64, measure_every=3, measurement="pieces"), 30, loader_workers=2)
    assert [r.batch for r in ctl.history] == [64] * 30  # no step got a stale size
    assert sizes.count(32) == 2 * sum(r.measured for r in ctl.history)


def test_growth_without_a_controller_driven_loader_is_a_clear_error():
    model = _mlp()
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 16,
                                  _fixed(64, measure_every=1000, max_measure_every=1000))
    ctl.next_micro_batch_size()  # a loader that followed once, then stopped asking
    x, y = _dataset()[:16]
    ctl.backward(nn.functional.cross_entropy(model(x), y), batch_size=16)  # told: fine
    with pytest.raises(RuntimeError, match="batch_sampler"):  # 64 planned in one micro-batch, 16 would arrive
        ctl.backward(nn.functional.cross_entropy(model(x), y))


class _OOMAbove(nn.Module):
    """Raises the real torch.OutOfMemoryError for inputs larger than ``limit`` rows (a CPU stand-in
    for a device running out of memory), then behaves like the wrapped model."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.raised = inner, limit, 0

    def forward(self, x):
        if len(x) > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"simulated: {len(x)} rows > {self.limit}")
        return self.inner(x)


def test_out_of_memory_lowers_the_micro_batch_cap_and_training_goes_on():
    model = _OOMAbove(_mlp(), limit=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = AdaptiveBatchController(model, opt, 16, _fixed(128, measure_every=4))
    ds = _dataset()
    before = [p.detach().clone() for p in model.parameters()]
    dropped_weights_equal = None
    loader = DataLoader(ds, batch_sampler=ctl.batch_sampler(len(ds)))
    while ctl.steps < 20:
        for x, y in loader:
            try:
                ctl.backward(nn.functional.cross_entropy(model(x), y))
            except torch.OutOfMemoryError:
                ctl.recover_from_oom()
                if dropped_weights_equal is None:
                    dropped_weights_equal = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
                continue
            ctl.step()
            if ctl.steps == 20:
                break
    ctl.flush()
    assert model.raised >= 1 and dropped_weights_equal
    assert ctl.steps == 20 and all(r.batch == 128 for r in ctl.history)
    assert max(r.micro_batch_size for r in ctl.history) == 32
    assert ctl.memory.failed == 4  # 64 samples = 4 base micro-batches did not fit


def test_out_of_memory_at_the_base_micro_batch_says_what_to_do():
    model = _OOMAbove(_mlp(), limit=8)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 16, _fixed(32))
    x, y = _dataset()[:16]
    with pytest.raises(torch.OutOfMemoryError):
        ctl.backward(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="lower micro_batch_size"):
        ctl.recover_from_oom()


def test_memory_line_is_fitted_from_observed_peaks_and_caps_growth():
    mem = MicroBatchMemory(budget_bytes=10_000, baseline_bytes=1_000)
    mem.observe(2, 1_400)  # 200 per unit above the baseline
    assert mem.cap(1_000) == 4  # at most twice the largest size seen
    mem.observe(4, 1_800)
    mem.observe(8, 2_600)
    fixed, per_unit = mem.line()
    assert fixed == pytest.approx(1_000) and per_unit == pytest.approx(200)
    assert mem.cap(1_000) == 16 and mem.cap(10) == 10
    mem.observe(16, 4_200)
    mem.observe(32, 7_400)
    assert mem.cap(1_000) == 45  # (10000 - 1000) / 200
    assert MicroBatchMemory().cap(1_000) == 1_000  # no budget (CPU): only OOMs limit growth


def test_measurement_interval_stretches_to_the_time_budget_only_when_asked():
    model = nn.Linear(4, 1)  # a step of a few microseconds: measuring is relatively expensive
    cfg = ControllerConfig(measure_every=2, max_measure_every=40, measure_budget=0.001, initial_batch=8, max_batch=8)
    x, y = torch.randn(4, 4), torch.randn(4, 1)
    ctl = fixed = None
    for c in ("timed", "fixed"):
        c = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.01), 4,
                                    cfg if c == "timed" else cfg.replace(measure_budget=None))
        ctl, fixed = (c, None) if ctl is None else (ctl, c)
        while c.steps < 400:
            c.backward(nn.functional.mse_loss(model(x), y))
            c.step()
    assert ctl.measure_interval == 40 and fixed.measure_interval == 2
    assert ctl.estimator.measurements <= 400 / 40 + 5  # the first few run at the minimum interval
    assert fixed.estimator.measurements == 200
    assert math.isfinite(ctl.noise_scale)


def test_default_cadence_spaces_measurements_a_sixteenth_of_the_window_apart():
    model = nn.Linear(4, 1)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.01), 4,
                                  ControllerConfig(initial_batch=32, min_batch=32, max_batch=32))
    g = torch.Generator().manual_seed(0)
    while ctl.samples < 40_000:
        ctl.backward(nn.functional.mse_loss(model(torch.randn(4, 4, generator=g)), torch.randn(4, 1, generator=g)))
        ctl.step()
    window = ctl.estimator.window()  # 0.1 x 40,000 = 4,000 samples: a measurement every 250, i.e. 7 steps of 32
    assert ctl.measure_interval == (window / 16) // 32
    assert 28 <= ctl.noise.measurements <= 36  # an exponential window's effective count: about 2 x 16
