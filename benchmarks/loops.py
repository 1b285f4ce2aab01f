"""The training loops being compared: plain PyTorch baselines and the adabatch loop that mirrors them.

Every loop sees the same data in the same order for a given seed (one ``torch.randperm`` per epoch
from a generator seeded with the seed, walked front to back), starts from the same weights
(``torch.manual_seed(seed)`` before the model is built) and is evaluated on the same schedule: the
first optimizer step at or past every ``eval_every`` samples, and at the end of the budget.

Clocks. ``seconds`` and ``joules`` count training only: the evaluation pauses both, so a method
that happens to evaluate more often is not charged for it. Energy comes from
:func:`adabatch.energy.detect_meter`; each result says whether it was measured or estimated.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.energy import detect_meter
from adabatch.lr import lr_factor, resolve_rule
from adabatch.workloads import LINREG_DIM, Data, Workload, evaluate, linreg_noise_scale, make_optimizer

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


def _epochs(n: int, gen: torch.Generator):
    while True:
        yield torch.randperm(n, generator=gen)


def _scaled_lr(wl: Workload, model: torch.nn.Module, batch: int) -> tuple[torch.optim.Optimizer, str]:
    """Optimizer with the workload's LR scaled from its base batch by the rule adabatch uses (linear/sqrt)."""
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr)
    rule = resolve_rule("auto", opt)
    for g in opt.param_groups:
        g["lr"] = wl.lr * lr_factor(rule, batch, wl.micro_batch)
    return opt, rule


def train_fixed(wl: Workload, data: Data, seed: int, batch: int, budget: int, eval_every: int,
                heuristic: dict[str, float] | None = None, method: str | None = None) -> dict[str, Any]:
    """A fixed batch (``heuristic=None``), or the hand-written loss-threshold heuristic.

    Heuristic: after each epoch, if the epoch's mean training loss fell below ``ratio`` times the
    loss of the epoch where the batch last changed (the first epoch to begin with), double the
    batch up to ``cap`` and rescale the LR by the same rule.
    """
    torch.manual_seed(seed)
    model = wl.make_model()
    opt, rule = _scaled_lr(wl, model, batch)
    rec = Recorder(wl, data, method or f"fixed-{batch}", seed, budget, eval_every)
    gen = torch.Generator().manual_seed(seed)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    samples = steps = 0
    reference_loss = None
    for perm in _epochs(n, gen):
        epoch_loss, epoch_batches = 0.0, 0
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = wl.loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples, steps = samples + batch, steps + 1
            epoch_loss, epoch_batches = epoch_loss + loss.item(), epoch_batches + 1
            if rec.due(samples):
                rec.evaluate(model, samples, steps, batch, loss.item())
                if rec.done:
                    break
        if rec.done:
            break
        if heuristic is not None:
            epoch_loss /= epoch_batches
            if reference_loss is None:
                reference_loss = epoch_loss
            elif epoch_loss < heuristic["ratio"] * reference_loss and batch < heuristic["cap"]:
                batch, reference_loss = min(2 * batch, int(heuristic["cap"])), epoch_loss
                for g in opt.param_groups:
                    g["lr"] = wl.lr * lr_factor(rule, batch, wl.micro_batch)
    return rec.finish(lr_rule=rule)


def train_adabatch(wl: Workload, data: Data, seed: int, config: ControllerConfig, budget: int, eval_every: int,
                   method: str) -> dict[str, Any]:
    """The same loop under :class:`AdaptiveBatchController`, its sampler choosing each micro-batch."""
    torch.manual_seed(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr)
    meter = detect_meter() if config.policy in ("energy", "zeus") else None
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=wl.micro_batch, config=config, energy_meter=meter)
    rec = Recorder(wl, data, method, seed, budget, eval_every)
    x, y = data.x_train, data.y_train
    sampler = ctl.batch_sampler(len(x), seed=seed)
    while not rec.done:
        for idx in sampler:
            idx = torch.tensor(idx)
            loss = wl.loss(model(x[idx]), y[idx])
            ctl.backward(loss)
            if not ctl.step():
                continue
            if rec.due(ctl.samples):
                extra = {"noise_scale": ctl.noise_scale}
                if wl.name == "linreg":
                    extra["true_noise_scale"] = linreg_true_noise_scale(model, seed)
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
