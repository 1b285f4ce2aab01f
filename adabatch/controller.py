"""AdaptiveBatchController: adapts the effective batch of an ordinary PyTorch loop while it trains.

The user keeps their model, loss, optimizer, scheduler and DataLoader (which yields micro-batches of
``micro_batch_size``) and hands backward and step to the controller::

    controller = AdaptiveBatchController(model, optimizer, micro_batch_size=32)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        controller.backward(loss)   # scales the loss for accumulation, captures norms when measuring
        controller.step()           # steps optimizer and scheduler once enough micro-batches are in

Data flows one way: gradients -> :mod:`adabatch.capture` (norms) -> :mod:`adabatch.noise`
(estimate) -> :mod:`adabatch.policy` (target and hysteresis) -> :mod:`adabatch.lr` (factor) ->
optimizer step.

Loss scaling. A step of k micro-batches of n_i samples each backpropagates n_i / (k b) times each
micro-batch's mean loss (b the nominal micro-batch size), so the accumulated gradient is
sum(samples) / (k b). When the samples do not add up to k b (a short last batch), the gradients are
multiplied by k b / N before the step. Either way the optimizer sees exactly the mean gradient over
the N samples of the step, as one big batch of N would give it.

Measurement. Every ``measure_every``-th optimizer step arms the norm hooks; a measured step always
has at least two micro-batches (a step planned with one takes two), because the two-batch-size
estimator needs b < B. No other step registers a hook; the only value read back per step is the
step's mean loss for the NaN/inf check (``on_nonfinite="ignore"`` drops that read as well).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from adabatch.capture import GradNormCapture, accumulated_norms, adam_preconditioner
from adabatch.config import ConfigError, ControllerConfig
from adabatch.lr import LRScaler, resolve_rule
from adabatch.noise import NoiseScaleEstimator
from adabatch.policy import BatchPolicy, Hysteresis, NoiseScalePolicy, PolicyInput, round_to_granularity
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
        micro_batch_size: samples per micro-batch on this process (what the DataLoader yields).
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
        self.noise_kind = self._resolve_noise_kind(config.noise_kind)
        self.lr_rule = resolve_rule(config.lr_rule, optimizer)
        self.lr = LRScaler(self.lr_rule, self.base_batch, config.lr_warmup_steps)
        self.estimator = NoiseScaleEstimator(config.ema_decay)
        self.capture = GradNormCapture(params)
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
        self._pending: list[StepRecord] = []
        self._seconds_offset = 0.0
        self._energy_offset = 0.0
        self._t0 = time.perf_counter()
        self._energy0 = self._read_energy()
        self._window = (0, 0.0, self._energy0)  # samples, seconds, joules at the last flush
        self._amp_found: Tensor | None = None
        self._in_force = (math.nan, math.nan, math.nan)  # estimates stamped on each step's record
        optimizer.zero_grad(set_to_none=True)  # stale gradients would leak into the first step
        self._reset_step_state()
        self._plan_step()

    # ------------------------------------------------------------------ user API

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches that make up the step in progress."""
        return self._k

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

    def backward(self, loss: Tensor, batch_size: int | None = None) -> None:
        """Backpropagate one micro-batch's mean loss, scaled so the step averages over all samples.

        ``batch_size`` is the number of samples in this micro-batch, when it differs from
        ``micro_batch_size`` (a short last batch).
        """
        n = self.micro_batch_size if batch_size is None else int(batch_size)
        if n != self.micro_batch_size:
            self._uneven = True
        self._step_samples += n
        self._micro += 1
        self._losses.append(loss.detach())
        self._sizes.append(n)
        scale = n / (self.micro_batch_size * self._k)
        scaled = loss * scale if scale != 1.0 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        if self.capture.armed:
            self.capture.end_micro_batch()
        if self._micro + 1 == self._k:
            self._set_grad_sync(True)

    def step(self) -> bool:
        """Step the optimizer if the step's micro-batches are all in; return whether it stepped."""
        if self._micro < self._k:
            return False
        if self._micro > self._k:
            raise RuntimeError(f"{self._micro} micro-batches were accumulated for a step of {self._k}; call "
                               "controller.step() after every controller.backward().")
        loss_value: Any = self._step_loss()
        if self.on_nonfinite != "ignore":
            loss_value = float(loss_value)
            if not math.isfinite(loss_value):
                self._nonfinite_step(loss_value)
                return False
            self._consecutive_nonfinite = 0

        measurement = self._measure() if self.capture.armed else None
        self.capture.disarm()
        if self._uneven and self._step_samples != self._k * self.micro_batch_size:
            torch._foreach_mul_([p.grad for p in self._params if p.grad is not None],
                                self._k * self.micro_batch_size / self._step_samples)

        step_batch = self._step_samples * self.world_size
        factor = self.lr.factor_for(self.steps, step_batch, self.estimator.b_simple)
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        saved = self.lr.apply(self.optimizer, factor)
        try:
            applied_lr = self.optimizer.param_groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self._count_amp_skip()
                self.scaler.update()
            else:
                self.optimizer.step()
        finally:
            self.lr.restore(self.optimizer, saved)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

        self.samples += step_batch
        self._pending.append(StepRecord(
            step=self.steps, samples=self.samples, batch=step_batch, micro_batches=self._k,
            micro_batch_size=self.micro_batch_size, b_simple=self._in_force[0], grad_sq=self._in_force[1],
            trace_sigma=self._in_force[2], lr=float(applied_lr), loss=loss_value, measured=measurement is not None,
            seconds=self._elapsed(),
        ))
        self.steps += 1
        if measurement is not None:
            self._flush(measurement)
        self._reset_step_state()
        self._plan_step()
        return True

    def log_metrics(self, **metrics: float) -> None:
        """Attach evaluation metrics (e.g. ``accuracy=0.91``) to the latest step's record."""
        target = self._pending[-1] if self._pending else (self.history[-1] if self.history else None)
        if target is None:
            raise RuntimeError("log_metrics() needs at least one optimizer step first.")
        target.metrics.update({k: float(v) for k, v in metrics.items()})

    def flush(self) -> None:
        """Deliver every pending record to the history and callbacks (call once training ends)."""
        self._emit(len(self._pending))

    def stats(self) -> dict[str, Any]:
        """Counters worth logging: steps, samples, rejected measurements, skipped steps."""
        return {
            "steps": self.steps, "samples": self.samples, "batch_size": self.batch_size,
            "noise_scale": self.noise_scale, "measurements": self.estimator.measurements,
            "rejected_measurements": self.estimator.rejected, "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps, "lr_rule": self.lr_rule, "noise_kind": self.noise_kind,
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
            "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "seconds": self._elapsed(),
            "energy_j": self._energy_since_start(),
            "estimator": self.estimator.state_dict(),
            "hysteresis": self.hysteresis.state_dict(),
            "lr": self.lr.state_dict(),
            "policy": self.policy.state_dict(),
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
        self.skipped_steps, self.amp_skipped_steps = state["skipped_steps"], state["amp_skipped_steps"]
        self._t0 = time.perf_counter()
        self._seconds_offset = state["seconds"]
        self._energy0 = self._read_energy()
        self._energy_offset = state["energy_j"] or 0.0
        self._window = (self.samples, self._elapsed(), self._read_energy())
        self.estimator.load_state_dict(state["estimator"])
        self._in_force = (self.estimator.b_simple, self.estimator.grad_sq, self.estimator.trace_sigma)
        self.hysteresis.load_state_dict(state["hysteresis"])
        self.lr.load_state_dict(state["lr"])
        self.policy.load_state_dict(state["policy"])
        self._pending.clear()
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
        self._uneven = False
        self._losses: list[Tensor] = []
        self._sizes: list[int] = []

    def _step_loss(self) -> Tensor | float:
        """Sample-weighted mean loss of the step: a float on CPU, else one device op at most."""
        losses = self._losses
        if len(losses) == 1:
            return losses[0]
        if losses[0].device.type == "cpu":  # no device to sync with: plain floats are cheapest
            return math.fsum(l.item() * n for l, n in zip(losses, self._sizes)) / self._step_samples
        if not self._uneven:
            return torch.stack(losses).mean()
        return sum(l * n for l, n in zip(losses, self._sizes)) / self._step_samples

    def _plan_step(self) -> None:
        """Fix the next step's micro-batch count and whether it is measured; arm hooks if so."""
        k = self.batch_size // self.granularity
        measure = self.steps % self.config.measure_every == 0
        precond = self._precond = None
        if measure and self.noise_kind == "preconditioned":
            precond = adam_preconditioner(self.optimizer, self.capture.params)
            measure = precond is not None  # no second moments before the first Adam step
        if measure:
            k = max(k, 2)
            self._precond = precond
            self.capture.arm(precond)
        self._k = k
        self._set_grad_sync(k == 1)

    def _measure(self) -> Tensor | None:
        """Squares of every norm of this step in one device tensor (see :meth:`_flush`); None if unusable."""
        cap = self.capture
        if self._uneven or cap.count != self._k:
            return None  # unequal micro-batches break the two-size estimator; skip this one
        small, big = cap.norms(), accumulated_norms(cap.params, self._precond)
        self._layout = (sum(n.numel() for n in small), sum(n.numel() for n in big))
        parts = [n.reshape(-1) for n in small + big]
        if self.scaler is not None:  # update() rescales in place after the step: keep this step's value
            parts.append(self.scaler._get_scale_async().reshape(-1).float())
        return torch.cat(parts).square()

    def _flush(self, measurement: Tensor) -> None:
        """The one host sync of a measured step: fold the measurement in, decide, emit records."""
        n_small, n_big = self._layout
        if self.world_size > 1:
            measurement = measurement.clone()
            torch.distributed.all_reduce(measurement, group=self.process_group)
            measurement /= self.world_size  # small: mean over ranks; big and scale: identical on every rank
        values = measurement.tolist()
        # hooks saw (1/k) * scale * g_i; the accumulated gradient is scale * G_B
        small_sq = math.fsum(values[:n_small]) * self._k * self._k / self.capture.count
        big_sq = math.fsum(values[n_small:n_small + n_big])
        if len(values) > n_small + n_big:
            scale_sq = values[-1]
            small_sq, big_sq = small_sq / scale_sq, big_sq / scale_sq
        b = float(self.micro_batch_size)
        big_b = float(self._k * self.micro_batch_size * self.world_size)
        self.estimator.update(small_sq, big_sq, b, big_b)
        if self._amp_found is not None:
            self.amp_skipped_steps += int(self._amp_found.item())
            self._amp_found = None

        seconds, joules = self._elapsed(), self._read_energy()
        w_samples, w_seconds, w_joules = self._window
        self.policy.observe(self.batch_size, self.samples - w_samples, seconds - w_seconds,
                            None if joules is None or w_joules is None else joules - w_joules)
        self._window = (self.samples, seconds, joules)

        rec = self._pending[-1]
        self._in_force = (self.estimator.b_simple, self.estimator.grad_sq, self.estimator.trace_sigma)
        rec.b_simple, rec.grad_sq, rec.trace_sigma = self._in_force
        rec.energy_j = self._energy_since_start(joules)
        rec.energy_source = getattr(self.energy_meter, "source", None)

        if self.estimator.measurements >= self.config.warmup_measurements:
            inp = PolicyInput(step=self.steps, batch=self.batch_size, base_batch=self.base_batch,
                              noise_scale=self.estimator.b_simple, granularity=self.granularity,
                              min_batch=self.min_batch, max_batch=self.max_batch)
            def bounds() -> tuple[float, float]:
                # targets rise with the noise scale, so its bounds map to the target's bounds
                low, high = self.estimator.b_simple_bounds(self.config.confidence_z)
                return (self.policy.propose(dataclasses.replace(inp, noise_scale=low)),
                        self.policy.propose(dataclasses.replace(inp, noise_scale=high)))

            new = self.hysteresis.decide(inp, self.policy.propose(inp), bounds)
            if new != self.batch_size:
                self.lr.batch_changed(self.steps, self.batch_size, new)
                self.batch_size = new
        self._emit(len(self._pending) - 1)  # the newest stays open for log_metrics()

    def _emit(self, n: int) -> None:
        if n <= 0:
            return
        out, self._pending = self._pending[:n], self._pending[n:]
        for rec in out:
            if isinstance(rec.loss, Tensor):
                rec.loss = float(rec.loss)
        self.telemetry.emit(out)

    def _nonfinite_step(self, loss_value: float) -> None:
        if self.capture.armed:
            self.estimator.rejected += 1  # this step's measurement is dropped with it
        self.capture.disarm()
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

    def _set_grad_sync(self, enabled: bool) -> None:
        # DDP reads this flag in forward(); no_sync() sets the same attribute.
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = enabled

    def _elapsed(self) -> float:
        return self._seconds_offset + time.perf_counter() - self._t0

    def _read_energy(self) -> float | None:
        return None if self.energy_meter is None else float(self.energy_meter.read_joules())

    def _energy_since_start(self, now: float | None = None) -> float | None:
        now = self._read_energy() if now is None else now
        return None if now is None else self._energy_offset + now - self._energy0


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
