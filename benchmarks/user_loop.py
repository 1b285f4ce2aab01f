"""A training loop written the way users write one, with adabatch beside fixed batches, in one run.

    python -m benchmarks.user_loop --readme README.md        # 3 seeds, 2 processes, about 3 min
    python -m benchmarks.user_loop --task clean --readme README.md   # the clean task, about 1 min
    python -m benchmarks.user_loop --seeds 0 --budget 120000 --out /tmp/user-loop   # a quick look

The suite's loops (:mod:`benchmarks.loops`) slice a tensor dataset through the controller's sampler.
This one combines what real loops do and the suite does not, and what the controller has to cope
with at its defaults:

- a stream: an ``IterableDataset`` behind a ``DataLoader`` (``batch_size=None``) that asks
  ``controller.next_micro_batch_size()`` before building each micro-batch, so the micro-batch
  follows the batch (the fixed loops draw their batch from the same stream);
- AdamW with two parameter groups (weight decay on matrices only);
- torch's ``OneCycleLR``, sized for the base batch of 32 and advanced by the controller in
  samples; each fixed batch B runs its own ``OneCycleLR`` over budget / B steps with its peak LR
  scaled by sqrt(B / 32) (the rule adabatch uses for Adam);
- bf16 autocast, and gradient clipping at norm 1 (``max_grad_norm`` for the controller,
  ``clip_grad_norm_`` before each step in the fixed loops);
- a LayerNorm in the model, so the controller measures the noise with pieces of the step rather
  than per-example norms.

Two tasks run the same loop, one that rewards growing fast and one that rewards staying small:

- ``noisy`` (the default): x ~ N(0, I_64), labelled with the argmax of a fixed random two-layer
  teacher's logits plus Gaussian noise; the score is accuracy on 20,000 held-out samples labelled
  without noise. The label noise keeps the gradient noise scale in the thousands, so every fixed
  batch from 32 to 1024 reaches the target after about the same number of samples and the larger
  ones get there several times sooner.
- ``clean``: the same inputs, and as targets the teacher's first two logits (scaled to about unit
  variance), without noise; the score is the validation MSE. A larger batch costs samples (although
  the gradient noise scale reads in the thousands): with the sample budget fixed, fixed-32 ends best
  and only 32 to 128 reach the target, fixed-128 first. Results go to ``results/user_loop_clean/``.

Beside fixed batches and the controller, two peers run in the same loop (:mod:`benchmarks.baselines`):
``ramp``, a linear batch warm-up from 32 to 1024 over the first quarter of the budget (as in
Megatron-LM and OLMo), and ``seesaw`` (Seesaw 2025: where the schedule would halve the LR, double
the batch and cut the LR by sqrt(2)). Both draw each batch from the stream and advance OneCycle by
samples.

Figures are medians over seeds, paired by seed, with 95 % bootstrap intervals
(:func:`benchmarks.report.summarize`, the suite's goals). Wall time counts training only:
evaluation runs inside ``controller.paused()`` and off the fixed loops' clocks.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import functools
import json
import math
import multiprocessing
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch import workloads
from adabatch.betas import BetaScaler
from adabatch.workloads import Data, Workload
from benchmarks.baselines import BatchSchedule, LinearRamp, Seesaw
from benchmarks.loops import Recorder
from benchmarks.report import fmt_est, plots, summarize, update_readme
from benchmarks.run import RAMP_SHARE  # the suite's ramp: the largest batch after a quarter of the budget

RESULTS = Path(__file__).resolve().parent / "results"
DIM, CLASSES, HIDDEN = 64, 10, 256
BASE = 32  # the base batch: the micro-batch of a plain loop, and the batch OneCycleLR is sized for
WEIGHT_DECAY = 0.05
CLIP = 1.0
LABEL_NOISE = 1.5  # standard deviation of the Gaussian noise on the teacher's logits
FIXED = (32, 64, 128, 256, 512, 1024)
MAX_BATCH = 4096  # the largest batch Seesaw may reach (adabatch's default max_batch)
METHODS = [f"fixed-{b}" for b in FIXED] + ["ramp", "seesaw", "adabatch", "adabatch-goodput"]
CONFIGS = {"adabatch": ControllerConfig(), "adabatch-goodput": ControllerConfig(policy="goodput")}


@functools.cache
def _teacher() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # one teacher for every seed, drawn once per process
    return torch.randn(DIM, 128, generator=g) / 8, torch.randn(128, CLASSES, generator=g) * 0.75


def teacher_logits(x: torch.Tensor) -> torch.Tensor:
    w1, w2 = _teacher()
    return torch.tanh(x @ w1) @ w2


def teacher_value(x: torch.Tensor) -> torch.Tensor:
    """The clean task's target: the teacher's first two logits, scaled to about unit variance."""
    return teacher_logits(x)[:, :2] / 4


def noisy_labels(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (teacher_logits(x) + LABEL_NOISE * torch.randn(len(x), CLASSES, generator=g)).argmax(1)


def clean_values(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return teacher_value(x)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.float(), y)


@dataclass(frozen=True)
class Task:
    """One task of the loop: the stream's labels, the model's head, the score, and where results go."""

    key: str  # --task
    name: str
    labels: Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (x, generator) -> targets
    outputs: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: str  # accuracy or val_loss
    target: float
    lr: float  # AdamW's peak LR at the base batch
    budget: int
    eval_every: int
    out: Path
    readme_key: str  # README markers: <!-- {key}:start --> ... <!-- {key}:end -->

    @property
    def score(self) -> str:
        return f"accuracy >= {self.target}" if self.metric == "accuracy" else f"validation MSE <= {self.target}"

    @property
    def final(self) -> str:
        return "final accuracy" if self.metric == "accuracy" else "final validation MSE"

    @property
    def workload(self) -> Workload:
        return Workload(self.name, self.make_data, self.make_model, self.loss, self.metric, target=self.target,
                        optimizer="adamw", lr=self.lr, micro_batch=BASE, sample_budget=self.budget,
                        schedule="onecycle", warmup=0.3, weight_decay=WEIGHT_DECAY)

    def make_data(self, seed: int) -> Data:
        """Held-out samples with clean targets (the same for every seed); the stream needs no training set."""
        x = torch.randn(20_000, DIM, generator=torch.Generator().manual_seed(99))
        y = teacher_logits(x).argmax(1) if self.metric == "accuracy" else teacher_value(x)
        return Data(torch.empty(0, DIM), y[:0], x, y)

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, HIDDEN),
                             nn.GELU(), nn.Linear(HIDDEN, self.outputs))


TASKS = {
    # label noise keeps the noise scale in the thousands: every fixed batch 32..1024 reaches the
    # target after 440,000-500,000 samples (seed 0), so larger batches get there sooner
    "noisy": Task("noisy", "user-loop-stream", noisy_labels, CLASSES, nn.functional.cross_entropy, "accuracy", target=0.770,
                  lr=2e-3, budget=600_000, eval_every=20_000, out=RESULTS / "user_loop", readme_key="user-loop"),
    # clean targets: a larger batch costs samples, although the noise scale reads in the thousands
    # (far above the batch that trains efficiently here)
    "clean": Task("clean", "user-loop-clean", clean_values, 2, mse, "val_loss", target=0.095, lr=1e-3,
                  budget=300_000, eval_every=10_000, out=RESULTS / "user_loop_clean", readme_key="user-loop-clean"),
}


class Stream(torch.utils.data.IterableDataset):
    """Endless (x, target) micro-batches of the task, each of ``size()`` samples, from a seeded generator."""

    def __init__(self, task: Task, seed: int, size: Callable[[], int]) -> None:
        self.task, self.seed, self.size = task, seed, size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(10_000 + self.seed)
        while True:
            x = torch.randn(self.size(), DIM, generator=g)
            yield x, self.task.labels(x, g)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices and none on biases and LayerNorm (two groups)."""
    return workloads.make_optimizer("adamw", model.parameters(), lr, WEIGHT_DECAY)


