"""Markdown report, README summary and PNG plots, computed from ``results.json`` alone.

    python -m benchmarks.report benchmarks/results/full/results.json                    # re-render the report
    python -m benchmarks.report benchmarks/results/full/results.json --readme README.md  # and README's figures

The goals (issue #10), per workload, for ``adabatch`` with its untuned defaults unless named, each
a ratio of medians over seeds paired by seed, with a 95 % bootstrap interval:

1. time to target / the hindsight-best fixed batch (the fixed batch with the lowest median time to
   target among those reaching it on every seed): <= 1.1;
2. time to target / the median fixed batch of the sweep (per seed, the median over the sweep's
   fixed batches, a batch that never reaches the target counting as infinitely slow): <= 0.8;
3. final metric at the budget no worse than the best fixed batch's (the fixed batch with the best
   median final metric): the median lies within that batch's interval or beyond it;
4. time to target of ``adabatch-tuned`` (tuned on other seeds) / the hindsight-best fixed batch: <= 0.9;
5. steps to target / the smallest fixed batch: <= 0.6, at equal final metric (as in 3, against the
   smallest fixed batch).

A goal is met when its median meets it; the table says so when the interval reaches across the
line. No number is typed in here: every figure comes from the runs in ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import Estimate, median_ci, ratio_ci

INF = math.inf
README_START, README_END = "<!-- benchmark-results:start -->", "<!-- benchmark-results:end -->"
GOAL_LABELS = {"best": "time vs the hindsight-best fixed batch", "median": "time vs the median fixed batch",
               "final": "final metric", "tuned": "tuned time vs the hindsight-best fixed batch",
               "steps": "steps vs the smallest fixed batch"}
GOAL_KEYS = tuple(GOAL_LABELS)
GOALS_TEXT = (
    "Goals of `adabatch` with its untuned defaults (issue #10): time to target <= 1.1x the hindsight-best "
    "fixed batch and <= 0.8x the median fixed batch of the sweep (per seed, a batch that never reaches the "
    "target counts as infinitely slow); final metric at the budget no worse than the best fixed batch's "
    "(within its 95 % interval or beyond); tuned on other seeds (`adabatch-tuned`), <= 0.9x the "
    "hindsight-best fixed batch; steps to target <= 0.6x the smallest fixed batch at equal final metric. "
    "Ratios of medians over seeds, paired by seed, with 95 % bootstrap intervals; a goal is met when its "
    "median meets it.")


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "not reached"
    return f"{x:.{digits}g}"


def fmt_est(e: Estimate, digits: int = 3) -> str:
    if e.ci is None:
        why = f"n={e.n}" if e.n < 3 else "no CI: not every seed reached"
        return f"{_fmt(e.median, digits)} ({why})" if math.isfinite(e.median) else _fmt(e.median, digits)
    return f"{_fmt(e.median, digits)} [{_fmt(e.ci[0], digits)}, {_fmt(e.ci[1], digits)}]"


def _by(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        out[r["workload"]][r["method"]].append(r)
    for w in out.values():
        for rs in w.values():
            rs.sort(key=lambda r: r["seed"])
    return out


def _col(rs: list[dict], key: str) -> list[float]:
    return [INF if r.get(key) is None else float(r[key]) for r in rs]


def _seeds(*groups: list[dict]) -> list[int]:
    common = set.intersection(*({r["seed"] for r in rs} for rs in groups))
    return sorted(common)


def _pick(rs: list[dict], seeds: list[int]) -> list[dict]:
    return [next(r for r in rs if r["seed"] == s) for s in seeds]


def _paired(a: list[dict], b: list[dict], key: str) -> tuple[list[float], list[float]]:
    seeds = _seeds(a, b)
    return _col(_pick(a, seeds), key), _col(_pick(b, seeds), key)


def _fixed(methods: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {m: rs for m, rs in methods.items() if m.startswith("fixed-")}


def hindsight_best(methods: dict[str, list[dict]]) -> str | None:
    """The fixed batch with the lowest median time to target among those reaching it on every seed."""
    ok = {m: float(np.median(_col(rs, "seconds_to_target"))) for m, rs in _fixed(methods).items()
          if all(r["reached_target"] for r in rs)}
    return min(ok, key=ok.get) if ok else None


def best_final(methods: dict[str, list[dict]], higher_is_better: bool) -> str | None:
    """The fixed batch with the best median final metric (NaN, a diverged run, counts as the worst).

    Example:
        >>> runs = lambda *finals: [{"final_metric": f} for f in finals]
        >>> best_final({"fixed-32": runs(0.9, 0.8, 0.85), "fixed-64": runs(0.88, float("nan"), 0.87),
        ...             "adabatch": runs(0.99, 0.99, 0.99)}, higher_is_better=True)
        'fixed-64'
    """
    worst = -INF if higher_is_better else INF
    med = {m: float(np.median([worst if math.isnan(v) else v for v in _col(rs, "final_metric")]))
           for m, rs in _fixed(methods).items()}
    if not med:
        return None
    return (max if higher_is_better else min)(med, key=med.get)


def smallest_fixed(methods: dict[str, list[dict]]) -> str | None:
    return min(_fixed(methods), key=lambda m: int(m.split("-")[1]), default=None)


def median_fixed_times(methods: dict[str, list[dict]]) -> list[dict]:
    """Per seed, a pseudo-run whose time to target is the median over the sweep's fixed batches.

    Example:
        >>> run = lambda seed, t: {"seed": seed, "seconds_to_target": t}
        >>> median_fixed_times({"fixed-32": [run(0, 9.0)], "fixed-64": [run(0, 4.0)], "fixed-128": [run(0, None)]})
        [{'seed': 0, 'seconds_to_target': 9.0}]
    """
    fixed = _fixed(methods)
    if not fixed:
        return []
    seeds = _seeds(*fixed.values())
    return [{"seed": s, "seconds_to_target": float(np.median(
        [INF if r["seconds_to_target"] is None else r["seconds_to_target"]
         for rs in fixed.values() for r in rs if r["seed"] == s]))} for s in seeds]


@dataclass
class Goal:
    """One line of the goals table: the figure, the line it must meet, and whether it does."""

    key: str  # best, median, final, tuned, steps
    name: str
    value: str
    line: str
    met: bool | None  # None: cannot be judged from these runs
    note: str = ""

    @property
    def verdict(self) -> str:
        word = {True: "yes", False: "no", None: "n/a"}[self.met]
        return f"{word} ({self.note})" if self.note else word


def _ratio_goal(key: str, name: str, est: Estimate, line: float) -> Goal:
    x = est.median
    if math.isnan(x):
        return Goal(key, name, fmt_est(est), f"<= {line}", None, "neither reached the target")
    if math.isinf(x):
        return Goal(key, name, fmt_est(est), f"<= {line}", False, "not reached on most seeds")
    met = x <= line
    note = ""
    value = fmt_est(est)
    if x == 0:
        value, note = "0: reached, the reference not", "the reference did not reach the target on most seeds"
    elif est.ci is not None and (est.ci[1] > line if met else est.ci[0] <= line):
        note = "the interval reaches across the line"
    return Goal(key, name, value, f"<= {line}", met, note)


def no_worse(candidate: list[dict], reference: list[dict], higher_is_better: bool) -> tuple[bool | None, str]:
    """Whether the candidate's median final metric lies within the reference's 95 % interval or beyond it."""
    a = median_ci(_col(candidate, "final_metric"))
    b = median_ci(_col(reference, "final_metric"))
    text = f"{_fmt(a.median, 4)} vs {fmt_est(b, 4)}"
    if b.ci is None or math.isnan(a.median):
        return None, text
    return (a.median >= b.ci[0] if higher_is_better else a.median <= b.ci[1]), text


def goals(methods: dict[str, list[dict]], higher_is_better: bool) -> list[Goal]:
    """The five goals of the module docstring for one workload's runs (empty without ``adabatch``)."""
    ada = methods.get("adabatch")
    if not ada:
        return []
    out = []
    best = hindsight_best(methods)
    if best:
        out.append(_ratio_goal("best", f"time adabatch / {best} (hindsight-best fixed)",
                               ratio_ci(*_paired(ada, methods[best], "seconds_to_target")), 1.1))
    else:
        why = "no fixed batch reached the target on every seed" if _fixed(methods) else "no fixed batch was run"
        out.append(Goal("best", "time adabatch / hindsight-best fixed", why, "<= 1.1", None))
    ref = median_fixed_times(methods)
    if ref:
        out.append(_ratio_goal("median", "time adabatch / median fixed batch of the sweep",
                               ratio_ci(*_paired(ada, ref, "seconds_to_target")), 0.8))
    top = best_final(methods, higher_is_better)
    if top:
        met, text = no_worse(ada, methods[top], higher_is_better)
        out.append(Goal("final", f"final metric adabatch vs {top} (best fixed)", text, "within its interval or better",
                        met, "" if met is not None else "no interval: fewer than 3 seeds"))
    tuned = methods.get("adabatch-tuned")
    if tuned and best:
        out.append(_ratio_goal("tuned", f"time adabatch-tuned / {best} (hindsight-best fixed)",
                               ratio_ci(*_paired(tuned, methods[best], "seconds_to_target")), 0.9))
    else:
        out.append(Goal("tuned", "time adabatch-tuned / hindsight-best fixed",
                        "not run" if not tuned else "no reference", "<= 0.9", None))
    small = smallest_fixed(methods)
    if small:
        steps = _ratio_goal("steps", f"steps adabatch / {small} (smallest fixed), at equal final metric",
                            ratio_ci(*_paired(ada, methods[small], "steps_to_target")), 0.6)
        equal, text = no_worse(ada, methods[small], higher_is_better)
        steps.value += f"; final {text}"
        if steps.met and equal is not True:
            steps.met, steps.note = (None, "final metric: no interval") if equal is None else \
                (False, "final metric worse than the smallest fixed batch's interval")
        out.append(steps)
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per workload and method: medians with CIs, time relative to the hindsight-best fixed batch; goals."""
    out: dict[str, Any] = {}
    for wl, methods in _by(results["runs"]).items():
        first = next(iter(methods.values()))[0]
        higher = first["metric"] == "accuracy"
        best = hindsight_best(methods)
        rows = {}
        for m, rs in methods.items():
            rows[m] = {
                "reached": sum(r["reached_target"] for r in rs), "n": len(rs),
                "diverged": sum(r.get("diverged", False) for r in rs),
                **{k: median_ci(_col(rs, k)) for k in
                   ("seconds_to_target", "steps_to_target", "samples_to_target", "joules_to_target",
                    "final_metric", "seconds", "steps")},
                "time_vs_best": ratio_ci(*_paired(rs, methods[best], "seconds_to_target")) if best else None,
            }
        out[wl] = {"rows": rows, "hindsight_best": best, "smallest_fixed": smallest_fixed(methods),
                   "best_final": best_final(methods, higher), "goals": goals(methods, higher),
                   "metric": first["metric"], "target": first["target"], "noise_error": _noise_error(methods)}
    return out


def _noise_error(methods: dict[str, list[dict]]) -> dict[str, Estimate]:
    """Median |estimate / exact - 1| of the noise scale per adabatch run, where the exact one is known."""
    out = {}
    for m, rs in methods.items():
        per_run = []
        for r in rs:
            exact = [e for e in r["evals"] if "true_noise_scale" in e]
            # an estimate that is not finite yet (|G|^2 <= 0 after too few measurements) counts as inf
            errs = [abs(e["noise_scale"] / e["true_noise_scale"] - 1) if math.isfinite(e.get("noise_scale", math.nan))
                    else INF for e in exact]
            if errs:
                per_run.append(float(np.median(errs)))
        if per_run:
            out[m] = median_ci(per_run)
    return out


# ----------------------------------------------------------------------------- plots


def plots(results: dict[str, Any], out_dir: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, list[str]] = {}
    for wl, methods in _by(results["runs"]).items():
        names = list(methods)
        colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(names)}
        metric = next(iter(methods.values()))[0]["metric"]
        target = next(iter(methods.values()))[0]["target"]

        fig, (ax_b, ax_n) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
        for m, rs in methods.items():
            for i, r in enumerate(rs):
                ev = r["evals"]
                ax_b.step([e["samples"] for e in ev], [e["batch"] for e in ev], where="post", color=colors[m],
                          alpha=0.8, lw=1.2, label=m if i == 0 else None)
                if any("noise_scale" in e for e in ev):
                    ax_n.plot([e["samples"] for e in ev], [e.get("noise_scale", math.nan) for e in ev],
                              color=colors[m], lw=1.2, label=f"{m} (estimate)" if i == 0 else None)
                if any("true_noise_scale" in e for e in ev):
                    ax_n.plot([e["samples"] for e in ev], [e["true_noise_scale"] for e in ev], color=colors[m],
                              ls=":", lw=1.2, label=f"{m} run: exact" if i == 0 else None)
        ax_b.set(yscale="log", ylabel="batch size (samples/step)",
                 title=f"{wl}: batch size and noise scale, every seed")
        ax_n.set(yscale="log", xlabel="training samples", ylabel="noise scale B_simple")
        ax_b.legend(fontsize=7, ncol=3)
        if ax_n.get_legend_handles_labels()[0]:
            ax_n.legend(fontsize=7)
        fig.tight_layout()
        batch_png = f"{wl}_batch_noise.png"
        fig.savefig(out_dir / batch_png, dpi=80)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, key, label in ((axes[0], "seconds", "training wall time (s)"),
                               (axes[1], "joules", "training energy (J, see source)")):
            for m, rs in methods.items():
                for i, r in enumerate(rs):
                    ev = r["evals"]
                    ax.plot([e[key] for e in ev], [e[metric] for e in ev], color=colors[m], lw=1.1, alpha=0.8,
                            label=m if i == 0 else None)
            ax.axhline(target, color="k", ls="--", lw=0.8)
            ax.set(xlabel=label, xscale="log")
        src = next(iter(methods.values()))[0]["energy_source"]
        axes[0].set(ylabel=metric, title=f"{wl}: {metric} vs time (dashed: target)")
        values = [e[metric] for rs in methods.values() for r in rs for e in r["evals"] if e[metric] > 0]
        if metric == "val_loss" and values and max(values) > 10 * min(values):  # losses spanning decades
            axes[0].set(yscale="log")
        axes[1].set(title=f"vs energy ({src})")
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        metric_png = f"{wl}_metric.png"
        fig.savefig(out_dir / metric_png, dpi=80)
        plt.close(fig)
        files[wl] = [batch_png, metric_png]
    return files


# ----------------------------------------------------------------------------- markdown


def _goal_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["| workload | goal | median [95 % CI] | line | met? |", "|---|---|---|---|---|"]
    for wl, s in summary.items():
        for g in s["goals"]:
            lines.append(f"| {wl} | {g.name} | {g.value} | {g.line} | {g.verdict} |")
    return lines


def _tally(summary: dict[str, Any]) -> list[str]:
    lines = []
    for wl, s in summary.items():
        judged = [g for g in s["goals"] if g.met is not None]
        met = [g for g in judged if g.met]
        if not s["goals"]:
            lines.append(f"- {wl}: `adabatch` was not run, no goal can be judged.")
            continue
        missed = ("; not met: " + ", ".join(GOAL_LABELS[g.key] for g in judged if not g.met)
                  if len(met) < len(judged) else "")
        open_ = len(s["goals"]) - len(judged)
        lines.append(f"- {wl}: {len(met)} of {len(s['goals'])} goals met{missed}"
                     + (f"; {open_} cannot be judged from these runs" if open_ else "") + ".")
    return lines


def render(results: dict[str, Any], summary: dict[str, Any], figures: dict[str, list[str]]) -> str:
    mach = results["machine"]
    runs = results["runs"]
    energy = sorted({(r["energy_source"], r["energy_measured"]) for r in runs})
    lines = [
        f"# adabatch benchmarks: suite `{results['suite']}`", "",
        f"Generated by `python -m benchmarks.run --suite {results['suite']}` from `results.json` "
        f"({len(runs)} runs, {len(results['failures'])} failed, {len(results.get('missing', []))} not run yet; "
        f"{results['total_seconds'] / 60:.1f} min of runs). Seeds {results['seeds']}. Machine: {mach['platform']}, "
        f"{mach['cpu_count']} CPUs, torch {mach['torch']}, {mach['threads']} thread per run; runs interleaved "
        "round-robin over seed x method.", "",
        *_versions(runs),
        "Time, steps, samples and energy to target are read at evaluation points only (every "
        "`eval_every` samples), so a method that reaches the target at its first evaluation is resolved no "
        "finer than that grid.", "",
        "Medians over seeds with 95 % bootstrap intervals (percentile, paired by seed for ratios); with "
        "3 seeds an interval is coarse. Wall time and energy count training only (evaluation pauses both). "
        "Energy: " + "; ".join(f"`{s}` ({'measured' if ms else 'ESTIMATED, not measured'})" for s, ms in energy)
        + ".", "",
        "Every method trains with the workload's optimizer and LR schedule. Fixed batches run the schedule "
        "sized for their own budget / B steps, with the peak LR scaled from the base batch by the rule "
        "adabatch uses (linear for SGD, sqrt for Adam-family); `heuristic`, `ramp` and `adabatch` advance it "
        "by samples. Heuristic: after each epoch, double the batch (cap "
        f"{results['heuristic']['cap']}) when the epoch loss is below {results['heuristic']['ratio']} x the "
        "loss at the last change."
        + (f" Ramp: linear batch warm-up to the sweep's largest batch over the first {results['ramp_share']:.0%} "
           "of the budget." if "ramp_share" in results else "")
        + (" Seesaw: at each point where the schedule has halved the LR, double the batch and cut the LR by "
           "sqrt(2) instead." if any(r["method"] == "seesaw" for r in runs) else ""), "",
    ]
    lines += ["## Methods not run", ""]
    missing = []
    for name, info in results["peers"].items():
        if not info["available"]:
            missing.append(f"- `{name}`: not installed / not importable here ({info.get('error')}).")
    for s in results.get("skipped", []):
        missing.append(f"- `{s['method']}` on {s['workload']}: {s['why']}.")
    if not results.get("tuned_config") and not any(s["method"] == "adabatch-tuned" for s in results.get("skipped", [])):
        missing.append("- `adabatch-tuned`: no tuned config was given (`--tuned-config PATH`, a ControllerConfig "
                       "exported from a study on other seeds), so it is left out of this run.")
    for f in results["failures"]:
        missing.append(f"- `{f['method']}` on {f['workload']} seed {f['seed']} failed: `{f['error'][:300]}`")
    left = results.get("missing", [])
    if left:
        missing.append(f"- {len(left)} planned runs have no result yet (resume with `--resume`): "
                       + ", ".join(f"{m['workload']}/{m['method']}/seed{m['seed']}" for m in left[:12])
                       + (" ..." if len(left) > 12 else ""))
    lines += (missing or ["- none"]) + [""]

    lines += ["## Goals", "", GOALS_TEXT, ""]
    lines += _tally(summary) + [""] + _goal_lines(summary) + [""]

    for wl, s in summary.items():
        spec = results["workloads"][wl]
        better = "higher" if s["metric"] == "accuracy" else "lower"
        lines += [f"## {wl}", "",
                  f"Target: {s['metric']} {'>=' if better == 'higher' else '<='} {s['target']:.4g} "
                  f"({better} is better); budget {spec['budget']:,} samples, evaluated every "
                  f"{spec['eval_every']:,}. Hindsight-best fixed batch (chosen after the fact): "
                  f"`{s['hindsight_best']}`; best final metric among fixed batches: `{s['best_final']}`.", "",
                  "| method | reached | time to target (s) | time / hindsight best | steps to target | "
                  "samples to target | energy to target (J) | final metric at budget | total time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, row in s["rows"].items():
            label = f"{m} (hindsight best)" if m == s["hindsight_best"] else m
            div = f", {row['diverged']} diverged" if row["diverged"] else ""
            vs = fmt_est(row["time_vs_best"]) if row["time_vs_best"] is not None else "n/a"
            lines.append(f"| {label} | {row['reached']}/{row['n']}{div} | {fmt_est(row['seconds_to_target'])} | "
                         f"{vs} | {fmt_est(row['steps_to_target'])} | {fmt_est(row['samples_to_target'])} | "
                         f"{fmt_est(row['joules_to_target'])} | {fmt_est(row['final_metric'], 4)} | "
                         f"{fmt_est(row['seconds'])} |")
        lines.append("")
        if s["noise_error"]:
            lines += ["Noise-scale estimator against the exact B_simple of linear regression "
                      "(`adabatch.workloads.linreg_noise_scale`, bias counted as one more dimension), median "
                      "over evaluations of |estimate / exact - 1|, then median over seeds. The estimate is an "
                      "EMA, so it lags the exact value as training moves:", ""]
            lines += [f"- `{m}`: {fmt_est(e)}" for m, e in s["noise_error"].items()]
            lines.append("")
        lines += [f"![{f}]({f})" for f in figures.get(wl, [])] + [""]
    return "\n".join(lines)


def _versions(runs: list[dict[str, Any]]) -> list[str]:
    """A paragraph naming the code versions the runs come from, when there are several (methods rerun
    after a change, the others kept: their times come from different sittings of the machine)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(str(r.get("code_version")), []).append(r)
    if len(by) < 2:
        return []
    parts = []
    for v, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        per = {}
        for r in rs:
            per.setdefault(r["workload"], set()).add(r["method"])
        where = "; ".join(f"{w}: {', '.join(sorted(ms))}" for w, ms in per.items())
        parts.append(f"`{v}`: {len(rs)} runs ({where})")
    return ["Runs come from more than one code version, so the methods rerun last were timed in another sitting "
            "of the machine than the rest: " + "; ".join(parts) + ". Ratios are fair within one sitting only.", ""]


