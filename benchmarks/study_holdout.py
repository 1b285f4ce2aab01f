"""Does the quick study tune? What it exports against the default config, on seeds it never saw.

    python -m benchmarks.study_holdout                # the quick study, ~4 min on 2 cores
    python -m benchmarks.study_holdout --study studies/mnist1d_sgd.toml      # ~3 min

Runs a study file (``studies/mnist1d_quick.toml`` unless ``--study`` names another) from scratch into a temporary SQLite file with the CLI (as a
user would), including its ``[verify]`` stage, and exports the chosen config. Then trains the
study's workload for the study's sample budget on held-out seeds with three configs: the default
(``[fixed]`` alone), the exported one (chosen by the verification runs), and the trial that ranks
first on its own seeds (what the study would export without verification). Configs that coincide
are trained once. Reports the final accuracy of each (the study's objective), each one's per-seed
difference to the default with a bootstrap interval and a one-sided Wilcoxon test, and the
seconds of each run. Results: ``benchmarks/results/study_holdout.json`` for the quick study,
``study_holdout_<file name>.json`` for another.
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

import optuna
import torch
from scipy import stats

from adabatch.config import ControllerConfig
from adabatch.study import StudySpec, load_study, trial_config
from adabatch.workloads import train
from benchmarks.stats import median_ci

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "mnist1d_quick.toml"
RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = list(range(101, 111))


def _cli(*args: str, show: bool = False) -> str:
    """Run the CLI; ``show`` lets its output (the study's progress) through to the terminal."""
    proc = subprocess.run([sys.executable, "-m", "adabatch.cli", *args], capture_output=not show, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"adabatch {' '.join(args)} failed ({proc.returncode}): {(proc.stderr or '').strip()[-500:]}")
    return proc.stdout or ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=HELD_OUT, help="held-out seeds (the study uses its own)")
    p.add_argument("--study", type=Path, default=STUDY, help="study file (default: the quick study)")
    p.add_argument("--out", type=Path, help="results file (default: benchmarks/results/study_holdout[_NAME].json)")
    args = p.parse_args(argv)
    out = args.out or RESULTS / ("study_holdout.json" if args.study.resolve() == STUDY
                                 else f"study_holdout_{args.study.stem}.json")
    torch.set_num_threads(1)
    parsed = StudySpec.from_toml(args.study)
    spec = tomllib.loads(args.study.read_text())
    study, fixed = spec["study"], spec.get("fixed", {})
    study.setdefault("sample_budget", parsed.budget())
    study.setdefault("eval_every", parsed.eval_interval())
    own = set(parsed.trial_seeds()) | set(parsed.verify_seeds())
    if set(args.seeds) & own:
        raise SystemExit(f"--seeds must leave out the study's own seeds {sorted(own)}")
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/study.db"
        print(f"running {args.study.name} ({study['n_trials']} trials) ...", flush=True)
        _cli("study", "run", str(args.study), "--storage", storage, "--no-progress", show=True)
        shown = _cli("study", "show", study["name"], "--storage", storage)
        best_path = Path(tmp) / "best.json"
        exported_line = _cli("study", "export", study["name"], "-o", str(best_path), "--storage", storage)
        verified = _cli("study", "best", study["name"], "--storage", storage)
        exported = ControllerConfig.load(best_path)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        stored = load_study(study["name"], storage)
        top_own = trial_config(stored, stored.best_trial)  # Optuna's pick: the best mean on the trials' seeds
        top_own_number = stored.best_trial.number
    default = ControllerConfig(**fixed)
    counts = {state: shown.count(state) for state in ("COMPLETE", "PRUNED", "FAIL")}
    configs = {"default": default, "exported": exported, "top_by_own_seeds": top_own}
    rows = []
    for seed in args.seeds:
        row: dict = {"seed": seed}
        for name, cfg in configs.items():
            same = next((other for other in row if other != "seed" and configs[other] == cfg), None)
            if same is not None:  # the same config trains the same run: trained once
                row[name] = row[same]
                continue
            r = train(study["workload"], cfg, seed=seed, sample_budget=study["sample_budget"],
                      eval_every=study["eval_every"])
            row[name] = {"final_metric": r.final_metric, "seconds": r.wall_seconds, "steps": r.steps,
                         "final_batch": r.history[-1]["batch"]}
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{n} {row[n]['final_metric']:.4f}" for n in configs), flush=True)
    summary: dict = {
        "study": args.study.name, "trials": counts, "held_out_seeds": args.seeds,
        "export": exported_line.strip(), "verification": verified.strip().splitlines(),
        "exported_is_default": exported == default, "top_by_own_seeds_trial": top_own_number,
        "median_default": statistics.median(r["default"]["final_metric"] for r in rows),
    }
    for name in ("exported", "top_by_own_seeds"):
        diffs = [r[name]["final_metric"] - r["default"]["final_metric"] for r in rows]
        diff_ci = median_ci(diffs)
        # one-sided: does this config score higher than the default on unseen seeds?
        p_value = float(stats.wilcoxon(diffs, alternative="greater").pvalue) if any(diffs) else 1.0
        summary[name] = {
            "config_vs_default": configs[name].diff(default),
            "median": statistics.median(r[name]["final_metric"] for r in rows),
            "median_difference": statistics.median(diffs), "median_difference_ci": diff_ci.ci,
            "mean_difference": statistics.fmean(diffs), "wilcoxon_p_greater": p_value,
            "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "median_seconds": statistics.median(r[name]["seconds"] for r in rows),
        }
        lo, hi = diff_ci.ci or (math.nan, math.nan)
        print(f"{name}: beats the default on {summary[name]['wins']} of {len(diffs)} held-out seeds, loses on "
              f"{summary[name]['losses']} ({summary[name]['ties']} ties); median accuracy {summary[name]['median']:.4f} "
              f"vs {summary['median_default']:.4f}, difference {summary[name]['median_difference']:+.4f} "
              f"[{lo:+.4f}, {hi:+.4f}], Wilcoxon p = {p_value:.3f}")
    summary["median_seconds_default"] = statistics.median(r["default"]["seconds"] for r in rows)
    summary["runs"] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
