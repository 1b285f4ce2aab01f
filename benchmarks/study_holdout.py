"""Does the quick study tune? Its best trial against the default config, on seeds it never saw.

    python -m benchmarks.study_holdout                # ~2 min on 2 cores

Runs ``studies/mnist1d_quick.toml`` from scratch into a temporary SQLite file with the CLI (as a
user would), exports the best trial's config, then trains the study's workload for the study's
sample budget with that config and with ``ControllerConfig()`` (the same ``[fixed]`` settings) on
held-out seeds, alternating the two so the machine's load falls on both alike. Reports the final
accuracy of each (the study's objective), their per-seed difference, and time to the end of the
budget. Results: ``benchmarks/results/study_holdout.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import torch
from scipy import stats

from adabatch.config import ControllerConfig
from adabatch.workloads import train
from benchmarks.stats import median_ci

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "mnist1d_quick.toml"
RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = list(range(101, 111))


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "adabatch.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"adabatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=HELD_OUT, help="held-out seeds (the study uses its own)")
    p.add_argument("--out", type=Path, default=RESULTS / "study_holdout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = tomllib.loads(STUDY.read_text())
    study, fixed = spec["study"], spec.get("fixed", {})
    own = set(range(study["seed"], study["seed"] + study.get("seeds_per_trial", 1)))
    if set(args.seeds) & own:
        raise SystemExit(f"--seeds must leave out the study's own seeds {sorted(own)}")
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/study.db"
        print(f"running {STUDY.name} ({study['n_trials']} trials) ...", flush=True)
        _cli("study", "run", str(STUDY), "--storage", storage)
        shown = _cli("study", "show", study["name"], "--storage", storage)
        best_path = Path(tmp) / "best.json"
        _cli("study", "export", study["name"], "-o", str(best_path), "--storage", storage)
        best = ControllerConfig.load(best_path)
    default = ControllerConfig(**fixed)
    counts = {state: shown.count(state) for state in ("COMPLETE", "PRUNED", "FAIL")}
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name, cfg in (("default", default), ("best", best)):
            r = train(study["workload"], cfg, seed=seed, sample_budget=study["sample_budget"],
                      eval_every=study["eval_every"])
            row[name] = {"final_metric": r.final_metric, "seconds": r.wall_seconds, "steps": r.steps,
                         "final_batch": r.history[-1]["batch"]}
        row["difference"] = row["best"]["final_metric"] - row["default"]["final_metric"]
        rows.append(row)
        print(f"seed {seed}: default {row['default']['final_metric']:.4f}, best {row['best']['final_metric']:.4f}",
              flush=True)
    diffs = [r["difference"] for r in rows]
    diff_ci = median_ci(diffs)
    # one-sided: does the best trial's config score higher than the default on unseen seeds?
    p_value = float(stats.wilcoxon(diffs, alternative="greater").pvalue) if any(diffs) else 1.0
    summary = {
        "study": STUDY.name, "trials": counts, "held_out_seeds": args.seeds,
        "best_config_vs_default": best.diff(default),
        "median_default": statistics.median(r["default"]["final_metric"] for r in rows),
        "median_best": statistics.median(r["best"]["final_metric"] for r in rows),
        "median_difference": statistics.median(diffs), "median_difference_ci": diff_ci.ci,
        "mean_difference": statistics.fmean(diffs), "wilcoxon_p_greater": p_value,
        "best_wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
        "median_seconds_default": statistics.median(r["default"]["seconds"] for r in rows),
        "median_seconds_best": statistics.median(r["best"]["seconds"] for r in rows),
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    lo, hi = diff_ci.ci or (math.nan, math.nan)
    print(f"best beats default on {summary['best_wins']} of {len(diffs)} held-out seeds ({summary['ties']} ties); "
          f"median accuracy {summary['median_best']:.4f} vs {summary['median_default']:.4f}, difference "
          f"{summary['median_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}], Wilcoxon p = {p_value:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
