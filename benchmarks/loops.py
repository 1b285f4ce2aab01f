"""The training loops being compared: a plain PyTorch loop for the baselines and the adabatch loop.

Every loop sees the same data in the same order for a given seed: epoch e walks
``torch.randperm(n)`` drawn from a generator seeded with ``order_seed(seed) + e``, front to back,
dropping the tail that does not fill a batch (the permutations adabatch's own batch sampler draws
when given ``order_seed(seed)``). Each run starts from the same weights (``torch.manual_seed(seed)``
before the model is built) and is evaluated on the same schedule: the first optimizer step at or
past every ``eval_every`` samples, and at the end of the budget.

Clocks. ``seconds`` and ``joules`` count training only: the evaluation pauses both (and, in the
adabatch loop, the controller's own clocks through ``ctl.paused()``), so a method that happens to
evaluate more often is not charged for it. Energy comes from :func:`adabatch.energy.detect_meter`;
each result says whether it was measured or estimated.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import torch

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.energy import detect_meter
from adabatch.workloads import LINREG_DIM, Data, Workload, evaluate, linreg_noise_scale, make_optimizer, make_scheduler
from benchmarks.baselines import BatchSchedule

TRAJECTORY_POINTS = 100  # per-step records kept per run (evenly thinned), to keep the JSON small


class Recorder:
    """Evaluation schedule, training-only clock and energy, and the run's result dict."""

    def __init__(self, wl: Workload, data: Data, method: str, seed: int, budget: int, eval_every: int) -> None:
        self.wl, self.data, self.budget, self.eval_every = wl, data, budget, eval_every
        self.meter = detect_meter()
        self.result: dict[str, Any] = {
            "method": method, "workload": wl.name, "seed": seed, "metric": wl.metric, "target": wl.target,
            "budget": budget, "energy_source": self.meter.source, "energy_measured": self.meter.measured,
            "evals": [], "trajectory": [], "diverged": False,
        }
        self.next_eval = eval_every
        self.done = False
        self._seconds = self._joules = 0.0
        self._t, self._j = time.perf_counter(), self.meter.read_joules()

    def due(self, samples: int) -> bool:
        return samples >= self.next_eval or samples >= self.budget

    def evaluate(self, model: torch.nn.Module, samples: int, steps: int, batch: int, loss: float,
                 **extra: float) -> float:
        """Pause the clocks, score the model, log one row; marks the run done at budget or divergence."""
        self._seconds += time.perf_counter() - self._t
        self._joules += self.meter.read_joules() - self._j
        value = evaluate(self.wl, model, self.data) if math.isfinite(loss) else math.nan
        self.result["evals"].append({"samples": samples, "steps": steps, "seconds": self._seconds,
                                     "joules": self._joules, self.wl.metric: value, "batch": batch,
                                     "loss": loss, **extra})
        while self.next_eval <= samples:
            self.next_eval += self.eval_every
        if not math.isfinite(loss):
            self.result["diverged"] = True
        self.done = samples >= self.budget or self.result["diverged"]
        self._t, self._j = time.perf_counter(), self.meter.read_joules()
        return value

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Final figures and first-hit-of-target figures, from the evaluation rows."""
        self.meter.close()
        r, wl = self.result, self.wl
        evals = r["evals"]
        last = evals[-1]
        hit = next((e for e in evals if math.isfinite(e[wl.metric]) and wl.reached(e[wl.metric])), None)
        r.update(final_metric=last[wl.metric], samples=last["samples"], steps=last["steps"],
                 seconds=last["seconds"], joules=last["joules"], reached_target=hit is not None,
                 seconds_to_target=hit and hit["seconds"], samples_to_target=hit and hit["samples"],
                 steps_to_target=hit and hit["steps"], joules_to_target=hit and hit["joules"], **extra)
        return r


ORDER_SEED_STRIDE = 1000  # seeds 0, 1, 2 get epoch permutations 0.., 1000.., 2000..: no epoch shared


def order_seed(seed: int) -> int:
    """Seed of the first epoch's permutation for a run seeded ``seed``.

    Example:
        >>> first = torch.randperm(5, generator=torch.Generator().manual_seed(2000))
        >>> order_seed(2), torch.equal(next(epochs(5, 2)), first)
        (2000, True)
    """
    return ORDER_SEED_STRIDE * seed


def epochs(n: int, seed: int) -> Iterator[torch.Tensor]:
    """One permutation of ``range(n)`` per epoch, the ones :class:`adabatch.sampler.AdaptiveBatchSampler` draws."""
    e = 0
    while True:
        yield torch.randperm(n, generator=torch.Generator().manual_seed(order_seed(seed) + e))
        e += 1


def train_baseline(wl: Workload, data: Data, seed: int, plan: BatchSchedule, eval_every: int,
                   method: str,
                   on_step: Callable[[int, float, torch.nn.Module, torch.optim.Optimizer], None] | None = None
                   ) -> dict[str, Any]:
    """Plain PyTorch training whose batch and LR follow ``plan``: fixed, heuristic, ramp or Seesaw.
    ``on_step(samples, loss, model, optimizer)``, if given, runs after every step.

    Example:
        >>> from adabatch.workloads import get_workload
        >>> from benchmarks.baselines import FixedBatch
        >>> wl = get_workload("linreg")
        >>> run = train_baseline(wl, wl.make_data(0), 0, FixedBatch(wl, 1_000, 64), 500, "fixed-64")
        >>> run["steps"], [e["samples"] for e in run["evals"]]   # evaluated at 500 and at the budget
        (16, [512, 1024])
    """
    torch.manual_seed(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr, wl.weight_decay)
    rec = Recorder(wl, data, method, seed, plan.budget, eval_every)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    samples = steps = 0
    for perm in epochs(n, seed):
        i, epoch_loss, epoch_steps = 0, 0.0, 0
        while not rec.done:
            batch, lr = plan.step(samples)
            if batch > n:
                raise ValueError(f"{method}: batch {batch} exceeds the {n} training samples")
            if i + batch > n:
                break
            idx = perm[i:i + batch]
            i += batch
            for g in opt.param_groups:
                g["lr"] = lr
            loss = wl.loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples, steps = samples + batch, steps + 1
            value = loss.item()
            epoch_loss, epoch_steps = epoch_loss + value, epoch_steps + 1
            if on_step is not None:
                on_step(samples, value, model, opt)
            if rec.due(samples):
                rec.evaluate(model, samples, steps, batch, loss.item(), lr=lr)
        if rec.done:
            break
        plan.end_epoch(epoch_loss / max(1, epoch_steps))
    return rec.finish(lr_rule=plan.rule, plan=plan.describe())


def train_adabatch(wl: Workload, data: Data, seed: int, config: ControllerConfig, budget: int, eval_every: int,
                   method: str) -> dict[str, Any]:
    """The same loop under :class:`AdaptiveBatchController`, its sampler choosing each micro-batch.

    The workload's LR schedule is sized for the base batch (budget / base batch steps); the
    controller advances it by samples / base batch, whatever batch it runs.
    """
    torch.manual_seed(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr, wl.weight_decay)
    base = config.base_batch or config.initial_batch or wl.micro_batch
    sched = make_scheduler(wl, opt, total_steps=budget // base)
    meter = detect_meter() if config.policy in ("energy", "zeus") else None
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=wl.micro_batch, config=config, scheduler=sched,
                                  energy_meter=meter)
    rec = Recorder(wl, data, method, seed, budget, eval_every)
    x, y = data.x_train, data.y_train
    for idx in micro_batches(ctl, len(x), seed):
        loss = wl.loss(model(x[idx]), y[idx])
        ctl.backward(loss)
        if not ctl.step():
            continue
        if rec.due(ctl.samples):
            # outside optimizer.step() the group's LR is the scheduler's, before the batch's factor
            extra = {"noise_scale": ctl.noise_scale, "scheduled_lr": opt.param_groups[0]["lr"]}
            if wl.name.startswith("linreg"):
                extra["true_noise_scale"] = linreg_true_noise_scale(model, seed)
            with ctl.paused():
                rec.evaluate(model, ctl.samples, ctl.steps, ctl.batch_size, loss.item(), **extra)
            if rec.done:
                break
    ctl.flush()
    history = ctl.history
    keep = history[:: max(1, len(history) // TRAJECTORY_POINTS)]
    rec.result["trajectory"] = [{"samples": r.samples, "step": r.step, "batch": r.batch, "b_simple": r.b_simple,
                                 "lr": r.lr} for r in keep]
    if meter is not None:
        meter.close()
    return rec.finish(stats={k: v for k, v in ctl.stats().items() if isinstance(v, (int, float, str))})


def micro_batches(ctl: AdaptiveBatchController, n: int, seed: int) -> Iterator[torch.Tensor]:
    """The micro-batches ``ctl.batch_sampler(n, seed=order_seed(seed))`` yields pass after pass, as index tensors.

    The same permutations, sizes and dropped tails as the controller's sampler (the test suite checks
    it), sliced from the permutation tensor as the baselines' loop slices it: the sampler's index lists
    would cost the adabatch loop a list-to-tensor conversion per micro-batch that the baselines do not
    pay (about 0.2 ms for 4096 indices, a third of a linreg step at that batch). Never ends.
    """
    ctl.batch_sampler(n, seed=order_seed(seed))  # the controller learns the pass: its size and largest micro-batch
    for order in epochs(n, seed):
        ctl.discard_issued()
        pos = 0
        while True:
            size = ctl.next_micro_batch_size()
            if n - pos < size:
                ctl.discard_issued(last=1)
                if pos == 0:
                    raise ValueError(f"the controller planned a micro-batch of {size} samples, more than the {n} "
                                     "training samples hold")
                break
            yield order[pos:pos + size]
            pos += size


def linreg_true_noise_scale(model: torch.nn.Linear, seed: int) -> float:
    """Exact B_simple of ``linreg`` at the model's current weights.

    :func:`adabatch.workloads.linreg_noise_scale` gives it for a bias-free model; the bias acts as
    one more input coordinate that is constantly 1, so we count it as dimension d + 1 with
    |delta|^2 including the bias error (exact up to a term 2 b^2 / |delta|^2, b the bias error,
    which stays near zero here because the true bias is 0).
    """
    g = torch.Generator().manual_seed(seed)  # linreg_data draws w* first from this generator
    w_star = torch.randn(LINREG_DIM, generator=g) / math.sqrt(LINREG_DIM)
    with torch.no_grad():
        delta_sq = float(((model.weight[0] - w_star) ** 2).sum() + model.bias[0] ** 2)
    return linreg_noise_scale(delta_sq, dim=LINREG_DIM + 1)
