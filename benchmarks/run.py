"""Run every method on every workload over several seeds, then write JSON, a Markdown report and plots.

    python -m benchmarks.run --suite full --jobs 2 --resume --readme README.md   # the issue's suite, 2 processes
    python -m benchmarks.run --suite quick                    # a smaller check
    python -m benchmarks.run --suite full --list              # the plan, with a time estimate
    python -m benchmarks.run --suite full --report-only       # results.json and report from what is done

Results go to ``benchmarks/results/<suite>/`` (``--out``). Each finished run is written at once to
``<out>/raw/<suite>/<workload>/<method>/seed<k>.json``;
``--resume`` skips the runs already there (with the same budget, evaluation interval and target),
so a long suite can be stopped and run in pieces (``--workloads``, ``--methods``, ``--seeds``,
``--shard i/n``). ``--jobs n`` starts n shards side by side, one thread each. At the end,
``results.json`` is assembled from the raw files of the whole plan and the report is rendered.

Runs are interleaved (round-robin over seed x method within each workload, not method by method),
so slow spells of the machine hit every method alike; each process uses one thread.

How long: the full suite is 135 runs (3 seeds; 15 methods on linreg-long, 10 on the others).
Timed on a shared 2-core machine (one seed each, and the pilots): about 14 min of single-core
time for linreg-long, 7 for the MLP, 11 for the CNN and 100 for charlm-adamw (about 3.5 min a
run), some 130 min in all: ``--jobs 2`` takes a little over an hour, less on an idle machine.

Methods: ``fixed-B`` (a sweep of batch sizes, each with the workload's LR schedule sized for its own
budget / B steps and its peak LR scaled from the base batch by the rule adabatch uses: linear for
SGD, sqrt for Adam-family), ``heuristic`` (double the batch when the epoch loss falls below a
threshold), ``ramp`` (linear batch warm-up to the sweep's largest batch over the first quarter of
the budget), ``seesaw`` (Seesaw: LR decay traded for batch doubling), ``adabatch``
(``ControllerConfig()``, the untuned defaults, with the micro-batch free to grow with the batch),
``adabatch-tuned`` (a config tuned on other seeds, where ``benchmarks/tuned/<workload>.json``
exists), optionally ``adabatch-goodput`` / ``adabatch-energy`` (``--methods``), and the peers
``adascale`` and ``adaptdl`` when they import in the peers' interpreter (``--peer-python``, else
``$ADABATCH_PEER_PYTHON``, ``.venv-peers/bin/python``, ``/tmp/venv-peers/bin/python``, or this one).
No batch exceeds the largest power of two that fits in the training set (at most 4096).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse
import json
import math
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
from adabatch.workloads import Workload, get_workload
from benchmarks import loops
from benchmarks.baselines import FixedBatch, LinearRamp, LossThreshold, Seesaw
from benchmarks.peers import PEERS, peer_supports
from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TUNED = Path(__file__).resolve().parent / "tuned"
PILOTS = RESULTS / "pilot"
HEURISTIC = {"ratio": 0.7, "cap": 512}
RAMP_SHARE = 0.25  # the ramp reaches the sweep's largest batch after this share of the budget
MAX_BATCH = 4096  # ControllerConfig's default max_batch
BASELINES = ["heuristic", "ramp", "seesaw"]
ADAPTIVE = ["adabatch", "adabatch-tuned"]
OPTIONAL = ["adabatch-goodput", "adabatch-energy"]  # run only when named in --methods

# Budgets are in training samples; targets are the workloads' own (adabatch.workloads.WORKLOADS).
SUITES: dict[str, dict[str, Any]] = {
    # The suite: realistic optimizers and schedules, noise scale climbing far past the start.
    "full": {
        "seeds": [0, 1, 2],
        "sweep": 5,  # fixed batches: base * 2**k for k < sweep
        "workloads": {"linreg-long": {"budget": 1_600_000, "eval_every": 20_000, "sweep": 9},  # 16 .. 4096
                      "mnist1d-mlp-adamw": {"budget": 400_000, "eval_every": 8_000},
                      "mnist1d-cnn-adamw": {"budget": 320_000, "eval_every": 8_000},
                      "charlm-adamw": {"budget": 100_000, "eval_every": 4_000}},
    },
    # The earlier suite: SGD at a constant LR.
    "quick": {
        "seeds": [0, 1, 2],
        "sweep": 5,
        "workloads": {"linreg": {"budget": 40_000, "eval_every": 1_000},
                      "mnist1d-mlp": {"budget": 96_000, "eval_every": 4_000},
                      "mnist1d-cnn": {"budget": 64_000, "eval_every": 4_000}},
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
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("ADAPTDL_MASTER_PORT", None)  # each AdaptDL process picks its own free port
    return env


def max_batch(n_train: int) -> int:
    """Largest batch any method may use: a power of two within the training set, at most 4096.

    Example:
        >>> max_batch(4000), max_batch(100_000)
        (2048, 4096)
    """
    return min(MAX_BATCH, 2 ** int(math.log2(n_train)))


def sweep(wl: Workload, suite: dict[str, Any]) -> list[int]:
    """The fixed batches: base * 2**k for k below the workload's (else the suite's) ``sweep``."""
    k = suite["workloads"][wl.name].get("sweep", suite["sweep"])
    return [wl.micro_batch * 2 ** i for i in range(k)]


def plan(suite: dict[str, Any], methods: list[str] | None, tuned: Path | None,
         peers: dict[str, dict[str, Any]]) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """Method names per workload, and the methods left out with the reason."""
    out, skipped = {}, []
    for name in suite["workloads"]:
        wl = get_workload(name)
        names = [f"fixed-{b}" for b in sweep(wl, suite)] + BASELINES + ["adabatch"]
        names += [m for m in OPTIONAL if methods is not None and m in methods]
        if tuned is not None and tuned_config(tuned, name) is not None:
            names.append("adabatch-tuned")
        elif methods is None or "adabatch-tuned" in methods:
            skipped.append({"workload": name, "method": "adabatch-tuned",
                            "why": f"no tuned config for it under {tuned} (a study on other seeds, see "
                                   "benchmarks/tuning/)" if tuned else "no --tuned-config given"})
        for peer, info in peers.items():
            if not info["available"]:
                continue
            if peer_supports(peer, wl.optimizer):
                names.append(peer)
            elif methods is None or peer in methods:
                skipped.append({"workload": name, "method": peer,
                                "why": f"validated for SGD only; this workload trains with {wl.optimizer}"})
        out[name] = [m for m in names if methods is None or m in methods]
    return out, skipped


def tuned_config(path: Path, workload: str) -> ControllerConfig | None:
    """A file applies to every workload; a directory holds ``<workload>.json`` per workload."""
    file = path / f"{workload}.json" if path.is_dir() else path
    return ControllerConfig.load(file) if file.exists() else None


def run_one(method: str, workload: str, seed: int, spec: dict[str, Any], sweep_max: int, tuned: Path | None,
            peer_python: str) -> dict[str, Any]:
    wl = get_workload(workload)
    budget, every = spec["budget"], spec["eval_every"]
    data = wl.make_data(seed)
    ceiling = max_batch(len(data.x_train))
    if method in PEERS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            cmd = [peer_python, "-W", "ignore", "-m", "benchmarks.peers", "--method", method, "--workload", workload,
                   "--seed", str(seed), "--budget", str(budget), "--eval-every", str(every),
                   "--max-batch", str(ceiling), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip()[-2000:])
            return json.loads(out.read_text())
    baseline = None
    if method.startswith("fixed-"):
        baseline = FixedBatch(wl, budget, int(method.split("-")[1]))
    elif method == "heuristic":
        baseline = LossThreshold(wl, budget, HEURISTIC["ratio"], min(HEURISTIC["cap"], ceiling))
    elif method == "ramp":
        baseline = LinearRamp(wl, budget, end=min(sweep_max, ceiling), share=RAMP_SHARE)
    elif method == "seesaw":
        baseline = Seesaw(wl, budget, max_batch=ceiling)
    if baseline is not None:
        return loops.train_baseline(wl, data, seed, baseline, every, method)
    config = {"adabatch": ControllerConfig(), "adabatch-goodput": ControllerConfig(policy="goodput"),
              "adabatch-energy": ControllerConfig(policy="energy")}.get(method)
    if method == "adabatch-tuned":
        config = tuned_config(tuned, workload)
    if config is None:
        raise ValueError(f"unknown method {method!r}")
    # memory is no limit on these workloads: let the micro-batch follow the batch, up to the ceiling
    top = min(config.max_batch, ceiling)
    config = config.replace(max_batch=top, max_micro_batch=top)
    return loops.train_adabatch(wl, data, seed, config, budget, every, method)


# ----------------------------------------------------------------------------- raw results, resume


def raw_path(out: Path, suite: str, workload: str, method: str, seed: int) -> Path:
    return out / "raw" / suite / workload / method / f"seed{seed}.json"


def _matches(run: dict[str, Any], spec: dict[str, Any], target: float) -> bool:
    return run.get("budget") == spec["budget"] and run.get("eval_every") == spec["eval_every"] \
        and run.get("target") == target


def load_finished(path: Path, spec: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The stored run at ``path`` if it was run with this budget, evaluation interval and target."""
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run if _matches(run, spec, target) else None


