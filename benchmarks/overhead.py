"""Controller overhead: AdaptiveBatchController against a plain loop that runs the same schedule.

    python -m benchmarks.overhead                      # both models, ~15 min on 2 cores
    python -m benchmarks.overhead --model mnist1d-mlp --rounds 10
    python -m benchmarks.overhead --model mnist1d-cnn conv2d-32px --rounds 8 \
        --config '{"measurement": "examples"}' --out benchmarks/results/overhead_examples.json

One process, one thread. Each round, the controller trains a model from the same initial weights on
the same sample stream at its default settings, with the loader following its plan
(``next_micro_batch_size``: micro-batches grow with the batch, measured steps are split into
pieces), and records every step's batch and learning rate. A hand-written loop then replays that
schedule (for each step: the unsplit micro-batches the step would have had unmeasured, loss / k,
backward, optimizer step at the recorded LR, zero_grad), once right after the controller and once
before the next round's controller run; the controller's time is compared with the mean of the
two. Everything the controller adds is charged to it: measured steps split in two, their norm passes,
the read-back, the decisions, the per-step loss check and the bookkeeping.

Models: the MNIST-1D MLP (40-256-256-10, a step of about a millisecond: the worst case for a fixed
cost per step), the MNIST-1D CNN (three Conv1d layers and a Linear head, per-example norms through
input patches), a Conv2d net on 3 x 32 x 32 images (32-64-64 channels, steps of about 100 ms) and
a 5.3M-parameter MLP (512-2048-2048-10, micro-batches of 64, a step of tens of
milliseconds). ``mnist1d-mlp-400k`` and ``mnist1d-cnn-320k`` train the two MNIST-1D models for the
full suite's budget (400,000 and 320,000 samples): the 40,000-sample runs are the start of a run,
where the noise-scale window is shortest and nearly every step is measured; these are a whole run.
Measuring some models only updates their entries in the results file (each entry
names the code version it was measured at). The figure is the median over rounds of time(controller) / time(plain) - 1, with a
95 % bootstrap interval; next to it the same ratio for each side's fastest quarter of rounds,
which other tenants of the machine disturb least.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.config import config_changes
from adabatch.plan import plan_step
from adabatch.workloads import cnn, mlp, mnist1d_data
from benchmarks.run import _code_version

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"


def big_mlp() -> nn.Module:
    """512-2048-2048-10: 5.3M parameters."""
    return nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def conv2d_net() -> nn.Module:
    """Three 3x3 Conv2d layers (32, 64, 64 channels, two of stride 2) and a Linear head, for 3 x 32 x 32 images."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


def _stream(x: torch.Tensor, y: torch.Tensor, n: int, seed: int):
    """``n`` sample indices drawn once, so every loop sees the same samples in the same order."""
    return torch.randint(0, len(x), (n,), generator=torch.Generator().manual_seed(seed))


MODELS: dict[str, dict[str, Any]] = {
    # name: model, data, micro-batch, optimizer LR, samples per round
    "mnist1d-mlp": {"make": mlp, "micro": 32, "lr": 0.05, "samples": 40_000},
    "mnist1d-cnn": {"make": cnn, "micro": 32, "lr": 0.05, "samples": 40_000},
    # the same models over the full suite's whole budget for them, where the window (a tenth of the
    # samples seen) has grown and measurements are sparser than in a run's first 40,000 samples
    "mnist1d-mlp-400k": {"make": mlp, "micro": 32, "lr": 0.05, "samples": 400_000},
    "mnist1d-cnn-320k": {"make": cnn, "micro": 32, "lr": 0.05, "samples": 320_000},
    "conv2d-32px": {"make": conv2d_net, "micro": 32, "lr": 0.01, "samples": 6_000},
    "mlp-5.3M": {"make": big_mlp, "micro": 64, "lr": 0.01, "samples": 12_000},
}


def _data(name: str):
    if name.startswith("mnist1d"):
        d = mnist1d_data(0)
        return d.x_train, d.y_train
    g = torch.Generator().manual_seed(0)
    if name == "conv2d-32px":  # random images, labels from a fixed random projection of them
        x = torch.randn(2048, 3, 32, 32, generator=g)
        return x, (x.flatten(1) @ torch.randn(3 * 32 * 32, 10, generator=g)).argmax(1)
    x = torch.randn(4096, 512, generator=g)
    return x, (x[:, :10] + 0.5 * torch.randn(4096, 10, generator=g)).argmax(1)


