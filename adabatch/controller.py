"""AdaptiveBatchController: adapts the effective batch of an ordinary PyTorch loop while it trains.

The user keeps their model, loss, optimizer, scheduler and DataLoader (which yields micro-batches of
``micro_batch_size``) and hands backward and step to the controller::

    controller = AdaptiveBatchController(model, optimizer, micro_batch_size=32)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        controller.backward(loss)   # scales the loss for accumulation
        controller.step()           # steps optimizer and scheduler once enough micro-batches are in

Data flows one way: gradients -> :mod:`adabatch.gradnorm` (norms) -> :mod:`adabatch.noise`
(estimate) -> :mod:`adabatch.policy` (target and hysteresis) -> :mod:`adabatch.lr` (factor) ->
optimizer step.

Micro-batch growth. With ``ControllerConfig(max_micro_batch=...)`` and a loader built on
``controller.batch_sampler(...)``, a step of k base micro-batches may run as fewer, larger
micro-batches (the largest size that divides the step, fits under the cap and, on CUDA, fits in
memory by :mod:`adabatch.memory`). An out-of-memory error is recovered by
:meth:`AdaptiveBatchController.recover_from_oom`, which lowers the cap for good.

Loss scaling. A step planned as P samples per process backpropagates n_i / P times each
micro-batch's mean loss (n_i its samples), so the accumulated gradient is sum(samples) / P. When the
samples do not add up to P (a short last batch), the gradients are multiplied by P / N before the
step. Either way the optimizer sees exactly the mean gradient over the N samples of the step, as one
big batch of N would give it.

Measurement. A measured step always has at least two micro-batches (a step planned as one is split,
or takes two); each micro-batch but the last is taken alone from ``.grad`` and the sum at the step
(:mod:`adabatch.gradnorm`), with one read-back at the step. No hook is ever registered. Measured
steps come every ``measure_every`` steps, or further apart while the controller's own timing says
they would take more than ``measure_budget`` of the training time. The only value read back on other
steps is the step's mean loss for the NaN/inf check (``on_nonfinite="ignore"`` drops that read as well).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from adabatch.config import ConfigError, ControllerConfig
from adabatch.gradnorm import MicroBatchNorms, adam_second_moments
from adabatch.lr import LRScaler, resolve_rule
from adabatch.memory import MicroBatchMemory
from adabatch.noise import NoiseScaleEstimator
from adabatch.policy import BatchPolicy, Hysteresis, NoiseScalePolicy, PolicyInput, round_to_granularity
from adabatch.sampler import AdaptiveBatchSampler
from adabatch.telemetry import StepRecord, Telemetry

log = logging.getLogger(__name__)

NONFINITE_MODES = ("skip", "raise", "ignore")


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite (with ``on_nonfinite="raise"``, or too many steps in a row)."""


