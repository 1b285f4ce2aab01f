"""Markdown report and PNG plots, computed from ``results.json`` alone (no number is typed in here).

    python -m benchmarks.report benchmarks/results/results.json   # re-render after editing nothing else

Headline comparisons (the issue's goals), per workload, as paired ratios of medians over seeds:

- time to target of ``adabatch`` / ``fixed-32`` and / ``fixed-128`` (goal <= 0.8);
- steps to target of ``adabatch`` / the smallest fixed batch (goal <= 0.6, i.e. >= 40 % fewer),
  next to the final metrics of both at the fixed budget ("equal final accuracy");
- time to target of ``adabatch`` (and ``adabatch-tuned``) / the hindsight-best fixed batch, the one
  with the lowest median time to target among those that reached it on every seed (goal <= 1.1,
  tuned < 1);
- energy to target of ``adabatch-energy`` / the smallest (default) fixed batch (goal <= 0.8), and /
  the time-optimal ``adabatch-goodput`` and / ``adabatch``, with the meter that produced them.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import Estimate, median_ci, ratio_ci

INF = math.inf


def _fmt(x: float, digits: int = 3) -> str:
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


def _paired(a: list[dict], b: list[dict], key: str) -> tuple[list[float], list[float]]:
    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    pick = lambda rs: [next(r for r in rs if r["seed"] == s) for s in seeds]  # noqa: E731
    return _col(pick(a), key), _col(pick(b), key)


def hindsight_best(methods: dict[str, list[dict]]) -> str | None:
    """The fixed batch with the lowest median time to target among those reaching it on every seed."""
    ok = {m: float(np.median(_col(rs, "seconds_to_target"))) for m, rs in methods.items()
          if m.startswith("fixed-") and all(r["reached_target"] for r in rs)}
    return min(ok, key=ok.get) if ok else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per workload and method: medians with CIs; goal ratios; estimator error on linreg."""
    out: dict[str, Any] = {}
    for wl, methods in _by(results["runs"]).items():
        rows = {}
        for m, rs in methods.items():
            rows[m] = {
                "reached": sum(r["reached_target"] for r in rs), "n": len(rs),
                "diverged": sum(r.get("diverged", False) for r in rs),
                **{k: median_ci(_col(rs, k)) for k in
                   ("seconds_to_target", "steps_to_target", "samples_to_target", "joules_to_target",
                    "final_metric", "seconds", "steps")},
            }
        best = hindsight_best(methods)
        smallest = min((m for m in methods if m.startswith("fixed-")), key=lambda m: int(m.split("-")[1]),
                       default=None)
        goals = {}
        ada = methods.get("adabatch")
        if ada:
            for ref in ("fixed-32", "fixed-128"):
                if ref in methods:
                    goals[f"time adabatch / {ref}"] = ratio_ci(*_paired(ada, methods[ref], "seconds_to_target"))
            if smallest:
                goals[f"steps adabatch / {smallest}"] = ratio_ci(*_paired(ada, methods[smallest], "steps_to_target"))
                a, b = _paired(ada, methods[smallest], "final_metric")
                goals[f"final metric adabatch - {smallest}"] = median_ci(np.subtract(a, b))
            for name in ("adabatch", "adabatch-tuned"):
                if best and name in methods:
                    goals[f"time {name} / {best} (hindsight best)"] = ratio_ci(
                        *_paired(methods[name], methods[best], "seconds_to_target"))
        energy = methods.get("adabatch-energy")
        if energy:  # the energy goal: against the default (smallest) fixed batch and the time-optimal mode
            for ref in (smallest, "adabatch-goodput", "adabatch"):
                if ref in methods:
                    goals[f"energy adabatch-energy / {ref}"] = ratio_ci(*_paired(energy, methods[ref],
                                                                                 "joules_to_target"))
        out[wl] = {"rows": rows, "hindsight_best": best, "smallest_fixed": smallest, "goals": goals,
                   "metric": next(iter(methods.values()))[0]["metric"],
                   "target": next(iter(methods.values()))[0]["target"],
                   "noise_error": _noise_error(methods)}
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


def _plots(results: dict[str, Any], out_dir: Path) -> dict[str, list[str]]:
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
        ax_b.set(yscale="log", ylabel="batch size (samples/step)", title=f"{wl}: batch size and noise scale, every seed")
        ax_n.set(yscale="log", xlabel="training samples", ylabel="noise scale B_simple")
        ax_b.legend(fontsize=7, ncol=2)
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
        axes[1].set(title=f"vs energy ({src})")
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        metric_png = f"{wl}_metric.png"
        fig.savefig(out_dir / metric_png, dpi=80)
        plt.close(fig)
        files[wl] = [batch_png, metric_png]
    return files


# ----------------------------------------------------------------------------- markdown


