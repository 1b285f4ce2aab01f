"""Pick a workload's target from a pilot of fixed batches only, on a seed the benchmark never uses.

    python -m benchmarks.pilot mnist1d-mlp-adamw                  # the sweep of the full suite, seed 100
    python -m benchmarks.pilot charlm-adamw --batches 16 32       # part of the sweep; later calls add to it

The rule, applied before any adaptive run and never tuned to favour one: take the fixed batch with
the best final metric at the budget; the target is the best value it had reached by
``TARGET_AT`` (three quarters) of its budget, rounded to three significant digits towards the easier
side. With a decaying LR schedule that is a value the best fixed batch reaches late in its run.
Every pilot run (evaluation curve, final metric, wall time) is kept in
``benchmarks/results/pilot/<workload>.json``; the target goes into the workload's definition in
:mod:`adabatch.workloads` by hand, next to a comment naming the pilot.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from adabatch.workloads import Workload, get_workload
from benchmarks import loops
from benchmarks.baselines import FixedBatch
from benchmarks.run import SUITES, sweep

PILOT_SEED = 100
TARGET_AT = 0.75
PILOTS = Path(__file__).resolve().parent / "results" / "pilot"


def round_towards_easier(value: float, higher_is_better: bool, digits: int = 3) -> float:
    """``value`` to ``digits`` significant digits, rounded down for accuracy-like metrics, up for losses.

    Example:
        >>> round_towards_easier(0.71384, True), round_towards_easier(1.23456, False)
        (0.713, 1.24)
    """
    if value == 0 or not math.isfinite(value):
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    rounded = (math.floor if higher_is_better else math.ceil)(value * scale - (1e-9 if higher_is_better else -1e-9))
    return round(rounded / scale, digits + 6)


def pick_target(runs: list[dict[str, Any]], higher_is_better: bool, at: float = TARGET_AT) -> tuple[str, float]:
    """The best fixed batch by final metric, and the best value it reached by ``at`` of its budget.

    Example:
        >>> runs = [{"method": "fixed-32", "budget": 100, "final_metric": 0.70,
        ...          "evals": [{"samples": 50, "accuracy": 0.60}, {"samples": 100, "accuracy": 0.70}]},
        ...         {"method": "fixed-64", "budget": 100, "final_metric": 0.80,
        ...          "evals": [{"samples": 50, "accuracy": 0.7512}, {"samples": 75, "accuracy": 0.74},
        ...                    {"samples": 100, "accuracy": 0.80}]}]
        >>> pick_target(runs, higher_is_better=True)
        ('fixed-64', 0.751)
    """
    key = "accuracy" if higher_is_better else "val_loss"
    finite = [r for r in runs if math.isfinite(r["final_metric"])]
    best = (max if higher_is_better else min)(finite, key=lambda r: r["final_metric"])
    early = [e[key] for e in best["evals"] if e["samples"] <= at * best["budget"] and math.isfinite(e[key])]
    value = (max if higher_is_better else min)(early)
    return best["method"], round_towards_easier(value, higher_is_better)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload")
    p.add_argument("--suite", default="full", choices=sorted(SUITES), help="suite whose budget and sweep to use")
    p.add_argument("--batches", type=int, nargs="+", help="subset of the sweep to run now")
    p.add_argument("--seed", type=int, default=PILOT_SEED)
    p.add_argument("--out", type=Path, default=PILOTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    wl: Workload = get_workload(args.workload)
    spec = SUITES[args.suite]["workloads"][wl.name]
    path = args.out / f"{wl.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("budget") != spec["budget"] or record.get("lr") != wl.lr or record.get("seed") != args.seed:
        record = {"workload": wl.name, "seed": args.seed, "budget": spec["budget"], "eval_every": spec["eval_every"],
                  "lr": wl.lr, "optimizer": wl.optimizer, "schedule": wl.schedule, "runs": {}}
    data = wl.make_data(args.seed)
    for b in args.batches or sweep(wl, SUITES[args.suite]):
        t0 = time.time()
        run = loops.train_baseline(wl, data, args.seed, FixedBatch(wl, spec["budget"], b), spec["eval_every"],
                                   f"fixed-{b}")
        run["run_wall_seconds"] = time.time() - t0
        record["runs"][f"fixed-{b}"] = {k: run[k] for k in ("method", "budget", "final_metric", "seconds",
                                                              "run_wall_seconds", "evals")}
        print(f"fixed-{b}: final {wl.metric} {run['final_metric']:.4f}, {run['run_wall_seconds']:.0f} s")
    if len(record["runs"]) == len(sweep(wl, SUITES[args.suite])):
        best, target = pick_target(list(record["runs"].values()), wl.higher_is_better)
        record.update(best_fixed=best, target=target, rule=f"best value of {best} by {TARGET_AT:.0%} of its budget")
        print(f"target: {wl.metric} {'>=' if wl.higher_is_better else '<='} {target} (from {best})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
