"""The controller under DDP on 2 CPU processes (gloo): its overhead, and time to target against fixed batches.

    python -m benchmarks.distributed            # about a minute on 2 cores; writes results/distributed.json

One run of two processes (``mp.spawn``, gloo, one thread each), on the MNIST-1D MLP (micro-batches
of 32 per process, SGD at the workload's LR):

- **Overhead.** Each round, the controller trains from the same initial weights on the same
  sample stream (each rank its own stride) with the loader following its plan, and records each
  step's batch and LR. A plain DDP loop then replays that schedule (the unmeasured step's
  micro-batches, ``no_sync`` on all but the last, loss / k, the optimizer step at the recorded
  LR), once right after the controller and once before the next round's controller run, so the
  two are interleaved. The ratio is time(controller) / mean(time(plain) around it); the figure is
  the median over rounds. Everything the controller adds is charged to it, its all-reduces
  included (the step's loss, and each measurement).
- **Time to target.** :func:`adabatch.workloads.train` under DDP, stopping at the workload's
  target accuracy (0.65, evaluated every 8,000 samples): the controller at its defaults against
  fixed global batches (min = max = initial batch) with the LR scaled by the same linear rule from
  the base batch of 64. Training seconds (evaluation excluded), seed 0, one run each.

NCCL on GPUs is not measured here: no GPU was available.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.plan import plan_step
from adabatch.workloads import get_workload, mlp, train

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
WORLD, MICRO, LR = 2, 32, 0.05
FIXED = (64, 256, 1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _overhead(rank: int, rounds: int, samples: int) -> dict[str, Any]:
    data = get_workload("mnist1d-mlp").make_data(0)
    x, y = data.x_train, data.y_train
    stream = torch.randint(0, len(x), (samples,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    init = mlp().state_dict()

    def fresh():
        model = mlp()
        model.load_state_dict(init)
        ddp = nn.parallel.DistributedDataParallel(model)
        return ddp, torch.optim.SGD(ddp.parameters(), lr=LR)

    def controller(out: dict) -> None:
        ddp, opt = fresh()
        ctl = AdaptiveBatchController(ddp, opt, MICRO, ControllerConfig())
        pos = 0
        while True:
            n = ctl.next_micro_batch_size()
            if pos + n * WORLD > samples:
                break
            idx = stream[pos:pos + n * WORLD][rank::WORLD]
            pos += n * WORLD
            ctl.backward(nn.functional.cross_entropy(ddp(x[idx]), y[idx]))
            ctl.step()
        ctl.flush()
        cap = ctl._max_micro_units
        out["schedule"] = [(plan_step(r.batch, ctl.granularity, MICRO, cap, measured=False, follows=True,
                                      ddp=True).sizes, r.lr) for r in ctl.history]
        out["steps"], out["measured"] = ctl.steps, ctl.estimator.measurements
        out["batches"] = sorted({r.batch for r in ctl.history})

    def plain(schedule) -> None:
        ddp, opt = fresh()
        pos = 0
        for sizes, lr in schedule:
            for group in opt.param_groups:
                group["lr"] = lr
            k = len(sizes)
            for i, n in enumerate(sizes):
                idx = stream[pos:pos + n * WORLD][rank::WORLD]
                pos += n * WORLD
                ddp.require_backward_grad_sync = i == k - 1
                (nn.functional.cross_entropy(ddp(x[idx]), y[idx]) / k).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    ctl_s, plain_s, ratios, runs = [], [], [], []
    previous = None
    for r in range(rounds + 1):
        before = _timed(lambda: plain(previous)) if previous is not None else None
        info: dict[str, Any] = {}
        t = _timed(lambda: controller(info))
        after = _timed(lambda: plain(info["schedule"]))
        if previous is not None and info["schedule"] != previous:
            raise RuntimeError("the controller's schedule changed between rounds: the run is not deterministic")
        previous = info["schedule"]
        if r == 0:  # warms up the allocator and caches
            continue
        ctl_s.append(t)
        plain_s.append((before + after) / 2)
        ratios.append(t / plain_s[-1])
        runs.append({"steps": info["steps"], "measured": info["measured"], "batches": info["batches"]})
        if rank == 0:
            print(f"  overhead round {r}: controller {t:.3f} s, plain DDP {plain_s[-1]:.3f} s, ratio "
                  f"{ratios[-1]:.3f}", flush=True)
    return {"median_ratio": statistics.median(ratios), "ratios": ratios, "controller_seconds": ctl_s,
            "plain_seconds": plain_s, "samples_per_round": samples, "runs": runs}


def _time_to_target(rank: int) -> dict[str, Any]:
    wl = get_workload("mnist1d-mlp")
    data = wl.make_data(0)
    out = {}
    configs = {"adabatch": ControllerConfig(base_batch=64)}
    configs.update({f"fixed-{b}": ControllerConfig(base_batch=64, initial_batch=b, min_batch=b, max_batch=b)
                    for b in FIXED})
    for name, cfg in configs.items():
        r = train(wl, cfg, seed=0, stop_at_target=True, data=data)
        out[name] = {"reached": r.reached_target, "seconds_to_target": r.seconds_to_target,
                     "samples_to_target": r.samples_to_target, "steps_to_target": r.steps_to_target,
                     "final_accuracy": r.final_metric, "batches": sorted({h["batch"] for h in r.history}),
                     "ranks_agree": len({(x["batches"], x["weights"]) for x in r.ranks}) == 1}
        if rank == 0:
            print(f"  time to target {name}: {r.seconds_to_target} s, {r.samples_to_target} samples", flush=True)
    return out


def _worker(rank: int, port: int, rounds: int, samples: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {"overhead": _overhead(rank, rounds, samples), "time_to_target": _time_to_target(rank)}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="overhead rounds after a warm-up round (default 5)")
    parser.add_argument("--samples", type=int, default=160_000, help="samples per overhead run (default 160,000: the workload's budget)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    tmp = args.out.with_suffix(".part")
    start = time.perf_counter()
    mp.spawn(_worker, args=(_free_port(), args.rounds, args.samples, str(tmp)), nprocs=WORLD, join=True)
    result = json.loads(tmp.read_text())
    tmp.unlink()
    tt = result["time_to_target"]
    fixed = {k: v["seconds_to_target"] for k, v in tt.items() if k.startswith("fixed") and v["reached"]}
    best = min(fixed, key=fixed.get) if fixed else None
    ada = tt["adabatch"]["seconds_to_target"]
    result = {
        "benchmark": "adabatch under DDP, 2 CPU processes (gloo), mnist1d-mlp",
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   "1 thread per process",
        "nccl": "not measured: no GPU was available",
        **result,
        "adabatch_time_over_best_fixed": ada / fixed[best] if ada is not None and best else None,
        "best_fixed": best,
        "wall_seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"overhead (median of {len(result['overhead']['ratios'])} rounds): x{result['overhead']['median_ratio']:.3f}; "
          f"time to target adabatch {ada} s, best fixed {best} {fixed.get(best)} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