def _write(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=_json_default))
    tmp.replace(path)  # a run killed mid-write never leaves half a file


def _code_version() -> str | None:
    proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() or None


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description="adabatch benchmarks: adaptive vs fixed batch sizes, baselines and peers.")
    p.add_argument("--suite", choices=sorted(SUITES), default="full")
    p.add_argument("--out", type=Path, help="folder for results.json, report.md, PNGs and raw/ "
                                             "(default: benchmarks/results/<suite>/)")
    p.add_argument("--workloads", nargs="+", help="subset of the suite's workloads")
    p.add_argument("--methods", nargs="+", help="subset of method names (e.g. fixed-32 adabatch seesaw)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every budget and evaluation interval by this (a short look at a suite; "
                        "targets stay, so a short run may not reach them)")
    p.add_argument("--tuned-config", type=Path, default=TUNED,
                   help="ControllerConfig JSON, or a folder of <workload>.json, from studies on other seeds "
                        "(default: benchmarks/tuned/)")
    p.add_argument("--peer-python", help="interpreter with fairscale/adaptdl installed")
    p.add_argument("--no-peers", action="store_true", help="skip AdaScale and AdaptDL")
    p.add_argument("--resume", action="store_true", help="skip runs already in <out>/raw/ (same budget and target)")
    p.add_argument("--shard", default="0/1", help="run only jobs i, i+n, i+2n, ... of the plan (i/n)")
    p.add_argument("--jobs", type=int, default=1, help="run n shards side by side, one process each")
    p.add_argument("--list", action="store_true", help="print the plan (and a time estimate) and exit")
    p.add_argument("--report-only", action="store_true", help="assemble results.json from raw/ and render")
    p.add_argument("--no-report", action="store_true", help="write raw runs only (used by --jobs)")
    p.add_argument("--readme", type=Path, help="also write the results into this README, between its "
                                               "benchmark markers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / (args.suite if args.scale == 1.0 else f"{args.suite}-scale{args.scale:g}")

    torch.set_num_threads(1)
    suite = dict(SUITES[args.suite])
    if args.workloads:
        unknown = set(args.workloads) - set(suite["workloads"])
        if unknown:
            p.error(f"--workloads {sorted(unknown)} are not in suite {args.suite!r}: {sorted(suite['workloads'])}")
        suite["workloads"] = {k: v for k, v in suite["workloads"].items() if k in args.workloads}
    if args.scale != 1.0:
        suite["workloads"] = {k: {**v, "budget": int(v["budget"] * args.scale),
                                  "eval_every": max(1, int(v["eval_every"] * args.scale))}
                              for k, v in suite["workloads"].items()}
    seeds = args.seeds or suite["seeds"]
    peer_python = find_peer_python(args.peer_python)
    peers = ({k: {"available": False, "error": "skipped (--no-peers)"} for k in PEERS} if args.no_peers
             else probe_peers(peer_python))
    tuned = args.tuned_config if args.tuned_config and args.tuned_config.exists() else None
    methods, skipped = plan(suite, args.methods, tuned, peers)

    # Round-robin: for each workload, seed-major, every method once per seed.
    jobs = [(w, s, m) for w in suite["workloads"] for s in seeds for m in methods[w]]
    targets = {w: get_workload(w).target for w in suite["workloads"]}
    shard, shards = (int(x) for x in args.shard.split("/"))
    if args.list:
        _print_plan(jobs, suite, args.out, args.suite, targets)
        return None
    if args.jobs > 1 and not args.report_only:
        base = _drop_option(_drop_option(list(argv if argv is not None else sys.argv[1:]), "--jobs"), "--shard")
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.run", *base, "--no-report", "--no-progress",
                                   "--shard", f"{i}/{args.jobs}"], cwd=ROOT, env=_env())
                 for i in range(args.jobs)]
        codes = [proc.wait() for proc in procs]
        if any(codes):
            print(f"shards exited with {codes}", file=sys.stderr)
    elif not args.report_only:
        _run_jobs(jobs[shard::shards], suite, args, tuned, peer_python, targets)
    if args.no_report:
        return None
    return _assemble(jobs, suite, args, seeds, methods, skipped, peers, tuned, targets)