def _loss(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return task.loss(model(x), y)


def run_fixed(task: Task, batch: int, seed: int, budget: int,
              on_step: Callable[[int, float, nn.Module, torch.optim.Optimizer], None] | None = None,
              beta_rule: str = "none") -> dict[str, Any]:
    """The plain loop at a fixed batch; ``on_step(samples, loss, model, optimizer)`` after every
    optimizer step, if given. ``beta_rule`` sets AdamW's betas for the batch as the controller's
    rule would (:mod:`adabatch.betas`; "none": the defaults, as users run a fixed batch)."""
    torch.manual_seed(seed)
    model = task.make_model()
    peak = task.lr * math.sqrt(batch / BASE)
    opt = make_optimizer(model, peak)
    betas = BetaScaler(beta_rule, BASE)  # applied around each step, as in the controller (OneCycleLR cycles beta1)
    steps = budget // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=steps)
    rec = Recorder(task.workload, task.make_data(seed), f"fixed-{batch}", seed, budget, task.eval_every)
    loader = torch.utils.data.DataLoader(Stream(task, seed, lambda: batch), batch_size=None)
    for step, (x, y) in zip(range(1, steps + 1), loader):
        loss = _loss(task, model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        saved = betas.apply(opt, batch)
        opt.step()
        betas.restore(opt, saved)
        opt.zero_grad(set_to_none=True)
        if step < steps:  # OneCycleLR refuses a step past its total
            sched.step()
        if on_step is not None:
            on_step(step * batch, loss.item(), model, opt)
        if rec.due(step * batch) or step == steps:
            rec.evaluate(model, step * batch, step, batch, loss.item(), scheduled_lr=opt.param_groups[0]["lr"])
            if rec.done:
                break
    return rec.finish()


def run_scheduled(task: Task, method: str, seed: int, budget: int,
                  make_plan: Callable[[nn.Module, torch.optim.Optimizer], BatchSchedule] | None = None
                  ) -> dict[str, Any]:
    """The plain loop with the batch and LR of a peer's schedule (:mod:`benchmarks.baselines`): a linear
    batch ramp to the sweep's largest batch, or Seesaw. Each step draws the batch the schedule names
    from the stream and runs at its LR (the schedule's, advanced by samples, scaled by the sqrt rule;
    Seesaw's own rule for Seesaw); the LR is set on both parameter groups. ``make_plan(model,
    optimizer)``, if given, builds another schedule (one that reads the model, as
    :mod:`benchmarks.critical`'s oracle does)."""
    wl = task.workload
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_optimizer(model, task.lr)
    if make_plan is not None:
        plan = make_plan(model, opt)
    elif method == "ramp":
        plan = LinearRamp(wl, budget, end=max(FIXED), share=RAMP_SHARE)
    else:
        plan = Seesaw(wl, budget, max_batch=MAX_BATCH)
    rec = Recorder(wl, task.make_data(seed), method, seed, budget, task.eval_every)
    samples = steps = 0
    batch, lr = plan.step(0)
    loader = torch.utils.data.DataLoader(Stream(task, seed, lambda: batch), batch_size=None)
    for x, y in loader:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _loss(task, model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples, steps = samples + len(x), steps + 1
        if rec.due(samples):
            rec.evaluate(model, samples, steps, len(x), loss.item(), scheduled_lr=lr)
            if rec.done:
                break
        batch, lr = plan.step(samples)  # the stream draws the next micro-batch after this
    return rec.finish(plan=plan.describe())


def run_adabatch(task: Task, method: str, seed: int, budget: int,
                 config: ControllerConfig | None = None) -> dict[str, Any]:
    """The loop through the controller, at ``CONFIGS[method]`` unless ``config`` is given."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_optimizer(model, task.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.lr, total_steps=budget // BASE)
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=BASE, config=config or CONFIGS[method], scheduler=sched,
                                  max_grad_norm=CLIP)
    rec = Recorder(task.workload, task.make_data(seed), method, seed, budget, task.eval_every)
    for x, y in torch.utils.data.DataLoader(Stream(task, seed, ctl.next_micro_batch_size), batch_size=None):
        loss = _loss(task, model, x, y)
        ctl.backward(loss, batch_size=len(x))
        if not ctl.step():
            continue
        if rec.due(ctl.samples):
            with ctl.paused():
                rec.evaluate(model, ctl.samples, ctl.steps, ctl.batch_size, loss.item(),
                             noise_scale=ctl.noise_scale, scheduled_lr=opt.param_groups[0]["lr"])
            if rec.done:
                break
    ctl.flush()
    stats = {k: v for k, v in ctl.stats().items() if isinstance(v, (int, float, str))}
    return rec.finish(stats=stats, decisions=[vars(c) for c in ctl.decisions])


def run_one(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """One run: (task key, method, seed, budget)."""
    key, method, seed, budget = job
    task = TASKS[key]
    torch.set_num_threads(1)
    t0 = time.time()
    if method.startswith("fixed-"):
        run = run_fixed(task, int(method.split("-")[1]), seed, budget)
    elif method in ("ramp", "seesaw"):
        run = run_scheduled(task, method, seed, budget)
    else:
        run = run_adabatch(task, method, seed, budget)
    run.update(eval_every=task.eval_every, run_wall_seconds=time.time() - t0)
    return run


def render(task: Task, results: dict[str, Any], summary: dict[str, Any], figures: list[str]) -> str:
    s = summary[task.name]
    lines = [f"# A loop written the way users write one ({task.name})", "",
             f"Generated by `python -m benchmarks.user_loop --task {task.key}` from `results.json` "
             f"({len(results['runs'])} runs, {results['total_seconds'] / 60:.1f} min of runs, seeds {results['seeds']}, "
             f"{results['machine']['cpu_count']} CPUs, one thread per run, torch {results['machine']['torch']}). "
             "The loop and the task: `benchmarks/user_loop.py`'s docstring.", "",
             f"Target: {task.score}; budget {results['budget']:,} samples, evaluated every {task.eval_every:,}. "
             f"Hindsight-best fixed batch: `{s['hindsight_best']}`; best final metric among fixed batches: "
             f"`{s['best_final']}`. `adabatch` runs its untuned defaults; `adabatch-goodput` the opt-in, "
             f"timing-driven policy; `ramp` grows the batch linearly from {BASE} to {max(FIXED)} over the first "
             f"{RAMP_SHARE:.0%} of the budget, `seesaw` doubles it (up to {MAX_BATCH}) wherever OneCycle would halve "
             "the LR, cutting the LR by sqrt(2) instead.", "",
             "| goal (`adabatch`, defaults) | median [95 % CI] | line | met? |", "|---|---|---|---|"]
    for g in s["goals"]:
        if g.key == "tuned":  # no study tunes this loop
            continue
        lines.append(f"| {g.name} | {g.value} | {g.line} | {g.verdict} |")
    lines += ["", "| method | reached | time to target (s) | time / hindsight best | samples to target | "
              f"{task.final} | total time (s) |", "|---|---|---|---|---|---|---|"]
    for m, row in s["rows"].items():
        vs = fmt_est(row["time_vs_best"]) if row["time_vs_best"] is not None else "n/a"
        lines.append(f"| {m} | {row['reached']}/{row['n']} | {fmt_est(row['seconds_to_target'])} | {vs} | "
                     f"{fmt_est(row['samples_to_target'])} | {fmt_est(row['final_metric'], 4)} | "
                     f"{fmt_est(row['seconds'])} |")
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def markers(task: Task) -> tuple[str, str]:
    return f"<!-- {task.readme_key}:start -->", f"<!-- {task.readme_key}:end -->"


def readme_block(task: Task, summary: dict[str, Any]) -> str:
    s = summary[task.name]
    rows = s["rows"]
    best = s["hindsight_best"]
    start, end = markers(task)
    lines = [start, "", f"| method | reached | time / {best} (hindsight best) | {task.final} |", "|---|---|---|---|"]
    for m in ("adabatch", "adabatch-goodput", "ramp", "seesaw", *(f"fixed-{b}" for b in FIXED)):
        if m in rows:
            row = rows[m]
            vs = fmt_est(row["time_vs_best"]) if row["time_vs_best"] is not None else "n/a"
            lines.append(f"| {m} | {row['reached']}/{row['n']} | {vs} | {fmt_est(row['final_metric'], 4)} |")
    lines += ["", "Goals of `adabatch`'s defaults, as the suite states them:", ""]
    lines += [f"- {g.name}: {g.value} (line {g.line}): **{g.verdict}**" for g in s["goals"] if g.key != "tuned"]
    lines += ["", end]
    return "\n".join(lines)


def _run(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """Every seed x method, in that order (each seed's slow small batches first), two processes at once."""
    jobs = [(task.key, m, s, args.budget) for s in args.seeds for m in args.methods]
    runs = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for i, run in enumerate(pool.imap(run_one, jobs), 1):
            runs.append(run)
            hit = f"target at {run['seconds_to_target']:.1f} s" if run["reached_target"] else "target not reached"
            print(f"[{i}/{len(jobs)}] {run['method']} seed {run['seed']}: final {run['final_metric']:.4g}, "
                  f"{run['seconds']:.1f} s, {hit}", flush=True)
    return {"suite": f"user_loop ({task.key})", "seeds": args.seeds, "budget": args.budget, "target": task.target,
            "methods": args.methods, "total_seconds": sum(r["run_wall_seconds"] for r in runs), "runs": runs,
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count()}}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="noisy",
                   help="noisy: label noise, larger batches win; clean: clean targets, smaller batches win")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--budget", type=int, help="samples per run (default: the task's)")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each")
    p.add_argument("--out", type=Path, help="folder for results.json, report.md and plots (default: the task's)")
    p.add_argument("--readme", type=Path, help="README to update between the task's markers")
    p.add_argument("--report-only", action="store_true", help="render the report (and README) from results.json")
    args = p.parse_args(argv)
    task = TASKS[args.task]
    args.budget = args.budget or task.budget
    out = args.out or task.out
    path = out / "results.json"
    if args.report_only:
        results = json.loads(path.read_text())
    else:
        results = _run(task, args)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, default=float))
    summary = summarize(results)
    figures = plots(results, out)[task.name]
    report = out / "report.md"
    report.write_text(render(task, results, summary, figures))
    if args.readme is not None:
        update_readme(args.readme, readme_block(task, summary), *markers(task))
    print(f"wrote {path} and {report}")
    return report


if __name__ == "__main__":
    main()
