"""Estimator accuracy in training: the controller's noise scale against the exact per-example value.

    python -m benchmarks.estimator                    # default runs, all workloads; ~25 min on 2 cores
    python -m benchmarks.estimator --quick            # one seed, fewer checkpoints
    python -m benchmarks.estimator --only AdamW --out /tmp/a   # pieces side by side, one per core,
    python -m benchmarks.estimator --merge /tmp/a /tmp/b       # then one report from their runs

Each run trains a workload with the controller at its default settings (the loop of
``benchmarks.loops``: the controller's sampler, the workload's optimizer), and at every checkpoint
computes the exact B_simple of the whole training set at the current weights from every
per-example gradient (``torch.func``; preconditioned by Adam's current second moments for Adam-family
optimizers, as the controller's estimate is). The exact value jumps from step to step (on MNIST-1D it
moves between 650 and 1,500 within 20 steps as SGD bounces across a valley), so next to it we report
the *local* exact value: tr(Sigma) and |G|^2 each averaged over ``LOCAL_POINTS`` steps spread over the
last part of the estimator's window, then divided. An estimator that averages over a window can
only follow that one.

Figures per workload: median estimate / local exact, the share within 20 %, and the share of
checkpoints whose local exact value lies inside the controller's 95 % interval (the interval it
decides with), split by how far the noise scale is above the batch in use. The fixed-batch rows
(``--fixed-batch``) pin the batch to show what the estimator reports when the noise scale is far
above what the batch can resolve: a finite lower bound, never inf.

Results go to ``benchmarks/results/estimator.json``, ``estimator.md`` and ``estimator.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig
from adabatch.config import config_changes
from adabatch.exact import per_example_gradients
from adabatch.workloads import Workload, get_workload, make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
LOCAL_POINTS = 4  # exact values averaged into the local one


def exact_noise_scale(model: nn.Module, wl: Workload, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None, chunk: int = 500) -> tuple[float, float, float]:
    """(B_simple, |G|^2, tr(Sigma)) of the population (x, y) at the model's weights, per-example exact
    (:func:`adabatch.exact.per_example_gradients`, through Adam's preconditioner when ``optimizer``
    is Adam's). tr(Sigma) uses divisor N (population).

    Example:
        >>> wl = get_workload("linreg"); _ = torch.manual_seed(0); m = wl.make_model(); d = wl.make_data(0)
        >>> b, g2, tr = exact_noise_scale(m, wl, d.x_train[:200], d.y_train[:200])
        >>> b > 0 and g2 > 0 and tr > 0
        True
    """
    was_training = model.training
    model.eval()  # no dropout in these models; keeps functional_call's buffers unchanged
    try:
        sums = per_example_gradients(model, wl.loss, x, y, optimizer, chunk)
    finally:
        model.train(was_training)
    g2 = sums.g2
    trace = sums.squares / sums.n - g2
    return trace / g2, g2, trace


def run(wl: Workload, seed: int, budget: int, checkpoints: int, config: ControllerConfig, label: str,
        progress: bool = True) -> dict[str, Any]:
    """One training run with exact values at ``checkpoints`` evenly spaced points."""
    torch.manual_seed(seed)
    data = wl.make_data(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr)
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=wl.micro_batch, config=config)
    adam = opt if ctl.noise_kind == "preconditioned" else None
    x, y = data.x_train, data.y_train
    sampler = ctl.batch_sampler(len(x), seed=seed)
    every = budget // checkpoints
    next_cp, points, rows = every, [], []
    t0 = time.perf_counter()
    while ctl.samples < budget:
        for idx in sampler:
            idx = torch.tensor(idx)
            ctl.backward(wl.loss(model(x[idx]), y[idx]))
            if not ctl.step():
                continue
            # local exact: LOCAL_POINTS steps spread over the last third of the window before a checkpoint
            span = min(ctl.estimator.window() / 3, every)
            spacing = span / (LOCAL_POINTS - 1)
            if ctl.samples >= next_cp - span and (not points or ctl.samples >= points[-1][0] + spacing) \
                    and len(points) < LOCAL_POINTS - 1:
                with ctl.paused():
                    points.append((ctl.samples, exact_noise_scale(model, wl, x, y, adam)))
            if ctl.samples >= next_cp:
                with ctl.paused():
                    now = exact_noise_scale(model, wl, x, y, adam)
                pts = [p for _, p in points] + [now]
                local = sum(p[2] for p in pts) / sum(p[1] for p in pts)
                est = ctl.noise
                rows.append({"samples": ctl.samples, "batch": ctl.batch_size, "exact": now[0], "local": local,
                             "estimate": est.value, "low": est.low, "high": est.high, "resolved": est.resolved,
                             "measurements": est.measurements})
                if progress:
                    print(f"  {label} seed {seed} {ctl.samples:7d} samples, batch {ctl.batch_size:5d}: estimate "
                          f"{est.value:9.1f} [{est.low:9.1f}, {est.high:9.1f}] local exact {local:9.1f} "
                          f"(pointwise {now[0]:9.1f})", flush=True)
                next_cp += every
                points = []
            if ctl.samples >= budget:
                break
    return {"workload": wl.name, "label": label, "seed": seed, "budget": budget, "rows": rows,
            "config": config.to_dict(), "seconds": time.perf_counter() - t0,
            "decisions": [vars(c) for c in ctl.decisions]}


# (label, workload, optimizer override, budget, config changes)
SUITE = [
    ("mnist1d-mlp (SGD)", "mnist1d-mlp", None, 96_000, {}),
    ("mnist1d-mlp (AdamW)", "mnist1d-mlp", "adamw", 96_000, {}),
    ("mnist1d-cnn (SGD)", "mnist1d-cnn", None, 64_000, {}),
    # the same CNN with per-example norms through its convolutions' input patches (opt-in)
    ("mnist1d-cnn (SGD), per-example norms", "mnist1d-cnn", None, 64_000, {"measurement": "examples"}),
    ("linreg (SGD)", "linreg", None, 40_000, {}),
    ("mnist1d-mlp (SGD), batch fixed at 32", "mnist1d-mlp", None, 96_000, {"min_batch": 32, "max_batch": 32}),
]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rows = [row for r in runs if r["label"] == label for row in r["rows"]]
        ratio = np.array([row["estimate"] / row["local"] for row in rows])
        inside = np.array([row["low"] <= row["local"] <= row["high"] for row in rows])
        resolved = np.array([row["resolved"] for row in rows])
        over = np.array([row["local"] / row["batch"] for row in rows])
        entry = {"checkpoints": len(rows), "median_ratio": float(np.median(ratio)),
                 "within_20": float(np.mean(np.abs(ratio - 1) <= 0.2)), "coverage": float(np.mean(inside)),
                 "resolved": float(np.mean(resolved)), "finite": bool(np.all(np.isfinite(ratio))),
                 "by_ratio": {}}
        for name, mask in (("< 4x batch", over < 4), ("4-16x", (over >= 4) & (over < 16)), (">= 16x", over >= 16)):
            if mask.any():
                entry["by_ratio"][name] = {"n": int(mask.sum()), "median_ratio": float(np.median(ratio[mask])),
                                           "within_20": float(np.mean(np.abs(ratio[mask] - 1) <= 0.2)),
                                           "coverage": float(np.mean(inside[mask])),
                                           "resolved": float(np.mean(resolved[mask]))}
        out[label] = entry
    return out


def write_report(results: dict[str, Any], out: Path) -> None:
    summary = results["summary"]
    lines = ["# Noise-scale estimator in training, against the exact per-example value", "",
             f"Generated by `python -m benchmarks.estimator` ({results['minutes']:.1f} min, seeds {results['seeds']}). "
             "Controller at its default settings unless the label says otherwise. *local exact*: tr(Sigma) and "
             f"|G|^2 of the whole training set averaged over {LOCAL_POINTS} steps across the last third of the "
             "estimator's window, then divided (the pointwise exact value jumps from step to step). *coverage*: "
             "share of checkpoints whose local exact value lies inside the controller's 95 % interval. "
             "*resolved*: share where |G|^2 was resolved (otherwise the estimate is the interval's finite lower "
             "bound).", "",
             "| run | checkpoints | estimate / local exact (median) | within 20 % | coverage | resolved |",
             "|---|---|---|---|---|---|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {s['checkpoints']} | {s['median_ratio']:.2f} | {s['within_20']:.0%} | "
                     f"{s['coverage']:.0%} | {s['resolved']:.0%} |")
        for name, b in s["by_ratio"].items():
            lines.append(f"| &nbsp;&nbsp;local exact {name} | {b['n']} | {b['median_ratio']:.2f} | "
                         f"{b['within_20']:.0%} | {b['coverage']:.0%} | {b['resolved']:.0%} |")
    lines += ["", "![estimate vs exact](estimator.png)", ""]
    (out / "estimator.md").write_text("\n".join(lines))


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["summary"])
    fig, axes = plt.subplots(len(labels), 1, figsize=(8, 2.6 * len(labels)), squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        for i, r in enumerate(x for x in results["runs"] if x["label"] == label):
            rows = r["rows"]
            s = [row["samples"] for row in rows]
            c = plt.cm.tab10(i)
            ax.plot(s, [row["local"] for row in rows], color=c, ls=":", label="local exact" if i == 0 else None)
            ax.plot(s, [row["estimate"] for row in rows], color=c, marker="o", ms=3,
                    label="estimate (95 % interval)" if i == 0 else None)
            high = [min(row["high"], 1e9) for row in rows]
            ax.fill_between(s, [row["low"] for row in rows], high, color=c, alpha=0.12)
            ax.step(s, [row["batch"] for row in rows], color=c, lw=0.8, alpha=0.6, where="post",
                    label="batch in use" if i == 0 else None)
        ax.set(yscale="log", title=label, ylabel="B_simple")
        ax.set_ylim(bottom=10)
        top = max(row["local"] for r in results["runs"] if r["label"] == label for row in r["rows"])
        ax.set_ylim(top=top * 4)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("training samples")
    fig.tight_layout()
    fig.savefig(out / "estimator.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--checkpoints", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="one seed, six checkpoints")
    p.add_argument("--only", nargs="+", help="labels (substring match) to run")
    p.add_argument("--config", default="{}", help='ControllerConfig changes for every run, as JSON (e.g. \'{"window_fraction": 0.2}\')')
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="write --out's report from the runs in these folders' estimator.json (runs nothing); "
                        "a run of the same label and seed in a later folder replaces an earlier one")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads((d / "estimator.json").read_text()) for d in args.merge]
        latest = {(r["label"], r["seed"]): r for part in parts for r in part["runs"]}  # a later folder's run wins
        runs = list(latest.values())
        order = {label: i for i, (label, *_) in enumerate(SUITE)}
        runs.sort(key=lambda r: (order.get(r["label"], len(order)), r["seed"]))
        _write(args.out, {"seeds": sorted({r["seed"] for r in runs}), "runs": runs,
                          "minutes": sum(part["minutes"] for part in parts)})
        return
    torch.set_num_threads(1)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    checkpoints = 6 if args.quick else args.checkpoints
    extra = config_changes(args.config)
    t0 = time.time()
    runs = []
    for label, name, optimizer, budget, changes in SUITE:
        if args.only and not any(o in label for o in args.only):
            continue
        wl = get_workload(name)
        if optimizer is not None:
            import dataclasses

            wl = dataclasses.replace(wl, optimizer=optimizer, lr=1e-3)
        for seed in seeds:
            runs.append(run(wl, seed, budget, checkpoints, ControllerConfig(**{**changes, **extra}), label))
    _write(args.out, {"seeds": seeds, "minutes": (time.time() - t0) / 60, "runs": runs})


def _write(out: Path, results: dict[str, Any]) -> None:
    """Summarise ``results["runs"]`` and write the JSON, the Markdown report and the plot to ``out``."""
    results["summary"] = summarize(results["runs"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimator.json").write_text(json.dumps(results, default=float))
    write_report(results, out)
    plot(results, out)
    for label, s in results["summary"].items():
        print(f"{label}: median {s['median_ratio']:.2f}, within 20 % {s['within_20']:.0%}, coverage "
              f"{s['coverage']:.0%}, resolved {s['resolved']:.0%}")


if __name__ == "__main__":
    main()
