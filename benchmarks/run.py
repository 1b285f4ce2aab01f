"""Run every method on every workload over several seeds, then write JSON, a Markdown report and plots.

    python -m benchmarks.run --suite quick           # ~10 min on 2 CPU cores
    python -m benchmarks.run --suite full            # about an hour; adds charlm and more seeds
    python -m benchmarks.run --suite quick --tuned-config tuned.json   # adds adabatch-tuned

Runs are interleaved (round-robin over seed x method within each workload, not method by method),
so slow spells of the machine hit every method alike; each process uses one thread.

Methods: ``fixed-B`` (a sweep of batch sizes, LR scaled from the workload's base batch by the
linear rule for SGD, sqrt for Adam), ``heuristic`` (double the batch when the epoch loss falls
below a threshold), ``adabatch`` (``ControllerConfig()`` with the micro-batch free to grow with the
batch, ``max_micro_batch``), ``adabatch-goodput`` (the time-optimal goodput policy),
``adabatch-energy`` (``policy="energy"``, progress per joule), ``adabatch-tuned`` (a config file,
when given, with the same micro-batch growth), and the peers ``adascale``
and ``adaptdl`` when their packages import in the peers' interpreter (``--peer-python``, else
``$ADABATCH_PEER_PYTHON``, ``.venv-peers/bin/python``, ``/tmp/venv-peers/bin/python``, or this one).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from adabatch import ControllerConfig
from adabatch.workloads import get_workload
from benchmarks import loops
from benchmarks.peers import PEERS
from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
HEURISTIC = {"ratio": 0.7, "cap": 512}

# Budgets are in training samples; targets are the workloads' own (adabatch.workloads.WORKLOADS).
SUITES: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": [0, 1, 2],
        "sweep": 5,  # fixed batches: base * 2**k for k < sweep
        "workloads": {"linreg": {"budget": 40_000, "eval_every": 1_000},
                      "mnist1d-mlp": {"budget": 96_000, "eval_every": 4_000},
                      "mnist1d-cnn": {"budget": 64_000, "eval_every": 4_000}},
    },
    "full": {
        "seeds": [0, 1, 2, 3, 4],
        "sweep": 6,
        "workloads": {"linreg": {"budget": 100_000, "eval_every": 1_000},
                      "mnist1d-mlp": {"budget": 160_000, "eval_every": 4_000},
                      "mnist1d-cnn": {"budget": 160_000, "eval_every": 4_000},
                      "charlm": {"budget": 40_000, "eval_every": 2_000}},
    },
    # For tests: seconds, not minutes.
    "smoke": {
        "seeds": [0, 1],
        "sweep": 1,
        "workloads": {"linreg": {"budget": 4_000, "eval_every": 1_000}},
    },
}


def find_peer_python(explicit: str | None) -> str:
    candidates = [explicit, os.environ.get("ADABATCH_PEER_PYTHON"), str(ROOT / ".venv-peers/bin/python"),
                  "/tmp/venv-peers/bin/python", sys.executable]
    return next(c for c in candidates if c and Path(c).exists())


def probe_peers(python: str) -> dict[str, dict[str, Any]]:
    """Which peers import in ``python``; the error text of those that do not."""
    out = {}
    for name, module in PEERS.items():
        proc = subprocess.run([python, "-W", "ignore", "-c", f"import {module}"], capture_output=True, text=True,
                              env=_env(), cwd=ROOT)
        err = proc.stderr.strip().splitlines()
        out[name] = {"available": proc.returncode == 0, "python": python, "module": module,
                     "error": err[-1] if proc.returncode and err else None}
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("ADAPTDL_MASTER_PORT", None)  # each AdaptDL process picks its own free port
    return env


def plan(suite: dict[str, Any], methods: list[str] | None, tuned: Path | None,
         peers: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Method names per workload."""
    out = {}
    for name in suite["workloads"]:
        wl = get_workload(name)
        names = [f"fixed-{wl.micro_batch * 2 ** k}" for k in range(suite["sweep"])]
        names += ["heuristic", "adabatch", "adabatch-goodput", "adabatch-energy"]
        if tuned is not None and tuned_config(tuned, name) is not None:
            names.append("adabatch-tuned")
        names += [p for p, info in peers.items() if info["available"]]
        out[name] = [m for m in names if methods is None or m in methods]
    return out


