"""Built-in training workloads, all generated or read offline, and one routine that trains them.

- ``mnist1d-mlp`` / ``mnist1d-cnn``: the MNIST-1D signals (Greydanus 2020, ``mnist1d`` package),
  4,000 train / 1,000 test, accuracy as the metric.
- ``charlm``: a small byte-level transformer on Python standard-library source files, validation
  loss (nats per byte) as the metric.
- ``linreg``: noisy linear regression whose gradient noise scale is known in closed form.

:func:`train` runs any of them (or a user's :class:`Workload`) under an
:class:`~adabatch.AdaptiveBatchController` with periodic evaluation; the demo, the study runner
and the benchmarks all call it.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch.config import ControllerConfig
from adabatch.controller import AdaptiveBatchController


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Workload:
    """A model, its data and how to score it.

    ``metric`` is ``accuracy`` (higher is better) or ``val_loss`` (lower is better); ``target`` is
    the metric value that counts as "reached" for time/samples/energy-to-target figures.
    """

    name: str
    make_data: Callable[[int], Data]
    make_model: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: str
    target: float
    optimizer: str = "sgd"
    lr: float = 0.05
    micro_batch: int = 32
    sample_budget: int = 200_000

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


# ----------------------------------------------------------------------------- data


def mnist1d_data(seed: int = 0) -> Data:
    """MNIST-1D generated offline by the ``mnist1d`` package (seed fixes the sample)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return Data(torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long),
                torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long))


STDLIB_FILES = ("argparse.py", "textwrap.py", "collections/__init__.py", "functools.py", "dataclasses.py",
                "pathlib.py", "string.py", "json/decoder.py", "typing.py", "inspect.py")


def stdlib_text(max_bytes: int = 400_000) -> bytes:
    """Source of a fixed list of standard-library modules: text that ships with every Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = [(root / f).read_bytes() for f in STDLIB_FILES if (root / f).exists()]
    if not chunks:
        raise FileNotFoundError(f"none of {STDLIB_FILES} found under {root}; is the standard library installed?")
    return b"\n".join(chunks)[:max_bytes]


def charlm_data(seed: int = 0, context: int = 64, max_bytes: int = 400_000) -> Data:
    """Byte windows of stdlib source: the first 90 % train, the rest validation."""
    data = torch.tensor(np.frombuffer(stdlib_text(max_bytes), dtype=np.uint8).astype(np.int64))
    split = int(len(data) * 0.9)
    g = torch.Generator().manual_seed(seed)

    def windows(part: Tensor, n: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(part) - context - 1, (n,), generator=g)
        idx = starts[:, None] + torch.arange(context + 1)
        w = part[idx]
        return w[:, :-1], w[:, 1:]

    x, y = windows(data[:split], 20_000)
    xv, yv = windows(data[split:], 1_000)
    return Data(x, y, xv, yv)


LINREG_DIM = 32
LINREG_NOISE = 4.0  # label noise variance sigma^2


def linreg_data(seed: int = 0, n_train: int = 8000, n_test: int = 2000) -> Data:
    """y = <w*, x> + eps, x ~ N(0, I), eps ~ N(0, sigma^2); see :func:`linreg_noise_scale`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(LINREG_DIM, generator=g) / math.sqrt(LINREG_DIM)
    x = torch.randn(n_train + n_test, LINREG_DIM, generator=g)
    y = x @ w + math.sqrt(LINREG_NOISE) * torch.randn(n_train + n_test, generator=g)
    return Data(x[:n_train], y[:n_train, None], x[n_train:], y[n_train:, None])


def linreg_noise_scale(delta_sq: float, dim: int = LINREG_DIM, noise_var: float = LINREG_NOISE) -> float:
    """Exact B_simple of the loss 0.5 (<w, x> - y)^2 at distance |w - w*|^2 = delta_sq.

    The per-example gradient is g = (<delta, x> - eps) x, so G = delta and, by Isserlis' theorem,
    E[g g^T] = (|delta|^2 + sigma^2) I + 2 delta delta^T. Hence
    tr(Sigma) = d (|delta|^2 + sigma^2) + |delta|^2 and B_simple = tr(Sigma) / |delta|^2.
    """
    return (dim * (delta_sq + noise_var) + delta_sq) / delta_sq


# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    """The MNIST-1D MLP of RESEARCH.md: 40-256-256-10."""
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(32, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 10, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x[:, None, :]))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.head(h.flatten(1))


def cnn() -> nn.Module:
    """A three-layer 1-D CNN for MNIST-1D."""
    return _CNN()