class AdaptiveBatchController:
    """Grows and shrinks the effective batch from the gradient noise scale, rescaling the LR.

    Args:
        model: the module being trained (a ``DistributedDataParallel`` wrapper is recognised, and
            gradient sync is skipped on all but the last micro-batch of a step).
        optimizer: any ``torch.optim.Optimizer``; its learning rate is the one for ``base_batch``.
        micro_batch_size: samples per micro-batch on this process (what the DataLoader yields);
            every batch size is a multiple of it.
        config: the knobs (:class:`ControllerConfig`); defaults suit most runs.
        scheduler: optional LR scheduler, stepped once per optimizer step. Schedulers stepped by the
            user (per epoch, on plateau) work too: the controller only scales the LR during the step.
        scaler: optional ``torch.amp.GradScaler``; the loss is scaled through it and norms unscaled.
        max_grad_norm: clip the total gradient norm to this value before each step.
        on_nonfinite: what a NaN/inf loss does: ``skip`` the step (counted, warned), ``raise``, or
            ``ignore`` (no check, no host sync per step).
        energy_meter: optional :class:`adabatch.energy.EnergyMeter`; ``energy_aware=True`` without
            one picks a meter automatically and sets the energy policy.
        keep_history: keep every :class:`StepRecord` in ``controller.history``.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ctl = AdaptiveBatchController(model, opt, micro_batch_size=8)
        >>> for _ in range(4):
        ...     x, y = torch.randn(8, 4), torch.randn(8, 1)
        ...     ctl.backward(torch.nn.functional.mse_loss(model(x), y))
        ...     _ = ctl.step()
        >>> ctl.steps, ctl.batch_size
        (3, 8)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batch_size: int,
        config: ControllerConfig | None = None,
        *,
        scheduler: Any = None,
        scaler: Any = None,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "skip",
        energy_meter: Any = None,
        energy_aware: bool = False,
        keep_history: bool = True,
        process_group: Any = None,
    ) -> None:
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size={micro_batch_size!r} is invalid: accepted an integer >= 1.")
        if on_nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"on_nonfinite={on_nonfinite!r} is invalid: accepted {', '.join(NONFINITE_MODES)}.")
        config = config or ControllerConfig()
        if energy_aware and config.policy == "noise":
            config = config.replace(policy="energy")
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.micro_batch_size = micro_batch_size
        self.process_group = process_group
        self.world_size = _world_size(process_group)
        self.granularity = micro_batch_size * self.world_size
        self._ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

        self.min_batch = round_to_granularity(config.min_batch or self.granularity, self.granularity, 1, 1 << 62)
        if config.max_batch < self.granularity:
            raise ConfigError(f"ControllerConfig.max_batch={config.max_batch} is smaller than one micro-batch "
                              f"on every process ({self.granularity}); raise max_batch or shrink the micro-batch.")
        self.max_batch = (config.max_batch // self.granularity) * self.granularity
        if self.min_batch > self.max_batch:
            raise ConfigError(f"ControllerConfig.min_batch={config.min_batch} rounds to {self.min_batch}, above "
                              f"max_batch={self.max_batch}; widen the bounds.")
        start = config.initial_batch or config.base_batch or self.granularity
        self.batch_size = round_to_granularity(start, self.granularity, self.min_batch, self.max_batch)
        self.base_batch = config.base_batch or self.batch_size

        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ConfigError("the optimizer holds no parameter that requires grad.")
        self._params = params
        self._max_micro_units = max(1, (config.max_micro_batch or micro_batch_size) // micro_batch_size)
        self.memory = MicroBatchMemory.for_device(params[0].device, config.memory_fraction)
        self._track_memory = self.memory.budget_bytes is not None and self._max_micro_units > 1
        self.noise_kind = self._resolve_noise_kind(config.noise_kind)
        self.lr_rule = resolve_rule(config.lr_rule, optimizer)
        self.lr = LRScaler(self.lr_rule, self.base_batch, config.lr_warmup_steps)
        self.estimator = NoiseScaleEstimator(config.ema_decay)
        self.hysteresis = Hysteresis(config)
        self.energy_meter = energy_meter
        if self.energy_meter is None and config.policy in ("energy", "zeus"):
            from adabatch.energy import detect_meter

            self.energy_meter = detect_meter()
            log.info("adabatch energy meter: %s", self.energy_meter.describe())
        self.policy: BatchPolicy = _make_policy(config)
        self.telemetry = Telemetry(keep_history)

        self.steps = 0
        self.samples = 0
        self.skipped_steps = 0
        self.amp_skipped_steps = 0
        self._consecutive_nonfinite = 0
        self._next_measure = 0
        self._seconds_offset = 0.0
        self._energy_offset = 0.0
        self._t0 = time.perf_counter()
        self._energy0 = self._read_energy()
        self._window = (0, 0, 0.0, self._energy0)  # steps, samples, seconds, joules at the last measurement
        self.measure_interval = config.measure_every  # steps between measurements, stretched by the budget
        self.measure_seconds = 0.0  # time spent in measurement work, as timed by the controller
        self._measure_cost: float | None = None  # smoothed seconds of measurement work per measured step
        self._measure_seconds = 0.0  # measurement work of the step in progress
        self._flush_seconds = 0.0  # the last measured step's decision time
        self._amp_found: Tensor | None = None
        self._factor_batch = -1  # step batch the cached LR factor was computed for (-1: stale)
        self._factor = 1.0
        self._issued: collections.deque[int] = collections.deque()  # sizes handed to the sampler, not yet used
        optimizer.zero_grad(set_to_none=True)  # stale gradients would leak into the first step
        self._reset_step_state()
        self._plan_step()

    # ------------------------------------------------------------------ user API

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches that make up the step in progress."""
        return self._k

    @property
    def micro_batch_planned(self) -> int:
        """Samples per process of the micro-batches of the step in progress."""
        return self._micro_size

    @property
    def noise_scale(self) -> float:
        """Smoothed B_simple (preconditioned for Adam-family optimizers under ``noise_kind="auto"``)."""
        return self.estimator.b_simple

    @property
    def energy_joules(self) -> float | None:
        """Joules since training started, from the energy meter (None without one)."""
        return self._energy_since_start()

    @property
    def history(self) -> list[StepRecord]:
        return self.telemetry.history

    def add_callback(self, fn: Callable[[StepRecord], None]) -> None:
        """Call ``fn(record)`` for every optimizer step (records arrive in groups, in order)."""
        self.telemetry.callbacks.append(fn)

    def batch_sampler(self, num_samples: int, **kwargs: Any) -> AdaptiveBatchSampler:
        """A ``batch_sampler`` for ``DataLoader`` whose micro-batch sizes follow this controller.

        Needed for micro-batch growth (``ControllerConfig.max_micro_batch``); keyword arguments go
        to :class:`~adabatch.sampler.AdaptiveBatchSampler` (shuffle, seed, drop_last, rank).
        """
        return AdaptiveBatchSampler(self, num_samples, **kwargs)

    def next_micro_batch_size(self, size: int | None = None) -> int:
        """Reserve the next micro-batch the loader will produce and return its size (per process).

        The plan is followed ahead of the step in progress, so prefetching loaders get the sizes the
        coming steps will use (a batch decision taken meanwhile applies a few micro-batches late).
        ``size`` overrides the planned size (a short last batch).
        """
        if size is None:
            ahead, k, micro = self._micro + len(self._issued), self._k, self._micro_size
            step, next_measure, measured = self.steps, self._next_measure, self._norms is not None
            while ahead >= k:  # walk the plan forward to the step this micro-batch will belong to
                ahead -= k
                if measured:
                    next_measure = step + self.measure_interval
                step += 1
                measured = step >= next_measure
                k, micro = self._plan_for(measured)
            size = micro
        self._issued.append(int(size))
        return int(size)

    def discard_issued(self, last: int | None = None) -> None:
        """Forget the ``last`` reserved sizes (all of them with None): those batches will not come."""
        if last is None:
            self._issued.clear()
        else:
            for _ in range(min(last, len(self._issued))):
                self._issued.pop()

    def backward(self, loss: Tensor, batch_size: int | None = None) -> None:
        """Backpropagate one micro-batch's mean loss, scaled so the step averages over all samples.

        ``batch_size`` is the number of samples in this micro-batch when it differs from the
        planned size (a short last batch); with :meth:`batch_sampler` it is known already.
        """
        if self._issued:
            n = self._issued.popleft()
            if batch_size is not None:
                n = int(batch_size)
        elif batch_size is None:
            n = self._micro_size
            if n != self.micro_batch_size:
                raise RuntimeError(
                    f"this step plans micro-batches of {n} samples (micro-batch growth, "
                    f"ControllerConfig.max_micro_batch={self.config.max_micro_batch}), but the loader does not "
                    "follow the controller: build it with DataLoader(..., batch_sampler=controller.batch_sampler("
                    "len(dataset))), or pass batch_size=len(x) to backward().")
        else:
            n = int(batch_size)
        self._micro += 1
        self._step_samples += n
        self._losses.append(loss)
        self._sizes.append(n)
        scale = n / self._planned
        scaled = loss * scale if scale != 1.0 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        norms = self._norms
        if norms is not None:
            t = time.perf_counter()
            norms.before_backward(last=self._micro == self._k)
            self._measure_seconds += time.perf_counter() - t
        try:
            scaled.backward()
        except torch.OutOfMemoryError:
            self._oom_in_backward = True
            raise
        if norms is not None:
            t = time.perf_counter()
            norms.after_backward()
            self._measure_seconds += time.perf_counter() - t
        if self._ddp and self._micro + 1 == self._k:
            self.model.require_backward_grad_sync = True

    def step(self) -> bool:
        """Step the optimizer if the step's micro-batches are all in; return whether it stepped."""
        k = self._k
        if self._micro < k:
            return False
        if self._micro > k:
            raise RuntimeError(f"{self._micro} micro-batches were accumulated for a step of {k}; call "
                               "controller.step() after every controller.backward().")
        loss_value = self._step_loss()
        if self.on_nonfinite != "ignore":
            if isinstance(loss_value, Tensor):
                loss_value = loss_value.item()
            if not math.isfinite(loss_value):
                self._nonfinite_step(loss_value)
                return False
            self._consecutive_nonfinite = 0

        measurement = None
        if self._norms is not None:
            t = time.perf_counter()
            measurement = self._measure()
            self._measure_seconds += time.perf_counter() - t
        n = self._step_samples
        if n != self._planned:
            torch._foreach_mul_([p.grad for p in self._params if p.grad is not None], self._planned / n)

        step_batch = n * self.world_size
        if step_batch != self._factor_batch or self.lr.ramping:
            self._factor = self.lr.factor_for(self.steps, step_batch, self.estimator.b_simple)
            self._factor_batch = step_batch
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        groups = self.optimizer.param_groups
        saved = self.lr.apply(self.optimizer, self._factor) if self._factor != 1.0 else None
        try:
            applied_lr = groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self._count_amp_skip()
                self.scaler.update()
            else:
                self.optimizer.step()
        finally:
            if saved is not None:
                self.lr.restore(self.optimizer, saved)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

        self.samples += step_batch
        self.telemetry.add(step_batch, k, self._sizes[0], applied_lr, loss_value,
                           self._seconds_offset + time.perf_counter() - self._t0)
        self.steps += 1
        replan = measurement is not None or self._ddp or self._track_memory
        if self._track_memory:
            self._observe_memory()
        if measurement is not None:
            self._flush(measurement)
            replan = True
        self._micro = 0
        self._step_samples = 0
        self._losses = []
        self._sizes = []
        if replan or self.steps >= self._next_measure:
            self._plan_step()
        return True

    def recover_from_oom(self) -> None:
        """Recover from ``torch.OutOfMemoryError`` raised by this step's forward or backward.

        The step in progress is dropped (its gradients are freed; its samples are not counted and
        the weights are unchanged), the micro-batch cap is lowered below the size that failed, and
        the step is planned again. Raises if the base micro-batch itself does not fit::

            try:
                controller.backward(loss_fn(model(x), y))
            except torch.OutOfMemoryError:
                controller.recover_from_oom()
                continue
        """
        failed = self._micro_size // self.micro_batch_size
        if not self._oom_in_backward and self._issued:
            self._issued.popleft()  # the batch whose forward failed never reached backward()
        self.optimizer.zero_grad(set_to_none=True)
        if failed <= 1:
            raise RuntimeError(
                f"out of memory at the base micro-batch ({self.micro_batch_size} samples per process), which "
                "adabatch never goes below; lower micro_batch_size.")
        cap = self.memory.out_of_memory(failed)
        log.warning("adabatch: out of memory with micro-batches of %d samples; the cap is now %d samples and "
                    "this step (%d samples accumulated) was dropped.", self._micro_size,
                    cap * self.micro_batch_size, self._step_samples)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._reset_step_state()
        self._plan_step()

    def log_metrics(self, **metrics: float) -> None:
        """Attach evaluation metrics (e.g. ``accuracy=0.91``) to the latest step's record."""
        if self.steps == 0:
            raise RuntimeError("log_metrics() needs at least one optimizer step first.")
        self.telemetry.log_metrics(self.steps - 1, {k: float(v) for k, v in metrics.items()})

    def flush(self) -> None:
        """Deliver every pending record to the history and callbacks (call once training ends)."""
        self.telemetry.emit_until(self.steps)

    def stats(self) -> dict[str, Any]:
        """Counters worth logging: steps, samples, rejected measurements, skipped steps."""
        return {
            "steps": self.steps, "samples": self.samples, "batch_size": self.batch_size,
            "micro_batch_size": self._micro_size, "noise_scale": self.noise_scale,
            "measurements": self.estimator.measurements, "rejected_measurements": self.estimator.rejected,
            "measure_interval": self.measure_interval,
            "measure_share": self.measure_seconds / max(self._elapsed(), 1e-9),
            "skipped_steps": self.skipped_steps, "amp_skipped_steps": self.amp_skipped_steps,
            "lr_rule": self.lr_rule, "noise_kind": self.noise_kind,
            "energy_source": getattr(self.energy_meter, "source", None),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume with the same batch and LR trajectory."""
        if self._micro:
            raise RuntimeError("state_dict() must be taken between optimizer steps, not in the middle of "
                               f"one ({self._micro} of {self._k} micro-batches accumulated).")
        self.flush()
        return {
            "config": self.config.to_dict(),
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "base_batch": self.base_batch,
            "steps": self.steps,
            "samples": self.samples,
            "next_measure": self._next_measure,
            "measure_interval": self.measure_interval,
            "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "seconds": self._elapsed(),
            "energy_j": self._energy_since_start(),
            "estimator": self.estimator.state_dict(),
            "hysteresis": self.hysteresis.state_dict(),
            "lr": self.lr.state_dict(),
            "policy": self.policy.state_dict(),
            "memory": self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["micro_batch_size"] * state["world_size"] != self.granularity:
            raise ConfigError(
                f"checkpoint was taken with micro_batch_size={state['micro_batch_size']} on "
                f"{state['world_size']} process(es); this controller has {self.micro_batch_size} on "
                f"{self.world_size}. Resume with the same granularity.")
        self.batch_size = state["batch_size"]
        self.base_batch = state["base_batch"]
        self.lr.base_batch = self.base_batch
        self.steps, self.samples = state["steps"], state["samples"]
        self._next_measure = state.get("next_measure", self.steps)  # absent from 0.1 checkpoints
        self.skipped_steps, self.amp_skipped_steps = state["skipped_steps"], state["amp_skipped_steps"]
        self._t0 = time.perf_counter()
        self._seconds_offset = state["seconds"]
        self._energy0 = self._read_energy()
        self._energy_offset = state["energy_j"] or 0.0
        self._window = (self.steps, self.samples, self._elapsed(), self._read_energy())
        self.measure_interval = state.get("measure_interval", self.config.measure_every)
        self.estimator.load_state_dict(state["estimator"])
        self.hysteresis.load_state_dict(state["hysteresis"])
        self.lr.load_state_dict(state["lr"])
        self.policy.load_state_dict(state["policy"])
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])
        self.telemetry.restart(self.steps, self.samples,
                               (self.estimator.b_simple, self.estimator.grad_sq, self.estimator.trace_sigma))
        self._factor_batch = -1
        self._issued.clear()
        self._reset_step_state()
        self._plan_step()

    # ------------------------------------------------------------------ internals

    def _resolve_noise_kind(self, kind: str) -> str:
        has_second_moment = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam,
                                                        torch.optim.RAdam))
        if kind == "auto":
            return "preconditioned" if has_second_moment else "simple"
        if kind == "preconditioned" and not has_second_moment:
            raise ConfigError(f"ControllerConfig.noise_kind='preconditioned' needs an optimizer with Adam's "
                              f"second moments (Adam, AdamW, NAdam, RAdam), not {type(self.optimizer).__name__}; "
                              "use 'simple'.")
        return kind

    def _reset_step_state(self) -> None:
        self._micro = 0
        self._step_samples = 0
        self._losses: list[Tensor] = []
        self._sizes: list[int] = []
        self._norms: MicroBatchNorms | None = None
        self._oom_in_backward = False
        self._measure_seconds = 0.0

    def _step_loss(self) -> Tensor | float:
        """Sample-weighted mean loss of the step: a float on CPU, else one device op at most."""
        losses, sizes = self._losses, self._sizes
        if len(losses) == 1:
            return losses[0] if self.on_nonfinite != "ignore" else losses[0].detach()
        if losses[0].device.type == "cpu":  # no device to sync with: plain floats are cheapest
            return math.fsum(l.item() * n for l, n in zip(losses, sizes)) / self._step_samples
        weights = torch.tensor(sizes, dtype=torch.float32).to(losses[0].device, non_blocking=True)
        return (torch.stack([l.detach().float() for l in losses]) * weights).sum() / self._step_samples

    def _plan_for(self, measure: bool) -> tuple[int, int]:
        """(micro-batches, samples per micro-batch) of a step at the current batch size."""
        units = self.batch_size // self.granularity
        m = _largest_divisor(units, self._micro_cap())
        if measure and units // m == 1:
            m = _largest_divisor(units, units - 1)  # split one micro-batch into two or more
        k = max(units // m, 2) if measure else units // m
        return k, m * self.micro_batch_size

    def _micro_cap(self) -> int:
        return self.memory.cap(self._max_micro_units)

    def _plan_step(self) -> None:
        """Fix the next step's micro-batches and whether it is measured."""
        measure = self.steps >= self._next_measure
        moments = None
        if measure and self.noise_kind == "preconditioned":
            moments = adam_second_moments(self.optimizer, self._params)
            measure = moments is not None  # no second moments before the first Adam step
        self._norms = MicroBatchNorms(self._params, moments) if measure else None
        self._k, self._micro_size = self._plan_for(measure)
        self._planned = self._k * self._micro_size
        if self._ddp:
            self.model.require_backward_grad_sync = self._k == 1
        if self._track_memory:
            torch.cuda.reset_peak_memory_stats(self._params[0].device)

    def _observe_memory(self) -> None:
        self.memory.observe(max(self._sizes) // self.micro_batch_size,
                            float(torch.cuda.max_memory_allocated(self._params[0].device)))

    def _measure(self) -> Tensor:
        """Squares of every norm of this step (micro-batches alone, the sum, the AMP scale), one tensor."""
        norms = self._norms
        norms.finish()
        self._layout = [len(group) for group in norms.alone] + [len(norms.total)]
        parts = [n for group in norms.alone for n in group] + norms.total
        if self.scaler is not None:  # update() rescales in place after the step: keep this step's value
            parts.append(self.scaler._get_scale_async().reshape(()).float())
        return torch.stack(parts).square()

    def _flush(self, measurement: Tensor) -> None:
        """The one host sync of a measured step: fold the measurement in, decide, emit records."""
        seconds, joules = self._elapsed(), self._read_energy()
        w_steps, w_samples, w_seconds, w_joules = self._window
        step_seconds = (seconds - w_seconds) / max(self.steps - w_steps, 1)
        cost = self._measure_seconds + self._flush_seconds  # this step's norms, the last decision's time
        if self.world_size > 1:
            # every rank must take the same decision and the same next measured step: average the
            # measurement and the timings over ranks, in one all-reduce
            timing = torch.tensor([cost, step_seconds], dtype=measurement.dtype).to(measurement.device)
            measurement = torch.cat([measurement, timing])
            torch.distributed.all_reduce(measurement, group=self.process_group)
            measurement /= self.world_size  # small: mean over ranks; big and scale: identical on every rank
        values = measurement.tolist()  # waits for the device: not counted as measurement cost
        t_start = time.perf_counter()
        if self.world_size > 1:
            cost, step_seconds = values[-2:]
        # micro-batch i alone held (n_i / P) scale G_{n_i}; the step's sum (N / P) scale G_N
        planned, sizes, n = self._planned, self._sizes, self._step_samples
        sums, at = [], 0
        for length in self._layout:
            sums.append(math.fsum(values[at:at + length]))
            at += length
        first = sizes[0]
        same = [v for v, size in zip(sums[:-1], sizes) if size == first]  # one small size only
        small_sq = math.fsum(same) / len(same) * (planned / first) ** 2
        big_sq = sums[-1] * (planned / n) ** 2
        if self.scaler is not None:
            small_sq, big_sq = small_sq / values[at], big_sq / values[at]
        self.estimator.update(small_sq, big_sq, float(first), float(n * self.world_size))
        self._factor_batch = -1  # AdaScale's gain moves with the estimate
        if self._amp_found is not None:
            self.amp_skipped_steps += int(self._amp_found.item())
            self._amp_found = None

        self.policy.observe(self.batch_size, self.samples - w_samples, seconds - w_seconds,
                            None if joules is None or w_joules is None else joules - w_joules)
        self._window = (self.steps, self.samples, seconds, joules)
        estimates = (self.estimator.b_simple, self.estimator.grad_sq, self.estimator.trace_sigma)
        self.telemetry.measured(self.steps - 1, estimates, self._energy_since_start(joules),
                                getattr(self.energy_meter, "source", None))

        # warm-up and patience count measurements at the measure_every cadence: when the budget
        # spaces measurements further apart, fewer of them (at least 2 and 1) span the same steps
        spread = self.config.measure_every / self.measure_interval
        warmup = self.config.warmup_measurements
        if self.estimator.measurements >= max(min(2, warmup), math.ceil(warmup * spread)):
            inp = PolicyInput(step=self.steps, batch=self.batch_size, base_batch=self.base_batch,
                              noise_scale=self.estimator.b_simple, granularity=self.granularity,
                              min_batch=self.min_batch, max_batch=self.max_batch)
            def bounds() -> tuple[float, float]:
                # targets rise with the noise scale, so its bounds map to the target's bounds
                low, high = self.estimator.b_simple_bounds(self.config.confidence_z)
                return (self.policy.propose(dataclasses.replace(inp, noise_scale=low)),
                        self.policy.propose(dataclasses.replace(inp, noise_scale=high)))

            new = self.hysteresis.decide(inp, self.policy.propose(inp), bounds,
                                         patience=max(1, math.ceil(self.config.patience * spread)))
            if new != self.batch_size:
                self.lr.batch_changed(self.steps, self.batch_size, new)
                self.batch_size = new
        self.telemetry.emit_until(self.steps - 1)  # the newest stays open for log_metrics()
        self._schedule_next_measurement(cost, step_seconds)
        self._measure_seconds = 0.0
        self._flush_seconds = time.perf_counter() - t_start

    def _schedule_next_measurement(self, cost: float, step_seconds: float) -> None:
        """Stretch the interval until measuring costs at most ``measure_budget`` of the time.

        ``cost`` is the time a measured step spends in measurement code (norms and the decision;
        waiting for the device is not counted); with an average step of ``step_seconds``, an
        interval of cost / (budget * step_seconds) steps keeps the share at the budget.
        """
        cfg = self.config
        self.measure_seconds += cost
        if cfg.measure_budget is not None and step_seconds > 0:
            self._measure_cost = cost if self._measure_cost is None else 0.8 * self._measure_cost + 0.2 * cost
            wanted = math.ceil(self._measure_cost / (cfg.measure_budget * step_seconds))
            self.measure_interval = max(min(wanted, cfg.max_measure_every), cfg.measure_every)
        self._next_measure = self.steps + self.measure_interval - 1

    def _nonfinite_step(self, loss_value: float) -> None:
        if self._norms is not None:
            self.estimator.rejected += 1  # this step's measurement is dropped with it
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._consecutive_nonfinite += 1
        if self.on_nonfinite == "raise" or self._consecutive_nonfinite >= 10:
            raise NonFiniteLossError(
                f"loss is {loss_value} at optimizer step {self.steps} ({self._consecutive_nonfinite} in a row); "
                "the step was not applied and the weights are unchanged. Lower the learning rate, check the "
                "data for NaN/inf, or use a GradScaler under fp16.")
        warnings.warn(f"adabatch: non-finite loss ({loss_value}) at step {self.steps}; step skipped, weights "
                      f"unchanged ({self.skipped_steps} skipped so far).", RuntimeWarning, stacklevel=3)
        self._reset_step_state()
        self._plan_step()

    def _count_amp_skip(self) -> None:
        try:
            found = sum(self.scaler._found_inf_per_device(self.optimizer).values())
        except (AttributeError, KeyError, TypeError):
            return
        self._amp_found = found if self._amp_found is None else self._amp_found + found

    def _elapsed(self) -> float:
        return self._seconds_offset + time.perf_counter() - self._t0

    def _read_energy(self) -> float | None:
        return None if self.energy_meter is None else float(self.energy_meter.read_joules())

    def _energy_since_start(self, now: float | None = None) -> float | None:
        now = self._read_energy() if now is None else now
        return None if now is None else self._energy_offset + now - self._energy0


def _largest_divisor(n: int, at_most: int) -> int:
    """Largest divisor of ``n`` that is <= ``at_most`` (1 at least)."""
    for d in range(min(n, max(at_most, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def _make_policy(config: ControllerConfig) -> BatchPolicy:
    if config.policy == "noise":
        return NoiseScalePolicy(config.target_factor)
    from adabatch.goodput import make_policy

    return make_policy(config)


def _world_size(group: Any) -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1