def tuned_config(path: Path, workload: str) -> ControllerConfig | None:
    """A file applies to every workload; a directory holds ``<workload>.json`` per workload."""
    file = path / f"{workload}.json" if path.is_dir() else path
    return ControllerConfig.load(file) if file.exists() else None


def run_one(method: str, workload: str, seed: int, spec: dict[str, Any], tuned: Path | None,
            peer_python: str) -> dict[str, Any]:
    wl = get_workload(workload)
    budget, every = spec["budget"], spec["eval_every"]
    if method in PEERS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            cmd = [peer_python, "-W", "ignore", "-m", "benchmarks.peers", "--method", method, "--workload", workload,
                   "--seed", str(seed), "--budget", str(budget), "--eval-every", str(every), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip()[-2000:])
            return json.loads(out.read_text())
    data = wl.make_data(seed)
    if method.startswith("fixed-"):
        return loops.train_fixed(wl, data, seed, int(method.split("-")[1]), budget, every)
    if method == "heuristic":
        return loops.train_fixed(wl, data, seed, wl.micro_batch, budget, every, heuristic=HEURISTIC,
                                 method="heuristic")
    config = {"adabatch": ControllerConfig(), "adabatch-goodput": ControllerConfig(policy="goodput"),
              "adabatch-energy": ControllerConfig(policy="energy")}.get(method)
    if method == "adabatch-tuned":
        config = tuned_config(tuned, workload)
    if config is not None:  # memory is no limit on these workloads: let the micro-batch follow the batch
        config = config.replace(max_micro_batch=config.max_batch)
    if config is None:
        raise ValueError(f"unknown method {method!r}")
    return loops.train_adabatch(wl, data, seed, config, budget, every, method)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="adabatch benchmarks: adaptive vs fixed batch sizes and peers.")
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for results.json, report.md and PNGs")
    p.add_argument("--workloads", nargs="+", help="subset of the suite's workloads")
    p.add_argument("--methods", nargs="+", help="subset of method names (e.g. fixed-32 adabatch)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    p.add_argument("--tuned-config", type=Path, help="ControllerConfig JSON (or a folder of <workload>.json) "
                                                     "from a study tuned on other seeds; adds adabatch-tuned")
    p.add_argument("--peer-python", help="interpreter with fairscale/adaptdl installed")
    p.add_argument("--no-peers", action="store_true", help="skip AdaScale and AdaptDL")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    suite = dict(SUITES[args.suite])
    if args.workloads:
        suite["workloads"] = {k: v for k, v in suite["workloads"].items() if k in args.workloads}
    seeds = args.seeds or suite["seeds"]
    peer_python = find_peer_python(args.peer_python)
    peers = ({k: {"available": False, "error": "skipped (--no-peers)"} for k in PEERS} if args.no_peers
             else probe_peers(peer_python))
    tuned = args.tuned_config
    if tuned is not None and not tuned.exists():
        p.error(f"--tuned-config {tuned} does not exist")
    methods = plan(suite, args.methods, tuned, peers)

    # Round-robin: for each workload, seed-major, every method once per seed.
    jobs = [(w, s, m) for w in suite["workloads"] for s in seeds for m in methods[w]]
    runs, failures = [], []
    from tqdm.auto import tqdm

    t0 = time.time()
    for workload, seed, method in tqdm(jobs, desc="benchmark runs", unit="run", disable=args.no_progress):
        try:
            runs.append(run_one(method, workload, seed, suite["workloads"][workload], tuned, peer_python))
        except Exception as exc:  # a failing method is reported, never silently dropped
            failures.append({"method": method, "workload": workload, "seed": seed,
                             "error": f"{type(exc).__name__}: {exc}"[-2000:],
                             "traceback": traceback.format_exc()[-4000:]})
    results = {
        "suite": args.suite, "seeds": seeds, "workloads": suite["workloads"], "methods": methods,
        "heuristic": HEURISTIC, "peers": peers,
        "tuned_config": str(tuned) if tuned else None,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
        "total_seconds": time.time() - t0, "runs": runs, "failures": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(results, default=_json_default))
    report = write_report(path, args.out)
    print(f"wrote {path} and {report}")
    return report


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


if __name__ == "__main__":
    main()