class _CharLM(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def charlm() -> nn.Module:
    """A 2-layer, 64-wide causal transformer over bytes."""
    return _CharLM()


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mse(pred: Tensor, y: Tensor) -> Tensor:
    return 0.5 * F.mse_loss(pred, y)


WORKLOADS: dict[str, Workload] = {
    "mnist1d-mlp": Workload("mnist1d-mlp", mnist1d_data, mlp, _ce, "accuracy", target=0.65, lr=0.05,
                            sample_budget=160_000),
    "mnist1d-cnn": Workload("mnist1d-cnn", mnist1d_data, cnn, _ce, "accuracy", target=0.85, lr=0.05,
                            sample_budget=160_000),
    "charlm": Workload("charlm", charlm_data, charlm, _ce, "val_loss", target=2.2, optimizer="adam", lr=2e-3,
                       micro_batch=16, sample_budget=40_000),
    "linreg": Workload("linreg", linreg_data, lambda: nn.Linear(LINREG_DIM, 1), _mse, "val_loss",
                       target=LINREG_NOISE / 2 * 1.12, lr=0.01, micro_batch=16, sample_budget=100_000),
}


def get_workload(name: str) -> Workload:
    """A built-in workload by name, or a user's ``module:function`` returning a :class:`Workload`."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load workload {name!r}: {exc}") from None
        wl = obj() if callable(obj) and not isinstance(obj, Workload) else obj
        if not isinstance(wl, Workload):
            raise ValueError(f"{name!r} must be (or return) an adabatch.workloads.Workload, got {type(wl).__name__}")
        return wl
    raise ValueError(f"unknown workload {name!r}; built-in: {', '.join(WORKLOADS)}, or give module:function")


# ----------------------------------------------------------------------------- training


@dataclass
class RunResult:
    """What one training run produced; ``history`` holds per-step records as dicts."""

    workload: str
    metric: str
    final_metric: float
    best_metric: float
    wall_seconds: float
    samples: int
    steps: int
    energy_j: float | None
    energy_source: str | None
    energy_measured: bool | None
    reached_target: bool
    seconds_to_target: float | None
    samples_to_target: int | None
    steps_to_target: int | None
    energy_to_target: float | None
    evals: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("history", "evals")}
        return out


def make_optimizer(kind: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; use sgd or adam")


@torch.no_grad()
def evaluate(workload: Workload, model: nn.Module, data: Data) -> float:
    model.eval()
    try:
        out = torch.cat([model(x) for x in data.x_test.split(500)])
        if workload.metric == "accuracy":
            return float((out.argmax(-1) == data.y_test).float().mean())
        return float(workload.loss(out, data.y_test))
    finally:
        model.train()


def train(
    workload: Workload | str,
    config: ControllerConfig | None = None,
    *,
    seed: int = 0,
    sample_budget: int | None = None,
    eval_every: int = 8_000,
    stop_at_target: bool = False,
    energy_meter: Any = None,
    callbacks: tuple[Callable[..., None], ...] = (),
    on_eval: Callable[[dict[str, float]], None] | None = None,
    progress: bool = False,
    data: Data | None = None,
) -> RunResult:
    """Train ``workload`` under an adaptive controller for ``sample_budget`` samples.

    Evaluates every ``eval_every`` samples (the result is attached to the step's telemetry
    record as a metric), stops early once the target is reached if ``stop_at_target``, and raises
    ``optuna.TrialPruned``-style exceptions from ``on_eval`` straight through.

    Example:
        >>> r = train("linreg", sample_budget=2_000, eval_every=1_000)
        >>> r.samples >= 2_000 and r.metric == "val_loss"
        True
    """
    wl = get_workload(workload) if isinstance(workload, str) else workload
    torch.manual_seed(seed)
    data = data or wl.make_data(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr)
    ctl = AdaptiveBatchController(model, opt, micro_batch_size=wl.micro_batch, config=config,
                                  energy_meter=energy_meter)
    for cb in callbacks:
        ctl.add_callback(cb)
    budget = sample_budget or wl.sample_budget
    sampler = ctl.batch_sampler(len(data.x_train), seed=seed)
    evals: list[dict[str, float]] = []
    best = -math.inf if wl.higher_is_better else math.inf
    hit: dict[str, Any] | None = None
    next_eval = eval_every
    bar = _progress(budget, wl.name) if progress else None
    t0 = time.perf_counter()
    done = False
    while not done:
        for idx in sampler:
            idx = torch.tensor(idx)
            loss = wl.loss(model(data.x_train[idx]), data.y_train[idx])
            ctl.backward(loss)
            if not ctl.step():
                continue
            if bar is not None:
                bar.update(ctl.samples - bar.n)
            if ctl.samples >= next_eval or ctl.samples >= budget:
                due = min(next_eval, budget)  # steps overshoot it; trials compare at the same point
                next_eval += eval_every
                value = evaluate(wl, model, data)
                ctl.log_metrics(**{wl.metric: value})
                best = max(best, value) if wl.higher_is_better else min(best, value)
                stats = ctl.stats()
                ev = {"step": ctl.steps, "samples": ctl.samples, "due": due, "seconds": time.perf_counter() - t0,
                      wl.metric: value, "batch": ctl.batch_size, "noise_scale": stats["noise_scale"],
                      "energy_j": ctl.energy_joules if ctl.energy_meter is not None else math.nan}
                evals.append(ev)
                if hit is None and wl.reached(value):
                    hit = ev
                if bar is not None:
                    bar.set_postfix(batch=ctl.batch_size, noise=f"{stats['noise_scale']:.0f}",
                                    **{wl.metric: f"{value:.3f}"})
                if on_eval is not None:
                    on_eval(ev)
                if (stop_at_target and hit is not None) or ctl.samples >= budget:
                    done = True
                    break
    ctl.flush()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    meter = ctl.energy_meter
    return RunResult(
        workload=wl.name, metric=wl.metric, final_metric=evals[-1][wl.metric], best_metric=best,
        wall_seconds=wall, samples=ctl.samples, steps=ctl.steps,
        energy_j=ctl.energy_joules, energy_source=getattr(meter, "source", None),
        energy_measured=getattr(meter, "measured", None), reached_target=hit is not None,
        seconds_to_target=hit["seconds"] if hit else None, samples_to_target=int(hit["samples"]) if hit else None,
        steps_to_target=int(hit["step"]) if hit else None,
        energy_to_target=hit["energy_j"] if hit and meter is not None else None,
        evals=evals, history=[r.to_dict() for r in ctl.history], stats=ctl.stats(),
    )


def _progress(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="sample", unit_scale=True, dynamic_ncols=True)
