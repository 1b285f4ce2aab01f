"""The exact noise scales of the user loop's two tasks, and a schedule that follows the exact B_noise.

    python -m benchmarks.critical            # both tasks, 3 seeds, about 25 min on 2 cores
    python -m benchmarks.critical --seeds 0 --factors 0.5 --tasks clean   # a quick look
    python -m benchmarks.critical --only profiles --tasks --workloads mnist1d-mlp   # redo one profile, keep the rest

The controller sizes the batch from B_simple = tr(Sigma) / |G|^2, McCandlish et al.'s (2018) cheap
stand-in for the noise scale that, in their model, marks the critical batch:
B_noise = tr(H Sigma) / (G^T H G), with H the Hessian. Under Adam both are read through the
preconditioner P = 1 / (sqrt(v_hat) + eps) (Qiao et al. 2021, as :mod:`adabatch.gradnorm`):
B_simple = tr(P Sigma P) / |P G|^2 and B_noise = tr(P H P Sigma) / (G^T P H P G). In their model,
a batch B costs S_min (1 + B / B_noise) samples, so B_noise is where a larger batch starts to cost.

The two tasks of :mod:`benchmarks.user_loop` reward opposite things: on ``noisy`` every fixed batch
from 32 to 1024 reaches the accuracy target after about the same samples, on ``clean`` every
batch above 128 misses the MSE target. This benchmark asks whether the exact noise scales could
tell them apart:

1. **Profile.** Fixed runs at the base batch of each task (the loop of
   :func:`benchmarks.user_loop.run_fixed`) and of three suite workloads (``SUITE``, the loop of
   :func:`benchmarks.loops.train_baseline`: the MNIST-1D MLP under SGD and AdamW, the CNN under
   AdamW); at 3, 10, 25, 50 and 80 % of the budget, the exact B_simple and B_noise on a probe set
   of ``PROBE`` samples (for a task, fresh draws of its stream's distribution; for a workload, its
   training set, the population its sampler draws from), by :func:`adabatch.exact.exact_noise_scales`
   (per-example gradients, and tr(P H P Sigma) over ``DIRECTIONS`` per-example deviations, its
   standard error beside it). Beside each profile, what
   the committed sweep of fixed batches found on the same seeds: the hindsight-best fixed batch
   and the largest that reached the target on every seed.
2. **Oracle.** The same loop with the batch set to ``factor x B_noise`` (exact, re-read every
   ``every`` samples, in multiples of 32 within 32-4096) and the LR by the sqrt rule on the
   OneCycle schedule advanced by samples (:func:`benchmarks.user_loop.run_scheduled`): the best
   a controller could do that knew the critical batch of McCandlish's model exactly. Reported:
   final metric, samples and steps to the target, beside the fixed batches and adabatch of the
   committed user-loop results at the same seeds (deterministic figures, no wall time: the oracle's
   own computation would dominate it).

Results: ``benchmarks/results/critical.json``, ``critical.md`` and ``critical.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from adabatch.decide import snap_down
from adabatch.exact import exact_noise_scales
from adabatch.workloads import get_workload
from benchmarks import user_loop
from benchmarks.baselines import BatchSchedule, FixedBatch
from benchmarks.loops import train_baseline
from benchmarks.report import hindsight_best, update_readme

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = (0.03, 0.1, 0.25, 0.5, 0.8)  # profile checkpoints, as shares of the budget
PROBE = 2048  # samples of the probe set
DIRECTIONS = 32  # per-example deviations whose curvature is averaged for tr(P H P Sigma)
FACTORS = (0.5, 1.0)
EVERY = {"clean": 10_000, "noisy": 20_000}  # samples between the oracle's readings
MAX_BATCH = 4096
# suite workloads profiled, and the committed sweep (results folder) their fixed batches come from
SUITE = {"mnist1d-mlp": "quick", "mnist1d-mlp-adamw": "full", "mnist1d-cnn-adamw": "full"}
MARKERS = ("<!-- critical:start -->", "<!-- critical:end -->")  # the README's generated block


def probe_set(task: user_loop.Task, seed: int) -> tuple[Tensor, Tensor]:
    """``PROBE`` fresh samples from the task's training distribution (a seed no stream uses)."""
    g = torch.Generator().manual_seed(50_000 + seed)
    x = torch.randn(PROBE, user_loop.DIM, generator=g)
    return x, task.labels(x, g)


