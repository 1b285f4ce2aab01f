"""AdaptiveBatchController: adapts the effective batch of an ordinary PyTorch loop while it trains.

The user keeps their model, loss, optimizer, scheduler and data, and hands backward and step to
the controller::

    controller = AdaptiveBatchController(model, optimizer, micro_batch_size=32, scheduler=scheduler)
    loader = DataLoader(dataset, batch_sampler=controller.batch_sampler(len(dataset)))
    for x, y in loader:
        controller.backward(loss_fn(model(x), y))   # scales the loss for accumulation
        controller.step()                           # steps optimizer and scheduler when the step is in

The controller only orchestrates; each idea lives in its own module, and data flows one way:

- :mod:`adabatch.plan`: what the step looks like (micro-batch sizes, measured or not), asked by
  the controller and by the loader's sampler alike;
- :mod:`adabatch.measure` / :mod:`adabatch.gradnorm`: on measured steps, per-example gradient norms
  (or the norms of the step's pieces taken alone) and the norm of the total, read back once;
- :mod:`adabatch.noise`: per-step unbiased |G|^2 and tr(Sigma), averaged over a window of samples,
  B_simple with a 95 % interval;
- :mod:`adabatch.policy` / :mod:`adabatch.goodput`: the target batch for a noise scale;
- :mod:`adabatch.decide`: grow, shrink or stay, tested on the interval; evidence from
  :mod:`adabatch.progress` reverts growths that measurably hurt progress;
- :mod:`adabatch.lr`: the LR factor for the batch, applied only inside ``optimizer.step()``, and
  the user's scheduler advanced by samples;
- :mod:`adabatch.clock`: training time and energy, paused during evaluation.

Loss scaling. A step planned as P samples per process backpropagates n_i / P times each
micro-batch's mean loss (n_i its samples), so the accumulated gradient is sum(samples) / P. When the
samples do not add up to P (a short last batch), the gradients are multiplied by P / N before the
step. Either way the optimizer sees exactly the mean gradient over the N samples of the step.

Determinism. With the default config nothing depends on wall-clock time: the same seeds give the
same batches, learning rates and noise estimates bit for bit, and a checkpoint resumes the same
trajectory. The goodput/energy/Zeus policies and ``measure_budget`` read clocks and are opt-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from adabatch.betas import BetaScaler
from adabatch.clock import TrainingClock
from adabatch.config import ConfigError, ControllerConfig
from adabatch.decide import Change, Decider, snap_down
from adabatch.gradnorm import ADAM_FAMILY, adam_denominators
from adabatch.lr import LRLimit, LRScaler, ScheduleFollower, lr_factor, resolve_rule
from adabatch.measure import (ExampleNorms, PieceNorms, Unsupported, compiled, example_denominators, example_layers,
                              mean_gradient_norms)
from adabatch.memory import MicroBatchMemory
from adabatch.noise import MIN_MEASUREMENTS, NoiseEstimate, NoiseScaleEstimator
from adabatch.plan import StepPlanner
from adabatch.policy import BatchPolicy, PolicyInput, make_policy, round_to_granularity
from adabatch.progress import ProgressTracker
from adabatch.sampler import AdaptiveBatchSampler
from adabatch.telemetry import StepRecord, Telemetry

log = logging.getLogger(__name__)

NONFINITE_MODES = ("skip", "raise", "ignore")
CHECKPOINT_FORMAT = "adabatch.controller"
CHECKPOINT_VERSION = 2
# Adam's second moments average only a handful of squared gradients during its first steps, so
# the preconditioner (and the preconditioned noise scale) swings wildly; measure after these.
PRECONDITIONER_WARMUP_STEPS = 10
# The measurement spacing stretches while the estimate's 95 % interval spans less than this factor,
# and shrinks again above the second.
TIGHT_INTERVAL, LOOSE_INTERVAL = 1.5, 2.5
# A measurement this many standard deviations from the window's means resets the spacing.
SURPRISE = 4.0


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite (with ``on_nonfinite="raise"``, or too many steps in a row)."""