def readme_block(results: dict[str, Any], summary: dict[str, Any], report_path: str,
                 overhead: dict[str, Any] | None = None, estimator: dict[str, Any] | None = None,
                 overhead_examples: dict[str, Any] | None = None) -> str:
    """The README's benchmark figures, all from the results: goals, every method's time against the
    hindsight-best fixed batch, energy where an energy-aware run exists, and the overhead and
    estimator benchmarks."""
    mach = results["machine"]
    lines = [README_START,
             f"Generated by `python -m benchmarks.report` from the committed results (suite `{results['suite']}`, "
             f"seeds {results['seeds']}, {mach['cpu_count']}-CPU {mach['platform'].split('-')[0]}, one thread per "
             "run; medians with 95 % bootstrap intervals; full tables, plots and the methods left out in "
             f"[{report_path}]({report_path})).", "",
             *_versions(results["runs"]),
             "Goals of `adabatch` (untuned defaults unless named):", "",
             "| workload | time / hindsight-best fixed (<= 1.1) | time / median fixed (<= 0.8) | "
             "final metric vs best fixed | tuned time / hindsight best (<= 0.9) | steps / smallest fixed "
             "(<= 0.6) |", "|---|---|---|---|---|---|"]
    for wl, s in summary.items():
        cells = {g.key: f"{g.value.split('; final')[0]} ({g.verdict})" for g in s["goals"]}
        lines.append(f"| {wl} | " + " | ".join(cells.get(k, "not run") for k in GOAL_KEYS) + " |")
    lines += ["", *_tally(summary), ""]
    others = [m for m in ("heuristic", "ramp", "seesaw", "adabatch", "adabatch-goodput", "adabatch-energy",
                          "adabatch-tuned", "adascale", "adaptdl")
              if any(m in s["rows"] for s in summary.values())]
    lines += ["Time to target of every method / the hindsight-best fixed batch (lower is faster):", "",
              "| workload | hindsight best | " + " | ".join(others) + " |", "|---|---|" + "---|" * len(others)]
    for wl, s in summary.items():
        cells = [fmt_est(s["rows"][m]["time_vs_best"]) if m in s["rows"] and s["rows"][m]["time_vs_best"]
                 else "not run" for m in others]
        lines.append(f"| {wl} | `{s['hindsight_best']}` | " + " | ".join(cells) + " |")
    energy = _energy_lines(results)
    if energy:
        lines += ["", *energy]
    if overhead:
        lines += ["", *_overhead_lines(overhead)]
    if overhead_examples:
        lines += ["", *_overhead_lines(overhead_examples, 'with `measurement="examples"` (per-example norms '
                                                          "through the convolutions, opt-in)")]
    if estimator:
        lines += ["", *_estimator_lines(estimator)]
    lines.append(README_END)
    return "\n".join(lines)