def _drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if not a.startswith(name + "="):
            out.append(a)
    return out


def _run_jobs(jobs, suite, args, tuned, peer_python, targets) -> None:
    from tqdm.auto import tqdm

    code = _code_version()
    for workload, seed, method in tqdm(jobs, desc="benchmark runs", unit="run", disable=args.no_progress):
        spec = suite["workloads"][workload]
        path = raw_path(args.out, args.suite, workload, method, seed)
        if args.resume and load_finished(path, spec, targets[workload]) is not None:
            continue
        failed = path.with_name(f"seed{seed}.failed.json")
        t0 = time.time()
        sweep_max = max(sweep(get_workload(workload), suite))
        try:
            run = run_one(method, workload, seed, spec, sweep_max, tuned, peer_python)
        except Exception as exc:  # a failing method is reported, never silently dropped
            _write(failed, {"method": method, "workload": workload, "seed": seed,
                            "error": f"{type(exc).__name__}: {exc}"[-2000:],
                            "traceback": traceback.format_exc()[-4000:]})
            continue
        run.update(eval_every=spec["eval_every"], run_wall_seconds=time.time() - t0, code_version=code)
        _write(path, run)
        failed.unlink(missing_ok=True)


def _assemble(jobs, suite, args, seeds, methods, skipped, peers, tuned, targets) -> Path:
    runs, failures, missing = [], [], []
    for workload, seed, method in jobs:
        spec = suite["workloads"][workload]
        path = raw_path(args.out, args.suite, workload, method, seed)
        run = load_finished(path, spec, targets[workload])
        failed = path.with_name(f"seed{seed}.failed.json")
        if run is not None:
            runs.append(run)
        elif failed.exists():
            failures.append(json.loads(failed.read_text()))
        else:
            missing.append({"workload": workload, "method": method, "seed": seed})
    results = {
        "suite": args.suite, "seeds": seeds, "workloads": suite["workloads"], "methods": methods,
        "heuristic": HEURISTIC, "ramp_share": RAMP_SHARE, "peers": peers, "skipped": skipped,
        "tuned_config": str(tuned) if tuned else None,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
        "total_seconds": sum(r.get("run_wall_seconds", 0.0) for r in runs),
        "runs": runs, "failures": failures, "missing": missing,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(results, default=_json_default))
    report = write_report(path, args.out, readme=args.readme, overhead=RESULTS / "overhead.json",
                          estimator=RESULTS / "estimator.json")
    print(f"wrote {path} and {report} ({len(runs)} runs, {len(failures)} failed, {len(missing)} not run yet)")
    return report