class AdaptiveBatchController:
    """Grows and shrinks the effective batch from the gradient noise scale, rescaling the LR.

    Args:
        model: the module being trained (a ``DistributedDataParallel`` wrapper is recognised, and
            gradient sync is skipped on all but the last micro-batch of a step). A model sharded
            with FSDP2 (``fully_shard``) keeps FSDP's own sync, a reduce-scatter per micro-batch;
            the norms of its sharded gradients are summed over ranks (:mod:`adabatch.gradnorm`).
        optimizer: any ``torch.optim.Optimizer``; its learning rate is the one for ``base_batch``.
        micro_batch_size: samples per micro-batch on this process that a plain loader yields; every
            batch size is a multiple of it times the number of processes.
        config: the knobs (:class:`ControllerConfig`); the defaults suit most runs.
        scheduler: optional LR scheduler sized for the base batch; the controller advances it by
            samples / base batch (``ControllerConfig.schedule``). Schedulers stepped by the user
            (per epoch, on plateau) work too: the controller only scales the LR during the step.
        scaler: optional ``torch.amp.GradScaler``; the loss is scaled through it and norms unscaled.
        max_grad_norm: clip the total gradient norm to this value before each step.
        on_nonfinite: what a NaN/inf loss does: ``skip`` the step (counted, warned), ``raise``, or
            ``ignore`` (no check, no read-back per step; the evidence check is then off too).
        energy_meter: optional :class:`adabatch.energy.EnergyMeter`; ``energy_aware=True`` without
            one picks a meter automatically and sets the energy policy.
        policy: a :class:`~adabatch.policy.BatchPolicy` instance, instead of ``config.policy``.
        dataset_size: examples the loader draws from without replacement (one epoch), for the
            finite-population correction; :meth:`batch_sampler` sets it. None: an endless stream.
        keep_history: keep every :class:`StepRecord` in ``controller.history``.
        process_group: the DDP process group (default: the world).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ctl = AdaptiveBatchController(model, opt, micro_batch_size=8, config=ControllerConfig(initial_batch=16))
        >>> for _ in range(4):  # a plain loop: two micro-batches of 8 per step
        ...     x, y = torch.randn(8, 4), torch.randn(8, 1)
        ...     ctl.backward(torch.nn.functional.mse_loss(model(x), y))
        ...     _ = ctl.step()
        >>> ctl.steps, ctl.samples, ctl.batch_size
        (2, 32, 16)
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
        policy: BatchPolicy | None = None,
        dataset_size: int | None = None,
        keep_history: bool = True,
        process_group: Any = None,
    ) -> None:
        config = _validate_arguments(model, optimizer, micro_batch_size, config, scheduler, scaler, max_grad_norm,
                                     on_nonfinite, energy_meter, policy, dataset_size, keep_history)
        if energy_aware and config.policy == "noise" and policy is None:
            config = config.replace(policy="energy")
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.micro_batch_size = micro_batch_size
        self.dataset_size = dataset_size
        self.process_group = process_group
        self.world_size = _world_size(process_group)
        self.granularity = micro_batch_size * self.world_size
        self._ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

        self.min_batch, self.max_batch = self._bounds(config)
        start = config.initial_batch or config.base_batch or self.granularity
        self.batch_size = round_to_granularity(start, self.granularity, self.min_batch, self.max_batch)
        self.base_batch = config.base_batch or self.batch_size

        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._sharded = any(hasattr(p, "placements") for p in self._params)  # DTensors: FSDP2
        self._max_micro_units = max(1, (config.max_micro_batch or self.max_batch) // micro_batch_size)
        self._data_cap_units = self._max_micro_units  # lowered by batch_sampler() to one pass of the data
        self.memory = MicroBatchMemory.for_device(self._params[0].device, config.memory_fraction)
        self._track_memory = self.memory.budget_bytes is not None
        self.noise_kind = self._resolve_noise_kind(config.noise_kind)
        self.lr_rule = resolve_rule(config.lr_rule, optimizer)
        self.lr = LRScaler(self.lr_rule, self.base_batch, config.lr_warmup_samples)
        self.betas = BetaScaler(config.beta_rule, self.base_batch)
        self.betas.check(optimizer)
        self.schedule = None if scheduler is None else ScheduleFollower(scheduler, self.base_batch, config.schedule)
        self.estimator = NoiseScaleEstimator(config.window_fraction, config.min_window)
        self.policy: BatchPolicy = policy if policy is not None else make_policy(config)
        self.decider = Decider(config, self.granularity, self.min_batch, self.max_batch,
                               lambda: self._micro_cap() * self.granularity if self.planner.follows else self.granularity)
        self.progress = ProgressTracker(config.min_efficiency) if config.min_efficiency > 0 else None
        self.lr_limit = LRLimit(self.lr_rule, self.base_batch)
        self.decider.limit = lambda: self.max_batch if self.lr_limit.value is None else self.lr_limit.largest_batch(
            self._scheduled_lr(), self.granularity, self.min_batch, self.max_batch, self.estimator.b_simple)
        self.energy_meter = energy_meter
        if self.energy_meter is None and config.policy in ("energy", "zeus"):
            from adabatch.energy import detect_meter

            self.energy_meter = detect_meter()
            log.info("adabatch energy meter: %s", self.energy_meter.describe())
        self.clock = TrainingClock(self.energy_meter)
        self.telemetry = Telemetry(keep_history)

        self.steps = 0
        self.samples = 0
        self.skipped_steps = 0
        self.amp_skipped_steps = 0
        self._consecutive_nonfinite = 0
        self._stretch = 1  # multiplier of the measurement spacing, from the estimate's precision
        self._changes_seen = 0
        self.measure_interval = config.measure_every or self._spacing_steps()
        self._measure_anchor = 0  # measured steps: anchor, anchor + interval, ...
        self.measure_seconds = 0.0  # measurement work timed by the controller (measure_budget only)
        self._measure_cost: float | None = None
        self._unmeasured_samples = 0  # samples trained since the estimator last heard of them
        self._window = (0, 0, 0.0, self.clock.joules())  # steps, samples, seconds, joules at the last measurement
        self._measured_from: tuple[float, float | None] | None = None  # clocks when the measured step began
        self._warm_batch: int | None = None  # the batch whose first window (warm-up) was left out of the profile
        self._amp_found: Tensor | None = None
        self._factor_batch = -1  # step batch the cached LR factor was computed for (-1: stale)
        self._factor = 1.0
        # Per-example gradients (convolutions, Adam on sequences) cost about a forward pass of the
        # layer per measured step, against about nothing for pieces: formed only when asked for.
        self._per_example = config.measurement == "examples"
        hooks_blind = config.measurement != "pieces" and compiled(model)
        if hooks_blind:
            if config.measurement == "examples":
                raise ConfigError("ControllerConfig.measurement='examples' cannot read per-example norms from a compiled "
                                  "model (torch.compile): its layers' hooks do not run once per micro-batch. Use "
                                  "'auto' or 'pieces'.")
            log.info("adabatch: the model is compiled (torch.compile): measuring with pieces of the step.")
        self._layers = (example_layers(model, self._params, convolutions=self._per_example)
                        if config.measurement != "pieces" and not hooks_blind else None)
        if config.measurement == "examples" and self._layers is None:
            raise ConfigError("ControllerConfig.measurement='examples' needs every trainable parameter in a "
                              "torch.nn.Linear, Conv1d or Conv2d layer (one group, zero padding); this model has "
                              "others: use 'auto' or 'pieces'.")
        self.measurement = "examples" if self._layers is not None else "pieces"
        self.planner = StepPlanner(self.granularity, micro_batch_size, self._ddp, lambda: self.batch_size,
                                   self._micro_cap, lambda step: self.measurement == "pieces" and self._measure_at(step))
        optimizer.zero_grad(set_to_none=True)  # stale gradients would leak into the first step
        self._reset_step_state()
        self._begin_step()

    # ------------------------------------------------------------------ user API

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches that make up the step in progress."""
        return self.planner.current.k

    @property
    def micro_batch_planned(self) -> int:
        """Samples per process of the first micro-batch of the step in progress."""
        return self.planner.current.sizes[0]

    @property
    def noise(self) -> NoiseEstimate:
        """The noise-scale estimate in force: value, 95 % interval, whether |G|^2 is resolved."""
        return self.estimator.estimate()

    @property
    def noise_scale(self) -> float:
        """B_simple (preconditioned for Adam-family optimizers under ``noise_kind="auto"``).

        Finite once measured: while the batch is too small to resolve |G|^2 it is the interval's
        lower bound (see :attr:`noise`). nan before the first measurement.
        """
        return self.estimator.b_simple

    @property
    def noise_interval(self) -> tuple[float, float]:
        """95 % interval of :attr:`noise_scale` (the upper end is inf while unresolved)."""
        est = self.estimator.estimate()
        return est.low, est.high

    @property
    def decisions(self) -> list[Change]:
        """Every batch change so far, with the estimate it was based on."""
        return self.decider.changes

    @property
    def energy_joules(self) -> float | None:
        """Training joules so far, from the energy meter (None without one)."""
        return self.clock.joules()

    @property
    def history(self) -> list[StepRecord]:
        return self.telemetry.history

    def add_callback(self, fn: Callable[[StepRecord], None]) -> None:
        """Call ``fn(record)`` for every optimizer step (records arrive in groups, in order)."""
        self.telemetry.callbacks.append(fn)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep the block's time and energy out of training (evaluation, checkpointing, logging).

        Paused time counts neither in the throughput profile of the goodput and energy policies,
        nor in the measurement budget, nor in the ``seconds`` and ``energy_j`` of records.
        """
        norms = self._norms if isinstance(self._norms, ExampleNorms) else None
        if norms is not None:
            norms.suspended = True  # an evaluation's forward passes are not the step's examples
        try:
            with self.clock.paused():
                yield
        finally:
            if norms is not None:
                norms.suspended = False

    def batch_sampler(self, num_samples: int, **kwargs: Any) -> AdaptiveBatchSampler:
        """A ``batch_sampler`` for ``DataLoader`` whose micro-batch sizes follow this controller.

        With it the micro-batch grows with the batch (up to ``ControllerConfig.max_micro_batch``),
        measured steps are split without changing their samples, and the noise estimate gets the
        finite-population correction for ``num_samples``. Keyword arguments go to
        :class:`~adabatch.sampler.AdaptiveBatchSampler` (shuffle, seed, drop_last, rank).
        """
        sampler = AdaptiveBatchSampler(self, num_samples, **kwargs)
        if sampler.shuffle:
            self.dataset_size = num_samples
        # a micro-batch never holds more than one pass: larger batches accumulate across micro-batches
        self._data_cap_units = max(1, num_samples // self.world_size // self.micro_batch_size)
        self.planner._ahead.clear()
        return sampler

    def next_micro_batch_size(self, size: int | None = None) -> int:
        """Reserve the next micro-batch a loader will produce and return its size (per process).

        For loaders that cannot take a sampler (an ``IterableDataset`` stream): ask before building
        each micro-batch. The plan is followed ahead of the step in progress, so prefetching loaders
        get the sizes the coming steps will use. ``size`` overrides the planned size (a short batch).
        """
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(f"size={size!r} is invalid: a micro-batch holds an integer >= 1 samples.")
        if not self.planner.follows:
            self.planner.follows = True
            if self._micro == 0 and not self.planner.issued:
                self._reset_step_state()
                self._begin_step()  # plan the step again: it may now grow its micro-batch, or split
        return self.planner.next_size(size)

    def discard_issued(self, last: int | None = None) -> None:
        """Forget the ``last`` reserved sizes (all of them with None): those batches will not come."""
        self.planner.discard(last)

    def backward(self, loss: Tensor, batch_size: int | None = None) -> None:
        """Backpropagate one micro-batch's mean loss, scaled so the step averages over all samples.

        ``batch_size`` is the number of samples in this micro-batch when it differs from the
        planned size (a short last batch); with :meth:`batch_sampler` it is known already.
        """
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("controller.backward() takes the micro-batch's mean loss, a scalar tensor; got "
                            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}.")
        if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} is invalid: an integer >= 1 (samples in this micro-batch).")
        plan = self.planner.current
        i = self._micro
        reserved = self.planner.take()
        n = batch_size if batch_size is not None else reserved
        if n is None:
            n = plan.sizes[min(i, plan.k - 1)]
            if n != self.micro_batch_size:
                raise RuntimeError(
                    f"this step plans micro-batches of {n} samples, but the loader does not follow the controller: "
                    "build it with DataLoader(..., batch_sampler=controller.batch_sampler(len(dataset))), ask "
                    "controller.next_micro_batch_size() before each micro-batch, or pass batch_size=len(x).")
        self._micro += 1
        self._step_samples += n
        self._losses.append(loss)
        self._sizes.append(n)
        scale = n / self._planned
        scaled = loss * scale if scale != 1.0 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        norms = self._norms
        timed = self.config.measure_budget is not None and norms is not None
        if norms is not None:
            t = time.perf_counter() if timed else 0.0
            norms.before_backward(i)
            if timed:
                self._measure_work += time.perf_counter() - t
        self._in_backward = True
        scaled.backward()
        self._in_backward = False
        if self._ddp:  # DDP decides in the forward pass whether the backward syncs: set it for the next one
            self.model.require_backward_grad_sync = self._micro + 1 >= plan.k
        if norms is not None:
            t = time.perf_counter() if timed else 0.0
            norms.after_backward(i)
            if timed:
                self._measure_work += time.perf_counter() - t

    def step(self) -> bool:
        """Step the optimizer if the step's micro-batches are all in; return whether it stepped."""
        k = self.planner.current.k
        if self._micro == 0:
            raise RuntimeError(
                "controller.step() was called with no micro-batch since the last step: call "
                "controller.backward(loss) instead of loss.backward() (the controller scales the loss, "
                "accumulates and measures; gradients made by loss.backward() would be discarded).")
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
        if isinstance(self._norms, ExampleNorms):
            t = time.perf_counter()
            try:
                measurement = self._norms.finish(self._params, self._denominators)
            except Unsupported as exc:
                log.info("adabatch: per-example norms unavailable (%s); measuring with pieces of the step from now on.",
                         exc)
                self.measurement = "pieces"
                self.planner._ahead.clear()
            self._measure_work += time.perf_counter() - t
        elif self._norms is not None:
            t = time.perf_counter()
            measurement = self._norms.finish()
            self._measure_work += time.perf_counter() - t
        if measurement is not None and self.scaler is not None:  # update() rescales in place: keep this step's scale
            measurement = torch.cat([measurement, self.scaler._get_scale_async().reshape(1).float()])
        n = self._step_samples
        if n != self._planned:
            torch._foreach_mul_([p.grad for p in self._params if p.grad is not None], self._planned / n)

        step_batch = n * self.world_size
        if step_batch != self._factor_batch or self.lr.ramping:
            self._factor = self.lr.factor_for(self.samples, step_batch, self.estimator.b_simple)
            self._factor_batch = step_batch
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        groups = self.optimizer.param_groups
        saved = self.lr.apply(self.optimizer, self._factor) if self._factor != 1.0 else None
        saved_betas = self.betas.apply(self.optimizer, step_batch)
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
            self.betas.restore(self.optimizer, saved_betas)
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            gain = lr_factor("adascale", step_batch, self.base_batch, self.estimator.b_simple)
            self.schedule.advance(step_batch, gain)

        self.samples += step_batch
        self._unmeasured_samples += step_batch
        self.telemetry.add(step_batch, k, self._sizes[0], applied_lr, loss_value, self.clock.seconds())
        if self.progress is not None and isinstance(loss_value, float):
            self.progress.record(self.samples, loss_value, step_batch)
        self.steps += 1
        if self.progress is not None and self.progress.rising and self.decider.growth_in_use(self.batch_size):
            self._rescue()
        if self._track_memory:
            self.memory.observe(max(self._sizes) // self.micro_batch_size,
                                float(torch.cuda.max_memory_allocated(self._params[0].device)))
        if measurement is not None:
            self._flush(measurement, step_batch)
        self._reset_step_state()
        self._begin_step()
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
        failed = max(self._sizes or [self.planner.current.sizes[min(self._micro, self.planner.current.k - 1)]])
        if not self._in_backward:
            self.planner.take()  # the micro-batch whose forward failed never reached backward()
        self._in_backward = False
        if self._norms is not None:
            self._norms.abandon()
        self.optimizer.zero_grad(set_to_none=True)
        units = failed // self.micro_batch_size
        if units <= 1:
            raise RuntimeError(
                f"out of memory at the base micro-batch ({self.micro_batch_size} samples per process), which "
                "adabatch never goes below; lower micro_batch_size.")
        cap = self.memory.out_of_memory(units)
        log.warning("adabatch: out of memory with micro-batches of %d samples; the cap is now %d samples and "
                    "this step (%d samples accumulated) was dropped.", failed, cap * self.micro_batch_size,
                    self._step_samples)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._reset_step_state()
        self.planner._ahead.clear()
        self._begin_step()

    def log_metrics(self, **metrics: float) -> None:
        """Attach evaluation metrics (e.g. ``accuracy=0.91``) to the latest step's record."""
        if self.steps == 0:
            raise RuntimeError("log_metrics() needs at least one optimizer step first.")
        self.telemetry.log_metrics(self.steps - 1, {k: float(v) for k, v in metrics.items()})

    def flush(self) -> None:
        """Deliver every pending record to the history and callbacks (call once training ends)."""
        self.telemetry.emit_until(self.steps)

    def stats(self) -> dict[str, Any]:
        """Counters worth logging: steps, samples, the estimate, measurements, skipped steps."""
        est = self.estimator.estimate()
        return {
            "steps": self.steps, "samples": self.samples, "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_planned, "noise_scale": est.value,
            "noise_low": est.low, "noise_high": est.high, "noise_resolved": est.resolved,
            "measurements": self.estimator.measurements, "rejected_measurements": self.estimator.rejected,
            "measure_interval": self.measure_interval, "batch_changes": len(self.decider.changes),
            "measure_share": self.measure_seconds / max(self.clock.seconds(), 1e-9),
            "skipped_steps": self.skipped_steps, "amp_skipped_steps": self.amp_skipped_steps,
            "lr_rule": self.lr_rule, "beta_rule": self.config.beta_rule, "noise_kind": self.noise_kind,
            "measurement": self.measurement,
            "energy_source": getattr(self.energy_meter, "source", None),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume with the same batch, LR and noise-estimate trajectory."""
        if self._micro:
            raise RuntimeError("state_dict() must be taken between optimizer steps, not in the middle of "
                               f"one ({self._micro} of {self.planner.current.k} micro-batches accumulated).")
        self.flush()
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "micro_batch_size": self.micro_batch_size, "world_size": self.world_size,
            "batch_size": self.batch_size, "base_batch": self.base_batch,
            "steps": self.steps, "samples": self.samples, "dataset_size": self.dataset_size,
            "measure_interval": self.measure_interval, "measure_anchor": self._measure_anchor,
            "measure_stretch": self._stretch,
            "unmeasured_samples": self._unmeasured_samples,
            "skipped_steps": self.skipped_steps, "amp_skipped_steps": self.amp_skipped_steps,
            "clock": self.clock.state_dict(),
            "estimator": self.estimator.state_dict(),
            "decider": self.decider.state_dict(),
            "lr_limit": self.lr_limit.state_dict(),
            "progress": None if self.progress is None else self.progress.state_dict(),
            "lr": self.lr.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "policy": self.policy.state_dict(),
            "memory": self.memory.state_dict(),
            "planner": self.planner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, also on a different number of processes.

        The checkpoint's config must equal this controller's (the error names what differs). On a
        different number of processes (elastic training), the global batch, LR factor and
        estimator state carry over and the batch is re-rounded to the new granularity (logged).
        """
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError("load_state_dict() needs a dict made by AdaptiveBatchController.state_dict(); "
                              f"got {type(state).__name__} without format {CHECKPOINT_FORMAT!r}"
                              + (" (a checkpoint of adabatch 0.1, which this version cannot resume)"
                                 if isinstance(state, dict) and "hysteresis" in state else "") + ".")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"controller checkpoint version {state.get('version')!r} cannot be resumed by this "
                              f"version of adabatch, which reads version {CHECKPOINT_VERSION}.")
        try:
            saved = ControllerConfig.from_dict(state["config"])
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"the checkpoint's controller config is not valid here: {exc}") from None
        differ = saved.diff(self.config)
        if differ:
            listed = ", ".join(f"{k}: checkpoint {a!r}, this controller {b!r}" for k, (a, b) in sorted(differ.items()))
            raise ConfigError(f"the checkpoint was taken with another controller config ({listed}); build the "
                              "controller with ControllerConfig.from_dict(state['config']) to resume it.")
        self.base_batch = state["base_batch"]
        self.lr.base_batch = self.base_batch
        if self.schedule is not None:
            self.schedule.base_batch = self.base_batch
        batch = round_to_granularity(state["batch_size"], self.granularity, self.min_batch, self.max_batch)
        if state["micro_batch_size"] * state["world_size"] != self.granularity or batch != state["batch_size"]:
            log.warning("adabatch: checkpoint taken with %d process(es) x %d samples, resumed with %d x %d; the "
                        "global batch %d is re-rounded to %d (a multiple of %d).", state["world_size"],
                        state["micro_batch_size"], self.world_size, self.micro_batch_size, state["batch_size"], batch,
                        self.granularity)
        self.batch_size = batch
        self.steps, self.samples = state["steps"], state["samples"]
        self.dataset_size = state["dataset_size"] if self.dataset_size is None else self.dataset_size
        self.measure_interval, self._measure_anchor = state["measure_interval"], state["measure_anchor"]
        self._stretch = state["measure_stretch"]
        self._unmeasured_samples = state["unmeasured_samples"]
        self.skipped_steps, self.amp_skipped_steps = state["skipped_steps"], state["amp_skipped_steps"]
        self.clock.load_state_dict(state["clock"])
        self.estimator.load_state_dict(state["estimator"])
        self._changes_seen = self.estimator.changes  # regime changes already acted on (after the load, not before)
        self.decider.load_state_dict(state["decider"])
        if "lr_limit" in state:  # checkpoints of earlier versions had none
            self.lr_limit.load_state_dict(state["lr_limit"])
        if self.progress is not None and state["progress"] is not None:
            self.progress.load_state_dict(state["progress"])
        self.lr.load_state_dict(state["lr"])
        if self.schedule is not None and state["schedule"] is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.policy.load_state_dict(state["policy"])
        self.memory.load_state_dict(state["memory"])
        self._window = (self.steps, self.samples, self.clock.seconds(), self.clock.joules())
        est = self.estimator.estimate()
        self.telemetry.restart(self.steps, self.samples, (est.value, est.grad_sq, est.trace, est.low, est.high))
        self._factor_batch = -1
        self.planner.issued.clear()
        self.planner._ahead.clear()
        self._reset_step_state()
        self.planner.step = self.steps
        if state.get("planner") is not None and batch == state["batch_size"] \
                and state["micro_batch_size"] * state["world_size"] == self.granularity:
            self.planner.load_state_dict(state["planner"])  # same granularity: the plans already made stand
        self._begin_step()

    # ------------------------------------------------------------------ internals

    def _bounds(self, config: ControllerConfig) -> tuple[int, int]:
        g = self.granularity
        if config.max_batch < g:
            raise ConfigError(f"ControllerConfig.max_batch={config.max_batch} is smaller than one micro-batch "
                              f"on every process ({g}); raise max_batch or shrink the micro-batch.")
        lo = round_to_granularity(config.min_batch or g, g, 1, 1 << 62)
        hi = (config.max_batch // g) * g
        if lo > hi:
            raise ConfigError(f"ControllerConfig.min_batch={config.min_batch} rounds to {lo}, above "
                              f"max_batch={hi}; widen the bounds.")
        return lo, hi

    def _resolve_noise_kind(self, kind: str) -> str:
        has_second_moment = isinstance(self.optimizer, ADAM_FAMILY)
        if kind == "auto":
            return "preconditioned" if has_second_moment else "simple"
        if kind == "preconditioned" and not has_second_moment:
            raise ConfigError(f"ControllerConfig.noise_kind='preconditioned' needs an optimizer with Adam's "
                              f"second moments (Adam, AdamW, NAdam, RAdam), not {type(self.optimizer).__name__}; "
                              "use 'simple'.")
        return kind

    def _measure_at(self, step: int) -> bool:
        return step >= self._measure_anchor and (step - self._measure_anchor) % self.measure_interval == 0

    def _micro_cap(self) -> int:
        return self.memory.cap(min(self._max_micro_units, self._data_cap_units))

    def _reset_step_state(self) -> None:
        if getattr(self, "_norms", None) is not None:
            self._norms.abandon()  # hooks never outlive their step (a no-op once finished)
        self._micro = 0
        self._step_samples = 0
        self._losses: list[Tensor] = []
        self._sizes: list[int] = []
        self._norms: PieceNorms | ExampleNorms | None = None
        self._in_backward = False
        self._measure_work = getattr(self, "_decision_seconds", 0.0)
        self._decision_seconds = 0.0

    def _begin_step(self) -> None:
        """Plan the next step and, if it is measured, set up its norms."""
        plan = self.planner.start_step(self.steps)
        self._planned = plan.samples
        self._denominators = None
        if self._measure_at(self.steps) and (self.measurement == "examples" or plan.measured):
            den, ready = None, True
            if self.noise_kind == "preconditioned":
                # Adam's bias correction at the betas this step will use (adabatch.betas)
                saved_betas = self.betas.apply(self.optimizer, plan.samples * self.world_size)
                try:
                    den = adam_denominators(self.optimizer, self._params)
                finally:
                    self.betas.restore(self.optimizer, saved_betas)
                ready = den is not None and self.steps >= PRECONDITIONER_WARMUP_STEPS  # Adam's moments settle first
            if ready and self.measurement == "examples":
                self._denominators = den
                self._norms = ExampleNorms(self._layers, None if den is None else
                                           example_denominators(self._layers, self._params, den),
                                           per_example=self._per_example)
            elif ready:
                self._norms = PieceNorms(self._params, plan.groups, den)
            if self._norms is not None and self.config.policy != "noise":
                self._measured_from = (self.clock.seconds(), self.clock.joules())  # the profile prices it apart
        if self._ddp:
            self.model.require_backward_grad_sync = self.planner.current.k == 1
        if self._track_memory:
            torch.cuda.reset_peak_memory_stats(self._params[0].device)

    def _step_loss(self) -> Tensor | float:
        """Sample-weighted mean loss of the step (over all processes under DDP)."""
        losses, sizes = self._losses, self._sizes
        if self.world_size > 1 and self.on_nonfinite != "ignore":
            # every process must take the same skip decision and see the same loss: one small all-reduce
            local = torch.stack([l.detach().float().reshape(()) * n for l, n in zip(losses, sizes)]).sum()
            total = torch.stack([local, torch.tensor(float(self._step_samples), device=local.device)])
            torch.distributed.all_reduce(total, group=self.process_group)
            return total[0] / total[1]
        if len(losses) == 1:
            return losses[0] if self.on_nonfinite != "ignore" else losses[0].detach()
        if losses[0].device.type == "cpu":  # no device to sync with: plain floats are cheapest
            return math.fsum(l.item() * n for l, n in zip(losses, sizes)) / self._step_samples
        weights = torch.tensor(sizes, dtype=torch.float32).to(losses[0].device, non_blocking=True)
        return (torch.stack([l.detach().float().reshape(()) for l in losses]) * weights).sum() / self._step_samples

    def _flush(self, measurement: Tensor, step_batch: int) -> None:
        """The one read-back of a measured step: fold the measurement in, decide, emit records."""
        timing = self.config.measure_budget is not None
        profiled = self.config.policy != "noise"
        seconds = self.clock.seconds() if timing or profiled else 0.0
        w_steps, w_samples, w_seconds, w_joules = self._window
        step_seconds = (seconds - w_seconds) / max(self.steps - w_steps, 1)
        window = self._profile_window(seconds, w_seconds, w_joules) if profiled else []
        if self.world_size > 1:
            # every rank must take the same decision: average the measurement (and timings) over ranks
            extra = ([self._measure_work, step_seconds] if timing else []) + window
            if extra:
                measurement = torch.cat([measurement, torch.tensor(extra, dtype=measurement.dtype,
                                                                   device=measurement.device)])
            if self._sharded:
                # a shard's squared norm is 1/world of a sum over ranks: scaled so the average below is
                # that sum, counted once. A per-example mean is this rank's own, averaged like the rest.
                first = 1 if isinstance(self._norms, ExampleNorms) else 0
                norms_end = measurement.numel() - len(extra) - (self.scaler is not None)
                measurement[first:norms_end] *= self.world_size
            torch.distributed.all_reduce(measurement, group=self.process_group)
            measurement /= self.world_size
        values = measurement.tolist()  # [pieces..., total, (AMP scale), (work, step seconds), (profile window)]
        if self.world_size > 1 and window:
            window, values = values[-len(window):], values[:-len(window)]
        if timing:
            if self.world_size > 1:
                self._measure_work, step_seconds = values[-2:]
                values = values[:-2]
            t_start = time.perf_counter()
        loss_scale = 1.0
        if self.scaler is not None:
            loss_scale = values.pop() or 1.0
        piece_sizes, at = ([1] if isinstance(self._norms, ExampleNorms) else []), 0
        for g in self.planner.current.groups:
            piece_sizes.append(sum(self._sizes[at:at + g]))
            at += g
        pieces, total = mean_gradient_norms(values, piece_sizes, self._step_samples, self._planned, loss_scale)
        if self._sharded and not isinstance(self._norms, ExampleNorms):
            # FSDP reduce-scatters every micro-batch: a piece is the mean over its samples on all ranks
            piece_sizes = [b * self.world_size for b in piece_sizes]
        total_size = step_batch  # the sum is over every process's samples; pieces are per process
        self.estimator.advance(self._unmeasured_samples - step_batch)
        self._unmeasured_samples = 0
        if self._amp_found is not None:
            self.amp_skipped_steps += int(self._amp_found.item())
            self._amp_found = None
        if all(b < total_size for b in piece_sizes):
            self.estimator.update_pieces(pieces, piece_sizes, total, total_size, samples=step_batch,
                                         population=self.dataset_size)
        else:
            self.estimator.advance(step_batch)
        self._factor_batch = -1  # AdaScale's gain moves with the estimate

        if window and not any(math.isnan(v) for v in window[:2]):
            plain_s, measured_s, plain_j, measured_j = window
            self.policy.observe(self.batch_size, self.samples - w_samples - step_batch, max(plain_s, 1e-9),
                                None if math.isnan(plain_j) else plain_j)
            self.policy.observe(self.batch_size, step_batch, max(measured_s, 1e-9),
                                None if math.isnan(measured_j) else measured_j, measured=True)
        self._measured_from = None
        est = self.estimator.estimate()
        self.telemetry.measured(self.steps - 1, (est.value, est.grad_sq, est.trace, est.low, est.high),
                                self.clock.joules(), getattr(self.energy_meter, "source", None))
        self._decide(est)
        self.telemetry.emit_until(self.steps - 1)  # the newest stays open for log_metrics()
        self._schedule_next_measurement(self._measure_work, step_seconds)
        if timing:  # this decision's time joins the next measurement's work (all-reduced with it under DDP)
            self._decision_seconds = time.perf_counter() - t_start
        if profiled:
            # the next window starts now: deciding (a goodput proposal fits the profile) is no training step's cost
            self._window = (self.steps, self.samples, self.clock.seconds(), self.clock.joules())

    def _profile_window(self, seconds: float, w_seconds: float, w_joules: float | None) -> list[float]:
        """Seconds and joules of the window ending at this measured step, for the throughput profile:
        [ordinary steps' seconds, the measured step's seconds, their joules], nan where unknown (all
        nan for a batch's first window, its warm-up). Under DDP every rank averages them, so every
        rank's profile, and decision, is the same."""
        nan = [math.nan] * 4
        m_seconds, m_joules = self._measured_from or (math.nan, None)
        if self._warm_batch != self.batch_size:
            self._warm_batch = self.batch_size  # the first window at a new batch (or of the run, or after a resume) pays its warm-up
            return nan
        if not w_seconds <= m_seconds <= seconds:
            return nan
        joules = self.clock.joules()
        plain_j, measured_j = _spent(m_joules, w_joules), _spent(joules, m_joules)
        return [m_seconds - w_seconds, seconds - m_seconds,
                math.nan if plain_j is None else plain_j, math.nan if measured_j is None else measured_j]

    def _decide(self, est: NoiseEstimate) -> None:
        if self.progress is not None and self.progress.rising:
            return  # no move while the loss climbs fast: a rescue may just have undone a growth
        old = self.batch_size
        new = old
        if self.progress is not None and self.progress.pending:
            verdicts = self.progress.verdicts(self.samples)
            new = self.decider.judge(old, self.samples, self.steps, verdicts, est)
            if new != old:
                self.progress.forget()
        if new == old:
            inp = PolicyInput(step=self.steps, batch=old, base_batch=self.base_batch, noise_scale=est.value,
                              granularity=self.granularity, min_batch=self.min_batch, max_batch=self.max_batch)
            new = self.decider.decide(old, self.samples, self.steps, est,
                                      lambda phi: self.policy.propose(dataclasses.replace(inp, noise_scale=phi)))
            if new > old and self.progress is not None:
                self.progress.changed(self.samples, old, new, self.estimator.window())
        if new != old:
            self.lr.batch_changed(self.samples, old, new)
            self.batch_size = new
            log.info("adabatch: batch %d -> %d at %d samples (%s; B_simple %.4g [%.4g, %.4g])", old, new,
                     self.samples, self.decider.changes[-1].reason, est.value, est.low, est.high)

    def _scheduled_lr(self) -> float:
        """The first group's LR as the scheduler set it (outside optimizer.step(), without the batch's factor)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _rescue(self) -> None:
        """The loss is climbing fast on a batch that just grew: go back to the batch before it now."""
        old, est = self.batch_size, self.estimator.estimate()
        grown = self.decider.growth_in_use(old)
        self.lr_limit.failed(self._scheduled_lr(), grown.old, old, self.estimator.b_simple)
        new = self.decider.rescue(old, self.samples, self.steps, est)
        self.progress.forget()
        self.lr.batch_changed(self.samples, old, new)
        self.batch_size = new
        log.warning("adabatch: the loss rose fast after the batch grew to %d: back to %d at %d samples; the learning "
                    "rate stays below %.4g from now on (batch at most %d at the current schedule)", old, new,
                    self.samples, self.lr_limit.value, self.decider.cap(self.samples))

    def _spacing_steps(self) -> int:
        """Steps between measurements: a ``measurements_per_window``-th of the window, times the stretch."""
        cfg = self.config
        base = self.estimator.base_window()
        # never so sparse that the window must stretch to hold MIN_MEASUREMENTS: that would make
        # the estimate lag a noise scale that moves
        spacing = min(base / cfg.measurements_per_window * self._stretch, base / MIN_MEASUREMENTS)
        return int(min(max(spacing // self.batch_size, 1), cfg.max_measure_every))

    def _schedule_next_measurement(self, cost: float, step_seconds: float) -> None:
        """Set the next measured step: the spacing from the window, or the fixed ``measure_every``.

        The spacing doubles (up to ``max_measure_every`` steps) while the estimate is tight (its
        95 % interval within a factor TIGHT_INTERVAL) and halves while it is loose or unresolved:
        measurements are spent where the estimate needs them, and a large batch, whose
        measurements are precise, is measured rarely. Opt-in (``measure_budget``): stretch the
        interval until measuring fits the time budget.
        """
        cfg = self.config
        est = self.estimator.estimate()
        if self.estimator.changes != self._changes_seen or self.estimator.surprise > SURPRISE:
            self._changes_seen = self.estimator.changes  # a new regime, or a sign of one: measure densely again
            self._stretch = 1
        elif est.resolved and est.high <= TIGHT_INTERVAL * est.low:
            self._stretch = min(self._stretch * 2, cfg.max_measure_every)
        elif not est.resolved or est.high > LOOSE_INTERVAL * est.low:
            self._stretch = max(self._stretch // 2, 1)
        interval = cfg.measure_every or self._spacing_steps()
        if cfg.measure_budget is not None:
            self.measure_seconds += cost
            if step_seconds > 0:
                self._measure_cost = cost if self._measure_cost is None else 0.8 * self._measure_cost + 0.2 * cost
                wanted = math.ceil(self._measure_cost / (cfg.measure_budget * step_seconds))
                interval = max(min(wanted, cfg.max_measure_every), interval)
        self.measure_interval = interval
        self._measure_anchor = self.steps - 1 + interval  # the step just taken (index steps - 1) was measured

    def _nonfinite_step(self, loss_value: float) -> None:
        if self._norms is not None:
            self._norms.abandon()
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
        self._begin_step()

    def _count_amp_skip(self) -> None:
        try:
            found = sum(self.scaler._found_inf_per_device(self.optimizer).values())
        except (AttributeError, KeyError, TypeError):
            return
        self._amp_found = found if self._amp_found is None else self._amp_found + found


def _spent(end: float | None, start: float | None) -> float | None:
    """Joules between two meter readings; None without a meter."""
    return None if end is None or start is None else end - start


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_arguments(model: Any, optimizer: Any, micro_batch_size: Any, config: Any, scheduler: Any,
                        scaler: Any, max_grad_norm: Any, on_nonfinite: Any, energy_meter: Any, policy: Any,
                        dataset_size: Any, keep_history: Any) -> ControllerConfig:
    """One clear ConfigError for any argument the controller cannot work with."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model={type(model).__name__} is invalid: pass the torch.nn.Module being trained "
                          "(or its DistributedDataParallel wrapper).")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer={type(optimizer).__name__} is invalid: pass a torch.optim.Optimizer "
                          "built on the model's parameters.")
    if not _is_int(micro_batch_size) or micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size={micro_batch_size!r} is invalid: accepted an integer >= 1.")
    if config is None:
        config = ControllerConfig()
    elif isinstance(config, dict):
        raise ConfigError("config must be a ControllerConfig, not a dict: pass ControllerConfig(**values) or "
                          "ControllerConfig.from_dict(values).")
    elif not isinstance(config, ControllerConfig):
        raise ConfigError(f"config={type(config).__name__} is invalid: pass a ControllerConfig (or None).")
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        raise ConfigError("the optimizer holds no parameter that requires grad.")
    model_params = {id(p) for p in model.parameters()}
    if not model_params:
        raise ConfigError(f"model {type(model).__name__} has no parameters to train.")
    if not any(id(p) in model_params for p in params):
        raise ConfigError("none of the optimizer's parameters belong to the model: build the optimizer on "
                          "model.parameters().")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise ConfigError(f"scheduler={type(scheduler).__name__} has no step(): pass a torch.optim.lr_scheduler "
                          "object, or None.")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError("scheduler=ReduceLROnPlateau steps on a metric: call scheduler.step(metric) yourself "
                          "and do not pass it to the controller (its LR factor composes with it).")
    if scaler is not None and not all(callable(getattr(scaler, m, None)) for m in ("scale", "step", "update")):
        raise ConfigError(f"scaler={type(scaler).__name__} is invalid: pass a torch.amp.GradScaler, or None.")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
                                          and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"max_grad_norm={max_grad_norm!r} is invalid: accepted None or a number > 0.")
    if on_nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"on_nonfinite={on_nonfinite!r} is invalid: accepted {', '.join(NONFINITE_MODES)}.")
    if energy_meter is not None and not callable(getattr(energy_meter, "read_joules", None)):
        raise ConfigError(f"energy_meter={type(energy_meter).__name__} has no read_joules(): pass an "
                          "adabatch.energy meter, or None.")
    if policy is not None and not isinstance(policy, BatchPolicy):
        raise ConfigError(f"policy={type(policy).__name__} is invalid: pass an adabatch.policy.BatchPolicy "
                          "instance, or set ControllerConfig.policy.")
    if dataset_size is not None and (not _is_int(dataset_size) or dataset_size < 1):
        raise ConfigError(f"dataset_size={dataset_size!r} is invalid: accepted None or an integer >= 1.")
    if not isinstance(keep_history, bool):
        raise ConfigError(f"keep_history={keep_history!r} is invalid: accepted True or False.")
    return config


def _world_size(group: Any) -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1
