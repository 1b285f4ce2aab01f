"""Training curves as PNG: batch size, noise scale, learning rate and the metric against samples.

Uses matplotlib's Agg backend, so it works headless.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metric: str | None = None,
    title: str = "",
) -> Path:
    """Four stacked panels from per-step records (``StepRecord.to_dict()`` rows).

    The metric panel uses the records that carry ``metrics[metric]`` (see
    ``AdaptiveBatchController.log_metrics``); if ``metric`` is None the first one found is used.

    Example:
        >>> import tempfile, os
        >>> rows = [dict(samples=32 * i, batch=32, b_simple=100.0, lr=0.1, loss=1.0, metrics={}) for i in range(5)]
        >>> p = plot_training(rows, os.path.join(tempfile.mkdtemp(), "run.png"))
        >>> p.stat().st_size > 0
        True
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = [r["samples"] for r in history]
    if metric is None:
        metric = next((k for r in history for k in (r.get("metrics") or {})), None)
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    # A measured step planned with one micro-batch takes two; plotting those would hide the
    # planned trajectory under a comb of spikes, so the batch and LR panels skip them.
    planned = [(s, r) for s, r in zip(samples, history) if not r.get("measured")] or list(zip(samples, history))
    axes[0].step([s for s, _ in planned], [r["batch"] for _, r in planned], where="post", color="tab:blue")
    axes[0].set_ylabel("batch size")
    axes[0].set_yscale("log", base=2)
    noise = [(s, r["b_simple"]) for s, r in zip(samples, history) if _finite(r.get("b_simple"))]
    if noise:
        axes[1].plot(*zip(*noise), color="tab:orange")
        axes[1].set_yscale("log")
    axes[1].set_ylabel("noise scale\nB_simple")
    axes[2].plot([s for s, _ in planned], [r["lr"] for _, r in planned], color="tab:green")
    axes[2].set_ylabel("learning rate")
    pts = [(s, (r.get("metrics") or {})[metric]) for s, r in zip(samples, history)
           if metric and metric in (r.get("metrics") or {})]
    if pts:
        axes[3].plot(*zip(*pts), marker="o", color="tab:red")
        axes[3].set_ylabel(metric)
    else:
        axes[3].plot(samples, [r["loss"] for r in history], color="tab:red", alpha=0.6)
        axes[3].set_ylabel("training loss")
    axes[3].set_xlabel("samples seen")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