def _print_plan(jobs, suite, out: Path, suite_name: str, targets) -> None:
    """Jobs per workload, how many are done, and the single-core time left: from the runs already
    timed in ``out``, else from the pilot's fixed-batch runs (``benchmarks/results/pilot/``)."""
    total_left = 0.0
    for workload in suite["workloads"]:
        spec = suite["workloads"][workload]
        timed, left = [], 0
        for w, seed, method in jobs:
            if w != workload:
                continue
            run = load_finished(raw_path(out, suite_name, w, method, seed), spec, targets[w])
            if run is not None and "run_wall_seconds" in run:
                timed.append(run["run_wall_seconds"])
            else:
                left += 1
        source = "runs done here"
        if not timed:
            pilot = PILOTS / f"{workload}.json"
            if pilot.exists():
                record = json.loads(pilot.read_text())
                scale = spec["budget"] / record["budget"]
                timed = [r["run_wall_seconds"] * scale for r in record["runs"].values()]
                source = "the pilot's fixed batches"
        per_run = sum(timed) / len(timed) if timed else math.nan
        note = f", ~{left * per_run / 60:.0f} min left at {per_run:.0f} s per run ({source})" if timed else ""
        total_left += left * per_run if timed else 0.0
        print(f"{workload}: {sum(w == workload for w, _, _ in jobs)} runs, {left} left{note}")
    print(f"{len(jobs)} runs in all; ~{total_left / 60:.0f} min of single-core time left "
          "(peers and evaluation add to it; --jobs n divides it among n cores)")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


if __name__ == "__main__":
    main()