def run_controller(model, opt, x, y, order, micro: int, config: ControllerConfig):
    ctl = AdaptiveBatchController(model, opt, micro, config)
    pos, budget = 0, len(order)
    t0 = time.perf_counter()
    while True:
        n = ctl.next_micro_batch_size()
        if pos + n > budget:
            break
        idx = order[pos:pos + n]
        pos += n
        ctl.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]))
        ctl.step()
    elapsed = time.perf_counter() - t0
    ctl.flush()
    cap = ctl._max_micro_units
    schedule = [(plan_step(r.batch, ctl.granularity, micro, cap, measured=False, follows=True, ddp=False).sizes, r.lr)
                for r in ctl.history]
    return elapsed, schedule, ctl


def run_plain(model, opt, x, y, order, schedule) -> float:
    pos = 0
    t0 = time.perf_counter()
    for sizes, lr in schedule:
        for group in opt.param_groups:
            group["lr"] = lr
        k = len(sizes)
        for n in sizes:
            idx = order[pos:pos + n]
            pos += n
            (nn.functional.cross_entropy(model(x[idx]), y[idx]) / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(name: str, rounds: int, config: ControllerConfig, progress: bool = True) -> dict[str, Any]:
    spec = MODELS[name]
    x, y = _data(name)
    order = _stream(x, y, spec["samples"], seed=1)
    torch.manual_seed(0)
    init = spec["make"]().state_dict()

    def fresh():
        model = spec["make"]()
        model.load_state_dict(init)
        return model, torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)

    ctl_times, plain_times, info = [], [], []
    previous = None
    for r in range(rounds + 1):
        before = run_plain(*fresh(), x, y, order, previous) if previous is not None else None
        t, schedule, ctl = run_controller(*fresh(), x, y, order, spec["micro"], config)
        after = run_plain(*fresh(), x, y, order, schedule)
        if r > 0:  # round 0 warms up the allocator and caches
            ctl_times.append(t)
            plain_times.append((before + after) / 2)
            info.append({"steps": ctl.steps, "measured": ctl.estimator.measurements,
                         "batches": sorted({s[0][0] * len(s[0]) for s in schedule})})
            if progress:
                print(f"  {name} round {r}: controller {t:.3f} s, plain {plain_times[-1]:.3f} s "
                      f"({100 * (t / plain_times[-1] - 1):+.1f} %), {ctl.steps} steps, "
                      f"{ctl.estimator.measurements} measured", flush=True)
        if previous is not None and schedule != previous:
            raise RuntimeError("the controller's schedule changed between rounds: the run is not deterministic")
        previous = schedule
    ratios = np.array(ctl_times) / np.array(plain_times) - 1.0
    ci = stats.bootstrap((ratios,), np.median, confidence_level=0.95, random_state=0).confidence_interval
    q = max(1, len(ratios) // 4)
    fastest = float(np.sort(ctl_times)[:q].mean() / np.sort(plain_times)[:q].mean() - 1.0)
    return {"median": float(np.median(ratios)), "ci95": [float(ci.low), float(ci.high)], "fastest_quarter": fastest,
            "seconds": ctl_times, "plain_seconds": plain_times, "runs": info,
            "step_ms": 1000 * statistics.median(plain_times) / info[0]["steps"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="+", default=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--config", default="{}", help='ControllerConfig changes, as JSON (e.g. \'{"window_fraction": 0.2}\')')
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = ControllerConfig(**config_changes(args.config))
    report: dict[str, Any] = {"threads": 1, "rounds": args.rounds, "config": config.to_dict(), "models": {}}
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("config") == report["config"] and old.get("rounds") == args.rounds:
            report["models"] = old.get("models", {})  # the models not measured now keep their entries
    for name in args.model:
        res = measure(name, args.rounds, config)
        res["code_version"] = _code_version()
        report["models"][name] = res
        print(f"{name}: overhead vs plain loop on the same schedule: median {100 * res['median']:+.2f} % "
              f"(95 % CI {100 * res['ci95'][0]:+.2f} .. {100 * res['ci95'][1]:+.2f} %), fastest quarter "
              f"{100 * res['fastest_quarter']:+.2f} %; {res['runs'][0]['steps']} steps of about "
              f"{res['step_ms']:.1f} ms, {res['runs'][0]['measured']} measured, batches {res['runs'][0]['batches']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