def render(results: dict[str, Any], summary: dict[str, Any], figures: dict[str, list[str]]) -> str:
    mach = results["machine"]
    runs = results["runs"]
    energy = sorted({(r["energy_source"], r["energy_measured"]) for r in runs})
    lines = [
        f"# adabatch benchmarks: suite `{results['suite']}`", "",
        f"Generated by `python -m benchmarks.run --suite {results['suite']}` from `results.json` "
        f"({len(runs)} runs, {len(results['failures'])} failed, {results['total_seconds'] / 60:.1f} min). "
        f"Seeds {results['seeds']}. Machine: {mach['platform']}, {mach['cpu_count']} CPUs, torch {mach['torch']}, "
        f"{mach['threads']} thread per run; runs interleaved round-robin over seed x method.", "",
        "Time, steps, samples and energy to target are read at evaluation points only (every "
        "`eval_every` samples), so a method that reaches the target at its first evaluation is resolved no "
        "finer than that grid; ratios of millisecond-scale times (linreg) mostly measure the grid.", "",
        "Medians over seeds with 95 % bootstrap intervals (percentile, paired by seed for ratios); with "
        "3 seeds an interval is coarse. Wall time and energy count training only (evaluation pauses both). "
        "Energy: " + "; ".join(f"`{s}` ({'measured' if ms else 'ESTIMATED, not measured'})" for s, ms in energy)
        + ".", "",
        f"Fixed batches scale the LR from the workload's base batch by the same rule adabatch uses "
        f"(linear for SGD, sqrt for Adam). Heuristic: after each epoch, double the batch (cap "
        f"{results['heuristic']['cap']}) when the epoch loss is below {results['heuristic']['ratio']} x the "
        f"loss at the last change.", "",
    ]
    lines += ["## Methods not run", ""]
    missing = False
    for name, info in results["peers"].items():
        if not info["available"]:
            missing = True
            lines.append(f"- `{name}`: not installed / not importable here ({info.get('error')}).")
    if not results.get("tuned_config"):
        missing = True
        lines.append("- `adabatch-tuned`: no tuned config was given (`--tuned-config PATH`, a ControllerConfig "
                     "exported from a study on other seeds), so it is left out of this run.")
    for f in results["failures"]:
        missing = True
        lines.append(f"- `{f['method']}` on {f['workload']} seed {f['seed']} failed: `{f['error'][:300]}`")
    if not missing:
        lines.append("- none")
    lines.append("")

    lines += ["## Goals", "",
              "Goals: time to target <= 0.8x the common default fixed batch; steps to target <= 0.6x the "
              "smallest fixed batch at equal final metric; time within 1.1x of the hindsight-best fixed batch "
              "(untuned), below 1x once tuned; energy to target of the energy-aware mode <= 0.8x the default fixed "
              "batch at equal accuracy.", "",
              "| workload | comparison | median [95 % CI] | goal | met? |", "|---|---|---|---|---|"]
    for wl, s in summary.items():
        for name, est in s["goals"].items():
            goal, met = _goal(name, est)
            lines.append(f"| {wl} | {name} | {fmt_est(est)} | {goal} | {met} |")
    lines.append("")

    for wl, s in summary.items():
        spec = results["workloads"][wl]
        better = "higher" if s["metric"] == "accuracy" else "lower"
        lines += [f"## {wl}", "",
                  f"Target: {s['metric']} {'>=' if better == 'higher' else '<='} {s['target']:.4g} "
                  f"({better} is better); budget {spec['budget']:,} samples, evaluated every "
                  f"{spec['eval_every']:,}. Hindsight-best fixed batch (chosen after the fact): "
                  f"`{s['hindsight_best']}`.", "",
                  "| method | reached | time to target (s) | steps to target | samples to target | "
                  "energy to target (J) | final metric at budget | total time (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, row in s["rows"].items():
            label = f"{m} (hindsight best)" if m == s["hindsight_best"] else m
            div = f", {row['diverged']} diverged" if row["diverged"] else ""
            lines.append(f"| {label} | {row['reached']}/{row['n']}{div} | {fmt_est(row['seconds_to_target'])} | "
                         f"{fmt_est(row['steps_to_target'])} | {fmt_est(row['samples_to_target'])} | "
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


def _goal(name: str, est: Estimate) -> tuple[str, str]:
    x = est.median
    if name.startswith("final metric"):
        return "about 0 (equal)", "see CI"
    if name.startswith("time adabatch / fixed"):
        goal = 1.1 if "hindsight" in name else 0.8
    elif name.startswith("time adabatch-tuned"):
        goal = 1.0
    elif name.startswith("steps"):
        goal = 0.6
    elif name.startswith("energy adabatch-energy / fixed"):
        goal = 0.8
    elif name.startswith("energy"):
        return "below 1 where power per sample varies", "see CI"
    else:
        return "", ""
    if not math.isfinite(x):
        return f"<= {goal}", "no (not reached on every seed)"
    return f"<= {goal}", "yes" if x <= goal else "no"


def write_report(results_path: Path, out_dir: Path) -> Path:
    """Read ``results.json``, write ``report.md`` and the PNGs next to it; return the report's path."""
    results = json.loads(Path(results_path).read_text())
    out_dir = Path(out_dir)
    summary = summarize(results)
    figures = _plots(results, out_dir)
    path = out_dir / "report.md"
    path.write_text(render(results, summary, figures))
    return path


if __name__ == "__main__":
    p = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
    print(write_report(p, p.parent))
