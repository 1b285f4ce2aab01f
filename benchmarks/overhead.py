"""Controller overhead: AdaptiveBatchController against a plain accumulation loop, same schedule.

First the controller trains the MNIST-1D MLP once and its per-step schedule (micro-batches per
step, learning rate) is recorded. Then, in alternating rounds in one process with one thread,
three loops replay exactly that schedule on the same data from the same initial weights:

- ``plain``: the hand-written loop (loss / k, backward, step, zero_grad, set the LR);
- ``adabatch``: the controller with default settings (measurement every 4 steps, NaN check);
- ``adabatch-nocheck``: the same with ``on_nonfinite="ignore"`` (no host sync per step).

The figure is the median over rounds of time(controller) / time(plain) - 1, with a 95 % bootstrap
interval. Run: ``python -m benchmarks.overhead [--rounds 15] [--steps 300]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.workloads import mlp, mnist1d_data

MICRO = 32


CONFIG = ControllerConfig(cooldown_steps=20, max_batch=512)


def record_schedule(model, opt, batches, steps: int) -> list[tuple[int, float]]:
    ctl = AdaptiveBatchController(model, opt, MICRO, CONFIG)
    it = iter(batches)
    while ctl.steps < steps:
        x, y = next(it)
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        ctl.step()
    ctl.flush()
    return [(r.micro_batches, r.lr) for r in ctl.history]


def run_plain(model, opt, batches, schedule) -> float:
    it = iter(batches)
    t0 = time.perf_counter()
    for k, lr in schedule:
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(k):
            x, y = next(it)
            (nn.functional.cross_entropy(model(x), y) / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_controller(model, opt, batches, schedule, on_nonfinite: str) -> float:
    # Same weights, same micro-batch stream: the controller makes the recorded decisions again.
    ctl = AdaptiveBatchController(model, opt, MICRO, CONFIG, on_nonfinite=on_nonfinite)
    it = iter(batches)
    t0 = time.perf_counter()
    while ctl.steps < len(schedule):
        x, y = next(it)
        ctl.backward(nn.functional.cross_entropy(model(x), y))
        ctl.step()
    elapsed = time.perf_counter() - t0
    ctl.flush()
    replayed = [r.micro_batches for r in ctl.history]
    if replayed != [k for k, _ in schedule]:
        raise RuntimeError("the controller did not reproduce the recorded schedule; timings would not compare")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = mnist1d_data(0)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps * CONFIG.max_batch // MICRO):
        idx = torch.randint(0, len(data.x_train), (MICRO,), generator=g)
        batches.append((data.x_train[idx], data.y_train[idx]))
    torch.manual_seed(0)
    init = mlp().state_dict()

    def fresh():
        model = mlp()
        model.load_state_dict(init)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    schedule = record_schedule(*fresh(), batches, args.steps)
    n_micro = sum(k for k, _ in schedule)

    methods = {
        "plain": lambda m, o: run_plain(m, o, batches, schedule),
        "adabatch": lambda m, o: run_controller(m, o, batches, schedule, "skip"),
        "adabatch-nocheck": lambda m, o: run_controller(m, o, batches, schedule, "ignore"),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds + 1):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            t = methods[name](*fresh())
            if r > 0:  # round 0 warms up allocator and caches
                times[name].append(t)
    base = np.array(times["plain"])
    report = {"workload": "mnist1d-mlp", "micro_batch": MICRO, "steps": len(schedule), "micro_batches": n_micro,
              "batches_used": sorted({k * MICRO for k, _ in schedule}), "rounds": args.rounds,
              "threads": 1, "seconds": times, "overhead": {}}
    for name in ("adabatch", "adabatch-nocheck"):
        ratios = np.array(times[name]) / base - 1.0
        ci = stats.bootstrap((ratios,), np.median, confidence_level=0.95, random_state=0).confidence_interval
        report["overhead"][name] = {"median": float(np.median(ratios)), "ci95": [float(ci.low), float(ci.high)]}
        print(f"{name:17s} overhead vs plain loop: {100 * np.median(ratios):+.2f} % "
              f"(95 % CI {100 * ci.low:+.2f} .. {100 * ci.high:+.2f} %), "
              f"median round {statistics.median(times[name]):.3f} s vs {statistics.median(times['plain']):.3f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