def _read(loss_fn: Callable[[Tensor, Tensor], Tensor], model: nn.Module, opt: torch.optim.Optimizer,
          probe: tuple[Tensor, Tensor]) -> dict[str, float] | None:
    est = exact_noise_scales(model, loss_fn, *probe, optimizer=opt, directions=DIRECTIONS)
    return None if est is None else est.as_dict()


def profile_run(job: tuple[str, int, int | None]) -> dict[str, Any]:
    """A fixed run at the base batch of a user-loop task or a suite workload (name, seed, budget or None
    for its own), with the exact noise scales at each of ``POINTS``."""
    name, seed, budget = job
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    if name in user_loop.TASKS:
        task = user_loop.TASKS[name]
        probe, loss_fn, batch = probe_set(task, seed), task.loss, user_loop.BASE
        budget = budget or task.budget
    else:
        wl = get_workload(name)
        data = wl.make_data(seed)
        pick = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(50_000 + seed))[:PROBE]
        probe, loss_fn, batch = (data.x_train[pick], data.y_train[pick]), wl.loss, wl.micro_batch
        budget = budget or wl.sample_budget
    due = sorted({max(1, int(p * budget / batch)) * batch for p in POINTS})

    def at(samples: int, loss: float, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        est = _read(loss_fn, model, opt, probe) if samples in due else None
        if est is not None:
            rows.append({"samples": samples, "share": samples / budget, **est})

    if name in user_loop.TASKS:
        run = user_loop.run_fixed(task, batch, seed, budget, on_step=at)
    else:
        run = train_baseline(wl, data, seed, FixedBatch(wl, budget, batch), budget // 10, f"fixed-{batch}", on_step=at)
    return {"task": name, "seed": seed, "batch": batch, "final_metric": run["final_metric"], "checkpoints": rows}


def _source(name: str) -> Path:
    """The committed results file of a user-loop task or a suite workload."""
    return user_loop.TASKS[name].out / "results.json" if name in user_loop.TASKS else \
        RESULTS / SUITE[name] / "results.json"


def _committed_runs(name: str, seeds: list[int]) -> list[dict[str, Any]]:
    """The committed runs of a task or workload on ``seeds`` (none when the file is missing)."""
    path = _source(name)
    if not path.exists():
        return []
    label = user_loop.TASKS[name].name if name in user_loop.TASKS else name
    return [r for r in json.loads(path.read_text())["runs"] if r.get("workload") == label and r["seed"] in seeds]


def sweep(name: str, seeds: list[int]) -> dict[str, Any]:
    """What the committed fixed-batch runs of a task or workload found on ``seeds``: the hindsight-best
    fixed batch (fastest to the target on every seed) and the largest reaching it on every seed."""
    methods: dict[str, list[dict]] = {}
    for r in _committed_runs(name, seeds):
        methods.setdefault(r["method"], []).append(r)
    if not methods:
        return {}
    fixed = {m: rs for m, rs in methods.items() if m.startswith("fixed-")}
    reaching = [int(m.split("-")[1]) for m, rs in fixed.items() if all(r["reached_target"] for r in rs)]
    return {"source": str(_source(name).relative_to(RESULTS.parent.parent)), "hindsight_best": hindsight_best(methods),
            "largest_reaching": max(reaching, default=None),
            "fixed": sorted(int(m.split("-")[1]) for m in fixed)}


class NoiseOracle(BatchSchedule):
    """Batch = ``factor`` x the exact preconditioned B_noise, re-read every ``every`` samples.

    The LR is the base class's: the workload's schedule advanced by samples, scaled by the LR rule.
    """

    def __init__(self, task: user_loop.Task, budget: int, model: nn.Module, opt: torch.optim.Optimizer,
                 factor: float, every: int, probe: tuple[Tensor, Tensor]) -> None:
        super().__init__(task.workload, budget)
        self.task, self.model, self.opt, self.factor, self.every, self.probe = task, model, opt, factor, every, probe
        self.current, self.next = self.base, every
        self.path: list[dict[str, float]] = []

    def batch(self, samples: int) -> int:
        if samples >= self.next:
            self.next += self.every
            est = _read(self.task.loss, self.model, self.opt, self.probe)
            if est is not None and math.isfinite(est["b_noise"]) and est["b_noise"] > 0:
                self.current = snap_down(self.factor * est["b_noise"], self.base, self.base, MAX_BATCH)
                self.path.append({"samples": samples, "b_noise": est["b_noise"], "b_simple": est["b_simple"],
                                  "batch": self.current})
        return self.current

    def describe(self) -> dict:
        return {**super().describe(), "factor": self.factor, "every": self.every, "path": self.path}


def oracle_run(job: tuple[str, float, int, int]) -> dict[str, Any]:
    """The user loop under :class:`NoiseOracle` for (task, factor, seed, budget)."""
    key, factor, seed, budget = job
    task = user_loop.TASKS[key]
    torch.set_num_threads(1)
    probe = probe_set(task, seed)
    run = user_loop.run_scheduled(
        task, f"oracle-{factor:g}", seed, budget,
        make_plan=lambda model, opt: NoiseOracle(task, budget, model, opt, factor, EVERY[key], probe))
    keep = ("method", "seed", "final_metric", "reached_target", "samples_to_target", "steps_to_target", "steps",
            "plan", "evals")
    return {"task": key, "factor": factor, **{k: run[k] for k in keep}}


def committed(key: str, methods: tuple[str, ...], seeds: list[int]) -> list[dict[str, Any]]:
    """The oracle's comparison rows from the committed user-loop results (fixed batches and adabatch), same seeds."""
    keep = ("method", "seed", "final_metric", "reached_target", "samples_to_target", "steps_to_target", "steps")
    return [{"task": key, **{k: r[k] for k in keep}} for r in _committed_runs(key, seeds) if r["method"] in methods]


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) * 2 > len(values) else None  # reached on most seeds, else none


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per task or workload: the profile's medians over seeds at each checkpoint, the sweep, and (tasks)
    each method's medians."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["task"] for r in results["profiles"]):
        prof = [r for r in results["profiles"] if r["task"] == name]
        points = []
        for share in sorted({c["share"] for r in prof for c in r["checkpoints"]}):
            cs = [c for r in prof for c in r["checkpoints"] if c["share"] == share]
            points.append({"share": share, **{k: statistics.median(c[k] for c in cs)
                                              for k in ("b_simple", "b_noise", "b_noise_rel_se")}})
        methods = {}
        rows = [r for r in results["oracles"] + results["committed"] if r["task"] == name]
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == m]
            methods[m] = {"runs": len(rs), "reached": sum(r["reached_target"] for r in rs),
                          "final_metric": statistics.median(r["final_metric"] for r in rs),
                          "samples_to_target": _median([r["samples_to_target"] for r in rs]),
                          "steps_to_target": _median([r["steps_to_target"] for r in rs]),
                          "steps": statistics.median(r["steps"] for r in rs)}
        out[name] = {"profile": points, "batch": prof[0]["batch"], "sweep": results["sweeps"].get(name, {}),
                     "methods": methods}
    return out


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "not reached" if v is None else format(v, spec)