def _overhead_lines(overhead: dict[str, Any], settings: str = "at the default settings") -> list[str]:
    """One line per model of ``benchmarks/results/overhead.json`` (or another run's file)."""
    pct = lambda x: f"{100 * x:+.1f} %"  # noqa: E731
    out = [f"Controller overhead {settings} against a plain loop replaying the same schedule "
           f"(`python -m benchmarks.overhead`, {overhead['threads']} thread, {overhead['rounds']} interleaved "
           "rounds; median [95 % CI], and the fastest quarter of rounds):", ""]
    for name, m in overhead["models"].items():
        run = m["runs"][0]
        out.append(f"- {name} (step {m['step_ms']:.1f} ms, {run['measured']} of {run['steps']} steps measured): "
                   f"{pct(m['median'])} [{pct(m['ci95'][0])}, {pct(m['ci95'][1])}], fastest quarter "
                   f"{pct(m['fastest_quarter'])}.")
    return out


def _estimator_lines(estimator: dict[str, Any]) -> list[str]:
    """The estimator benchmark's summary (``benchmarks/results/estimator.json``)."""
    out = ["Noise-scale estimate in training against the exact per-example value (`python -m benchmarks.estimator`, "
           f"seeds {estimator['seeds']}, figures in "
           "[benchmarks/results/estimator.md](benchmarks/results/estimator.md)):", "",
           "| run | checkpoints | estimate / local exact (median) | within 20 % | interval covers exact | resolved |",
           "|---|---|---|---|---|---|"]
    for label, e in estimator["summary"].items():
        out.append(f"| {label} | {e['checkpoints']} | {e['median_ratio']:.2f} | {e['within_20']:.0%} | "
                   f"{e['coverage']:.0%} | {e['resolved']:.0%} |")
    return out