def _title(name: str) -> str:
    if name in user_loop.TASKS:
        task = user_loop.TASKS[name]
        return f"user loop, {name} task ({task.score}, budget {task.budget:,} samples)"
    wl = get_workload(name)
    return f"{name} ({wl.optimizer}, {wl.schedule}; {'accuracy' if wl.higher_is_better else wl.metric} target " \
           f"{wl.target}, budget {wl.sample_budget:,} samples)"


def render(results: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = ["# Exact noise scales, and a schedule that follows B_noise", "",
             f"Generated by `python -m benchmarks.critical` (seeds {results['seeds']}; probe sets of {PROBE} "
             f"samples, tr(P H P Sigma) over {DIRECTIONS} per-example directions). Noise scales read through "
             "Adam's preconditioner where the optimizer is Adam-family, as the controller reads them; medians "
             "over seeds. *Fixed-batch sweep*: the committed runs of the same seeds.", ""]
    for name, s in summary.items():
        sw = s["sweep"]
        lines += [f"## {_title(name)}", "", f"Fixed-{s['batch']} run, exact noise scales:", "",
                  "| share of the budget | B_simple | B_noise | B_noise / B_simple | rel. SE of B_noise |",
                  "|---|---|---|---|---|"]
        for p in s["profile"]:
            lines.append(f"| {p['share']:.0%} | {p['b_simple']:,.0f} | {p['b_noise']:,.0f} | "
                         f"{p['b_noise'] / p['b_simple']:.2f} | {p['b_noise_rel_se']:.0%} |")
        if sw:
            found = (f"hindsight best `{sw['hindsight_best']}`, largest batch reaching the target on every seed: "
                     f"{sw['largest_reaching']}") if sw["hindsight_best"] else "no fixed batch reached the target on every seed"
            lines += ["", f"Fixed-batch sweep ({', '.join(map(str, sw['fixed']))}; `{sw['source']}`): {found}."]
        if s["methods"]:
            lines += ["", "Oracle schedules (batch = factor x exact B_noise) beside the committed runs (same seeds):",
                      "", "| method | reached | samples to target | steps to target | steps in the run | final metric |",
                      "|---|---|---|---|---|---|"]
            for m, r in s["methods"].items():
                lines.append(f"| {m} | {r['reached']}/{r['runs']} | {_fmt(r['samples_to_target'])} | "
                             f"{_fmt(r['steps_to_target'])} | {r['steps']:,.0f} | {r['final_metric']:.4f} |")
        lines.append("")
    lines.append("![exact noise scales and oracle batches](critical.png)")
    return "\n".join(lines) + "\n"


def readme_block(summary: dict[str, Any]) -> str:
    """The README's table: per loop, the exact noise scales' range over the run beside the sweep, then
    the oracle schedules beside the fixed batches and adabatch."""
    lines = [MARKERS[0], "", "| loop | exact B_simple over the run | exact B_noise over the run | B_noise / B_simple | "
             "hindsight-best fixed batch | largest fixed batch reaching the target |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        prof, sw = s["profile"], s["sweep"]
        span = lambda k: f"{min(p[k] for p in prof):,.0f}-{max(p[k] for p in prof):,.0f}"
        ratios = [p["b_noise"] / p["b_simple"] for p in prof]
        best = sw.get("hindsight_best") or "none reaches on every seed"
        lines.append(f"| {name} | {span('b_simple')} | {span('b_noise')} | {min(ratios):.2f}-{max(ratios):.2f} | "
                     f"{best} | {sw.get('largest_reaching') or 'none'} |")
    lines += ["", "| loop | method | reached | steps to target | final metric |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        for m, r in s["methods"].items():
            lines.append(f"| {name} | {m} | {r['reached']}/{r['runs']} | {_fmt(r['steps_to_target'])} | "
                         f"{r['final_metric']:.4f} |")
    return "\n".join(lines + ["", MARKERS[1]])


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["task"] for r in results["profiles"]))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    first = results["seeds"][0]
    for ax, name in zip(axes.flat, names):
        for r in (r for r in results["profiles"] if r["task"] == name):
            cs = r["checkpoints"]
            ax.plot([c["samples"] for c in cs], [c["b_simple"] for c in cs], "o-", color="tab:blue", alpha=0.6,
                    label="exact B_simple" if r["seed"] == first else None)
            ax.plot([c["samples"] for c in cs], [c["b_noise"] for c in cs], "s-", color="tab:red", alpha=0.6,
                    label="exact B_noise" if r["seed"] == first else None)
        for r in (r for r in results["oracles"] if r["task"] == name and r["seed"] == first):
            pts = r["plan"]["path"]
            ax.step([p["samples"] for p in pts], [p["batch"] for p in pts], where="post",
                    label=f"oracle batch, {r['factor']:g} x B_noise (seed {first})")
        best = results["sweeps"].get(name, {}).get("hindsight_best")
        if best:
            ax.axhline(int(best.split("-")[1]), color="gray", ls=":", label=f"hindsight-best {best}")
        ax.set_yscale("log")
        ax.set_xlabel("samples")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pool(jobs: list[tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]], processes: int) -> list[dict[str, Any]]:
    t0 = time.time()
    out = []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pending = [(fn, pool.apply_async(fn, (job,))) for fn, job in jobs]
        for i, (fn, res) in enumerate(pending, 1):
            run = res.get()
            out.append(run)
            what = (f"oracle {run['factor']:g} x B_noise: final {run['final_metric']:.4g}, "
                    f"{'reached' if run['reached_target'] else 'target not reached'}") if fn is oracle_run else \
                f"profile, {len(run['checkpoints'])} checkpoints"
            print(f"[{i}/{len(jobs)}] {run['task']} seed {run['seed']}: {what} ({(time.time() - t0) / 60:.1f} min)",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="*", default=sorted(user_loop.TASKS), choices=sorted(user_loop.TASKS))
    p.add_argument("--workloads", nargs="*", default=list(SUITE), choices=list(SUITE))
    p.add_argument("--factors", type=float, nargs="+", default=list(FACTORS))
    p.add_argument("--only", choices=("profiles",), help="rerun the profiles of --tasks and --workloads and keep the "
                   "rest of the results file")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, help="README to update between <!-- critical:start --> and its end marker")
    p.add_argument("--report-only", action="store_true", help="render the report (and README) from critical.json")
    args = p.parse_args(argv)
    if args.report_only:
        return _write(json.loads((args.out / "critical.json").read_text()), args)
    t0 = time.time()
    names = args.tasks + args.workloads
    path = args.out / "critical.json"
    # the longest runs (noisy oracles at the smaller factor) first, so two processes finish together
    jobs: list[tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]] = [] if args.only else \
        [(oracle_run, (k, f, s, user_loop.TASKS[k].budget)) for k in sorted(args.tasks, reverse=True)
         for f in args.factors for s in args.seeds]
    jobs += [(profile_run, (k, s, None)) for k in names for s in args.seeds]
    runs = _pool(jobs, args.jobs)
    profiles = [r for r in runs if "checkpoints" in r]
    if args.only:
        results = json.loads(path.read_text())
        results["profiles"] = [r for r in results["profiles"] if r["task"] not in names] + profiles
    else:
        compare = ("fixed-32", "fixed-128", "fixed-256", "fixed-1024", "adabatch")
        results = {"seeds": args.seeds, "factors": args.factors, "probe": PROBE, "directions": DIRECTIONS,
                   "profiles": profiles, "oracles": [r for r in runs if "factor" in r],
                   "committed": [r for k in args.tasks for r in committed(k, compare, args.seeds)]}
    results["sweeps"] = {n: sweep(n, results["seeds"]) for n in dict.fromkeys(r["task"] for r in results["profiles"])}
    results.setdefault("minutes", {})[args.only or "all"] = (time.time() - t0) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, default=float))
    return _write(results, args)



def _write(results: dict[str, Any], args: argparse.Namespace) -> Path:
    plot(results, args.out / "critical.png")
    summary = summarize(results)
    report = args.out / "critical.md"
    report.write_text(render(results, summary))
    if args.readme is not None:
        update_readme(args.readme, readme_block(summary), *MARKERS)
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