def _energy_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for wl, methods in _by(results["runs"]).items():
        energy, small = methods.get("adabatch-energy"), smallest_fixed(methods)
        if energy and small:
            src = energy[0]["energy_source"] + ("" if energy[0]["energy_measured"] else ", an ESTIMATE")
            est = ratio_ci(*_paired(energy, methods[small], "joules_to_target"))
            out.append(f"- {wl}: energy to target of `adabatch-energy` / `{small}`: {fmt_est(est)} ({src}).")
    return (["Energy-aware mode:", "", *out]) if out else []


def update_readme(readme: Path, block: str, start: str = README_START, end: str = README_END) -> None:
    """Replace the text between the markers ``start`` and ``end`` in ``readme`` (the suite's by
    default) with ``block``, which holds the markers itself."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(head + block + tail)


def write_report(results_path: Path, out_dir: Path, readme: Path | None = None,
                 overhead: Path | None = None, estimator: Path | None = None) -> Path:
    """Read ``results.json``, write ``report.md`` and the PNGs next to it (and README's figures, with the
    overhead benchmark's ``overhead.json`` if given); return the report's path."""
    results = json.loads(Path(results_path).read_text())
    out_dir = Path(out_dir)
    summary = summarize(results)
    figures = plots(results, out_dir)
    path = out_dir / "report.md"
    path.write_text(render(results, summary, figures))
    if readme is not None:
        try:
            rel = path.resolve().relative_to(readme.resolve().parent)
        except ValueError:
            rel = path
        examples = None if overhead is None else Path(overhead).with_name("overhead_examples.json")
        extras = [json.loads(Path(p).read_text()) if p is not None and Path(p).exists() else None
                  for p in (overhead, estimator, examples)]
        update_readme(readme, readme_block(results, summary, str(rel), *extras))
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Render report.md (and README's figures) from results.json.")
    p.add_argument("results", type=Path, help="a results.json written by benchmarks.run")
    p.add_argument("--readme", type=Path, help="README to update between its benchmark markers")
    p.add_argument("--overhead", type=Path, default=Path(__file__).parent / "results" / "overhead.json",
                   help="overhead benchmark results to quote in the README (default: benchmarks/results/overhead.json)")
    p.add_argument("--estimator", type=Path, default=Path(__file__).parent / "results" / "estimator.json",
                   help="estimator benchmark results to quote in the README (default: benchmarks/results/estimator.json)")
    a = p.parse_args()
    print(write_report(a.results, a.results.parent, a.readme, a.overhead, a.estimator))
