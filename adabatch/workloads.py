"""Built-in training workloads, all generated or read offline, and one routine that trains them.

- ``mnist1d-mlp`` / ``mnist1d-cnn``: the MNIST-1D signals (Greydanus 2020, ``mnist1d`` package),
  4,000 train / 1,000 test, accuracy as the metric.
- ``charlm``: a small byte-level transformer on Python standard-library source files, validation
  loss (nats per byte) as the metric.
- ``linreg``: noisy linear regression whose gradient noise scale is known in closed form.

Those four train with a constant learning rate. The ``-adamw`` variants and ``linreg-long`` train
the way real runs do: AdamW with weight decay (SGD with momentum for ``linreg-long``) and a cosine
or one-cycle schedule with warm-up (:func:`lr_schedule`), for long enough that the gradient noise
scale climbs far past the starting batch.

:func:`train` runs any of them (or a user's :class:`Workload`) under an
:class:`~adabatch.AdaptiveBatchController` with periodic evaluation; the demo, the study runner
and the benchmarks all call it.
"""

from __future__ import annotations

import functools
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
from torch.optim.lr_scheduler import LambdaLR

from adabatch import distributed
from adabatch.config import ControllerConfig
from adabatch.controller import AdaptiveBatchController


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass
class Workload:
    """A model, its data, how to train it and how to score it.

    ``metric`` is ``accuracy`` (higher is better) or ``val_loss`` (lower is better); ``target`` is
    the metric value that counts as "reached" for time/samples/energy-to-target figures. ``lr`` is
    the peak learning rate for a batch of ``micro_batch`` samples (the base batch); ``schedule``,
    ``warmup`` and ``final_lr`` shape it over the run (:func:`lr_schedule`).

    Example:
        >>> wl = get_workload("mnist1d-mlp-adamw")
        >>> wl.optimizer, wl.schedule, wl.reached(wl.target)
        ('adamw', 'cosine', True)
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
    schedule: str = "constant"
    warmup: float = 0.0  # share of the run over which the LR warms up
    final_lr: float = 0.1  # cosine: LR at the end of the run, as a share of the peak
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        checks = (("metric", self.metric in ("accuracy", "val_loss"), "accuracy or val_loss"),
                  ("optimizer", self.optimizer in OPTIMIZERS, ", ".join(OPTIMIZERS)),
                  ("schedule", self.schedule in SCHEDULES, ", ".join(SCHEDULES)),
                  ("warmup", 0.0 <= self.warmup < 1.0, "a share in [0, 1)"),
                  ("final_lr", 0.0 <= self.final_lr <= 1.0, "a share in [0, 1]"),
                  ("weight_decay", self.weight_decay >= 0.0, "a value >= 0"))
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"Workload {self.name!r}: {name}={getattr(self, name)!r} is invalid; "
                                 f"accepted {accepted}.")

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target

    def lr_at(self, progress: float) -> float:
        """The base batch's learning rate at ``progress`` through the run (0: start, 1: end of the budget)."""
        return self.lr * lr_schedule(self.schedule, progress, self.warmup, self.final_lr)


# ----------------------------------------------------------------------------- data


def mnist1d_data(seed: int = 0, num_samples: int = 5000) -> Data:
    """MNIST-1D generated offline by the ``mnist1d`` package (seed fixes the sample), 80 % for training."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    return Data(torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long),
                torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long))


MNIST1D_SEED = 42  # the seed of the published MNIST-1D dataset


@functools.lru_cache(maxsize=1)
def mnist1d_large_data(seed: int = 0) -> Data:
    """One MNIST-1D dataset of 20,000 training and 5,000 test signals, whatever the run's seed.

    Generated with MNIST-1D's own seed (42) at five times its usual size, so that long runs keep
    learning; like a real benchmark's dataset it is the same for every run (the run's seed sets the
    initial weights and the data order), so a target means the same thing on every seed. About 5 s
    to generate; kept for the next run in the process, which only reads it.
    """
    return mnist1d_data(MNIST1D_SEED, num_samples=25_000)


STDLIB_FILES = ("argparse.py", "textwrap.py", "collections/__init__.py", "functools.py", "dataclasses.py",
                "pathlib.py", "string.py", "json/decoder.py", "typing.py", "inspect.py")


def stdlib_text(max_bytes: int = 400_000) -> bytes:
    """Source of a fixed list of standard-library modules: text that ships with every Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = [(root / f).read_bytes() for f in STDLIB_FILES if (root / f).exists()]
    if not chunks:
        raise FileNotFoundError(f"none of {STDLIB_FILES} found under {root}; is the standard library installed?")
    return b"\n".join(chunks)[:max_bytes]


def charlm_data(seed: int = 0, context: int = 64, max_bytes: int = 400_000, n_train: int = 20_000) -> Data:
    """``n_train`` byte windows of stdlib source from its first 90 %, 1,000 from the rest for validation."""
    data = torch.tensor(np.frombuffer(stdlib_text(max_bytes), dtype=np.uint8).astype(np.int64))
    split = int(len(data) * 0.9)
    g = torch.Generator().manual_seed(seed)

    def windows(part: Tensor, n: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(part) - context - 1, (n,), generator=g)
        idx = starts[:, None] + torch.arange(context + 1)
        w = part[idx]
        return w[:, :-1], w[:, 1:]

    x, y = windows(data[:split], n_train)
    xv, yv = windows(data[split:], 1_000)
    return Data(x, y, xv, yv)


LINREG_DIM = 32
LINREG_NOISE = 4.0  # label noise variance sigma^2


def linreg_data(seed: int = 0, n_train: int = 8000, n_test: int = 2000, noisy_test: bool = True) -> Data:
    """y = <w*, x> + eps, x ~ N(0, I), eps ~ N(0, sigma^2); see :func:`linreg_noise_scale`.

    With ``noisy_test=False`` the validation labels are <w*, x> without noise, so the validation
    loss 0.5 mean(<w - w*, x>^2) estimates the excess risk 0.5 |w - w*|^2 itself, free of the label
    noise of a finite test set.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(LINREG_DIM, generator=g) / math.sqrt(LINREG_DIM)
    x = torch.randn(n_train + n_test, LINREG_DIM, generator=g)
    y = x @ w + math.sqrt(LINREG_NOISE) * torch.randn(n_train + n_test, generator=g)
    if not noisy_test:
        y[n_train:] = x[n_train:] @ w
    return Data(x[:n_train], y[:n_train, None], x[n_train:], y[n_train:, None])


def linreg_long_data(seed: int = 0) -> Data:
    """``linreg`` with 100,000 training samples (the empirical optimum within ~0.001 of w* in
    squared distance, d sigma^2 / n) and a noise-free validation set of 10,000."""
    return linreg_data(seed, n_train=100_000, n_test=10_000, noisy_test=False)


def charlm_long_data(seed: int = 0) -> Data:
    """``charlm`` data with 50,000 training windows, enough for a few passes of a long run."""
    return charlm_data(seed, n_train=50_000)


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
    # Realistic schedules. Targets are fixed before any adaptive run, from a pilot of fixed batches on
    # seed 100 (never a benchmark seed), by the rule of `python -m benchmarks.pilot`: the best value the
    # fixed batch with the best final metric had reached by 3/4 of the full suite's budget. Pilot
    # figures (final metric at the budget per fixed batch) in benchmarks/results/pilot/:
    # mlp 32: 0.862, 64: 0.866, 128: 0.860, 256: 0.859, 512: 0.844 -> target 0.859 (fixed-64)
    "mnist1d-mlp-adamw": Workload("mnist1d-mlp-adamw", mnist1d_large_data, mlp, _ce, "accuracy", target=0.859,
                                  optimizer="adamw", lr=2e-3, weight_decay=0.1, schedule="cosine", warmup=0.05,
                                  sample_budget=400_000),
    # cnn 32: 0.979, 64: 0.976, 128: 0.978, 256: 0.977, 512: 0.973 -> target 0.974 (fixed-32)
    "mnist1d-cnn-adamw": Workload("mnist1d-cnn-adamw", mnist1d_large_data, cnn, _ce, "accuracy", target=0.974,
                                  optimizer="adamw", lr=3e-3, weight_decay=0.1, schedule="onecycle", warmup=0.3,
                                  sample_budget=320_000),
    # charlm 16: 1.401, 32: 1.416, 64: 1.418, 128: 1.445, 256: 1.540 -> target 1.44 (fixed-16)
    "charlm-adamw": Workload("charlm-adamw", charlm_long_data, charlm, _ce, "val_loss", target=1.44,
                             optimizer="adamw", lr=3e-3, weight_decay=0.1, schedule="cosine", warmup=0.05,
                             micro_batch=16, sample_budget=100_000),
    # linreg-long (excess risk) 16 .. 1024: 0.0050 - 0.0061, 2048: 0.0036, 4096: 0.0037 -> 0.00873 (fixed-2048);
    # the exact noise scale climbs from about 165 at the start past 10,000 at the end.
    "linreg-long": Workload("linreg-long", linreg_long_data, lambda: nn.Linear(LINREG_DIM, 1), _mse, "val_loss",
                            target=0.00873, lr=0.002, micro_batch=16, schedule="cosine", warmup=0.02,
                            sample_budget=1_600_000),
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
    world_size: int = 1
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: digests of its batches and weights

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("history", "evals")}
        return out


def make_optimizer(kind: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9), ``adam`` or ``adamw``, with ``weight_decay`` on weight matrices only.

    As nanoGPT's ``configure_optimizers`` does, parameters with two or more dimensions (weights,
    embeddings) decay and the rest (biases, norm gains) do not; with ``weight_decay=0`` there is one
    parameter group.

    Example:
        >>> opt = make_optimizer("adamw", mlp().parameters(), lr=1e-3, weight_decay=0.1)
        >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
        [(3, 0.1), (3, 0.0)]
    """
    params = list(params)
    groups: Any = params
    if weight_decay and all(isinstance(p, Tensor) for p in params):
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)  # each group names its own decay
    raise ValueError(f"unknown optimizer {kind!r}; use {', '.join(OPTIMIZERS)}")


def lr_schedule(kind: str, progress: float, warmup: float = 0.0, final: float = 0.1) -> float:
    """Multiplier of the peak learning rate at ``progress`` through the run (0: start, 1: end).

    The training loops evaluate it at the progress reached *after* each step, so the first step's
    LR is not 0 and the last step's is the schedule's end value. With p the progress and w =
    ``warmup``:

    - ``constant``: min(1, p / w), a linear warm-up (Goyal et al. 2017), then the peak.
    - ``cosine``: the same warm-up, then final + (1 - final) (1 + cos(pi t)) / 2 with
      t = (p - w) / (1 - w) (Loshchilov & Hutter 2017, SGDR without restarts); ``final`` = 0.1 is
      nanoGPT's min_lr = lr / 10.
    - ``onecycle``: Smith & Topin 2019, the LR curve of torch's ``OneCycleLR`` (cosine annealing,
      div_factor 25, final_div_factor 1e4; momentum is not cycled): from 1/25 up to 1 over the first
      w, then down to 1 / (25 * 1e4) along a cosine.

    Example:
        >>> [round(lr_schedule("cosine", p, warmup=0.1), 3) for p in (0.05, 0.1, 0.55, 1.0)]
        [0.5, 1.0, 0.55, 0.1]
        >>> [round(lr_schedule("onecycle", p, warmup=0.3), 4) for p in (0.0, 0.3, 1.0)]
        [0.04, 1.0, 0.0]
    """
    p = min(max(progress, 0.0), 1.0)
    if kind == "onecycle":
        if p < warmup:
            return _cos_anneal(1 / 25, 1.0, p / warmup)
        return _cos_anneal(1.0, 1 / (25 * 1e4), (p - warmup) / (1 - warmup))
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; use {', '.join(SCHEDULES)}")
    if p < warmup:
        return p / warmup
    if kind == "cosine":
        return _cos_anneal(1.0, final, (p - warmup) / (1 - warmup))
    return 1.0


def _cos_anneal(start: float, end: float, t: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def make_scheduler(workload: Workload, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """The workload's LR schedule as a ``LambdaLR`` spread over ``total_steps`` optimizer steps.

    Step s (from 0) runs at ``lr_schedule((s + 1) / total_steps)`` times the optimizer's LR. For a
    fixed batch B, ``total_steps`` = budget / B; an :class:`~adabatch.AdaptiveBatchController` is given
    the schedule of its base batch (budget / base batch steps) and advances it by samples / base batch.

    Example:
        >>> wl = get_workload("mnist1d-mlp-adamw")
        >>> opt = make_optimizer(wl.optimizer, mlp().parameters(), wl.lr, wl.weight_decay)
        >>> sched = make_scheduler(wl, opt, total_steps=100)
        >>> opt.param_groups[0]["lr"] == wl.lr_at(1 / 100)
        True
    """
    total = max(1, int(total_steps))
    return LambdaLR(optimizer, lambda s: lr_schedule(workload.schedule, (s + 1) / total, workload.warmup,
                                                     workload.final_lr))


@torch.no_grad()
def evaluate(workload: Workload, model: nn.Module, data: Data) -> float:
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = torch.cat([model(x.to(device)) for x in data.x_test.split(500)])
        y = data.y_test.to(device)
        if workload.metric == "accuracy":
            return float((out.argmax(-1) == y).float().mean())
        return float(workload.loss(out, y))
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
    sharding: str = "ddp",
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
) -> RunResult:
    """Train ``workload`` under an adaptive controller for ``sample_budget`` samples.

    Evaluates every ``eval_every`` samples (the result is attached to the step's telemetry
    record as a metric; evaluation runs inside ``controller.paused()``, so times and joules count
    training only), stops early once the target is reached if ``stop_at_target``, and raises
    ``optuna.TrialPruned``-style exceptions from ``on_eval`` straight through.

    In a process group of several ranks (``adabatch.distributed.init_from_env`` under torchrun)
    the model is wrapped by ``sharding`` (``ddp`` or ``fsdp``), each rank trains on its stride of
    every global micro-batch, and only rank 0 shows progress. ``checkpoint``: a file the run
    resumes from when it exists, written by rank 0 every ``checkpoint_every`` samples and at the
    end (model, optimizer, scheduler, controller, sampler and evaluations); it resumes on any
    number of processes, the global batch re-rounded to the new granularity.

    Example:
        >>> r = train("linreg", sample_budget=2_000, eval_every=1_000)
        >>> r.samples >= 2_000 and r.metric == "val_loss"
        True
    """
    wl = get_workload(workload) if isinstance(workload, str) else workload
    if checkpoint_every is not None and (checkpoint is None or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every={checkpoint_every!r} is invalid: a number of samples >= 1, with a "
                         "checkpoint file.")
    ctx = distributed.current()
    torch.manual_seed(seed)
    data = data or wl.make_data(seed)
    model = wl.make_model()
    saved = _read_checkpoint(checkpoint, wl.name, seed)
    if saved is not None:
        model.load_state_dict(saved["model"])  # before wrapping: every rank starts from the same full weights
    net = distributed.wrap(model, ctx, sharding)
    opt = make_optimizer(wl.optimizer, net.parameters(), wl.lr, wl.weight_decay)
    budget = sample_budget or wl.sample_budget
    base = (config.base_batch or config.initial_batch) if config is not None else None
    steps = budget // (base or wl.micro_batch)  # the schedule is sized for the base batch
    scheduler = make_scheduler(wl, opt, steps) if wl.schedule != "constant" or wl.warmup else None
    ctl = AdaptiveBatchController(net, opt, micro_batch_size=wl.micro_batch, config=config,
                                  energy_meter=energy_meter, scheduler=scheduler)
    for cb in callbacks:
        ctl.add_callback(cb)
    sampler = ctl.batch_sampler(len(data.x_train), seed=seed)
    evals: list[dict[str, float]] = []
    best = -math.inf if wl.higher_is_better else math.inf
    hit: dict[str, Any] | None = None
    next_eval = eval_every
    if saved is not None:
        _load_optimizer(net, opt, saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        ctl.load_state_dict(saved["controller"])
        sampler.load_state_dict(saved["sampler"])
        evals, best, hit, next_eval = saved["evals"], saved["best"], saved["hit"], saved["next_eval"]
    next_save = math.inf if checkpoint_every is None else (ctl.samples // checkpoint_every + 1) * checkpoint_every
    eval_model = distributed.unwrap(net)  # DDP's module evaluates without collectives; FSDP needs every rank
    bar = _progress(budget, wl.name) if progress and ctx.is_main else None
    if bar is not None:
        bar.update(ctl.samples)
    done = ctl.samples >= budget
    try:
        while not done:
            for idx in sampler:
                idx = torch.tensor(idx)
                x, y = data.x_train[idx].to(ctx.device), data.y_train[idx].to(ctx.device)
                ctl.backward(wl.loss(net(x), y))
                if not ctl.step():
                    continue
                if bar is not None:
                    bar.update(ctl.samples - bar.n)
                if ctl.samples >= next_eval or ctl.samples >= budget:
                    due = min(next_eval, budget)  # steps overshoot it; trials compare at the same point
                    next_eval += eval_every
                    with ctl.paused():  # evaluation is not training time (nor energy)
                        value = evaluate(wl, eval_model, data)
                        ctl.log_metrics(**{wl.metric: value})
                        best = max(best, value) if wl.higher_is_better else min(best, value)
                        stats = ctl.stats()
                        ev = {"step": ctl.steps, "samples": ctl.samples, "due": due, "seconds": ctl.clock.seconds(),
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
                if checkpoint is not None and (ctl.samples >= next_save or done):
                    next_save = (ctl.samples // checkpoint_every + 1) * checkpoint_every if checkpoint_every else math.inf
                    with ctl.paused():
                        _write_checkpoint(checkpoint, wl.name, seed, net, opt, scheduler, ctl, sampler,
                                          (evals, best, hit, next_eval), ctx)
                if done:
                    break
    finally:
        ctl.flush()  # records reach callbacks (a study's trace) even when a trial is pruned or interrupted
        if bar is not None:
            bar.close()
    wall = ctl.clock.seconds()
    meter = ctl.energy_meter
    return RunResult(
        workload=wl.name, metric=wl.metric, final_metric=evals[-1][wl.metric], best_metric=best,
        wall_seconds=wall, samples=ctl.samples, steps=ctl.steps,
        energy_j=ctl.energy_joules, energy_source=getattr(meter, "source", None),
        energy_measured=getattr(meter, "measured", None), reached_target=hit is not None,
        seconds_to_target=hit["seconds"] if hit else None, samples_to_target=int(hit["samples"]) if hit else None,
        steps_to_target=int(hit["step"]) if hit else None,
        energy_to_target=hit["energy_j"] if hit and meter is not None else None,
        evals=evals, history=[r.to_dict() for r in ctl.history], stats=ctl.stats(), world_size=ctx.world_size,
        ranks=distributed.gather({"rank": ctx.rank, "batches": distributed.digest(r.batch for r in ctl.history),
                                  "weights": distributed.weights_digest(net)}) if ctx.distributed else [],
    )


CHECKPOINT_FORMAT = "adabatch.train"


def _read_checkpoint(path: str | Path | None, workload: str, seed: int) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if there is no file yet); it must be of this workload and seed."""
    if path is None or not Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # a file this function's writer made
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by adabatch's training loop; give another "
                         "--checkpoint file.")
    if (state["workload"], state["seed"]) != (workload, seed):
        raise ValueError(f"{path} holds a run of {state['workload']} with seed {state['seed']}, not {workload} with "
                         f"seed {seed}; give another checkpoint file, or the same workload and seed.")
    return state


def _write_checkpoint(path: str | Path, workload: str, seed: int, net: nn.Module, opt: torch.optim.Optimizer,
                      scheduler: Any, ctl: AdaptiveBatchController, sampler: Any, progress: tuple,
                      ctx: distributed.Context) -> None:
    """Rank 0 writes the run's state (whole tensors, whatever the sharding), atomically; every rank calls it."""
    model_state = {k: _whole(v) for k, v in distributed.unwrap(net).state_dict().items()}
    opt_state = opt.state_dict()
    opt_state = _by_name({"state": {i: {k: _whole(v) for k, v in st.items()} for i, st in opt_state["state"].items()},
                          "param_groups": opt_state["param_groups"]}, _names(net, opt))
    controller_state = ctl.state_dict()
    if ctx.is_main:
        evals, best, hit, next_eval = progress
        state = {"format": CHECKPOINT_FORMAT, "workload": workload, "seed": seed, "world_size": ctx.world_size,
                 "model": model_state, "optimizer": opt_state,
                 "scheduler": None if scheduler is None else scheduler.state_dict(),
                 "controller": controller_state, "sampler": sampler.state_dict(),
                 "evals": evals, "best": best, "hit": hit, "next_eval": next_eval}
        tmp = Path(f"{path}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a crash mid-write leaves the previous checkpoint whole
    if ctx.distributed:
        torch.distributed.barrier()  # no rank may resume from (or overwrite) a half-written file


def _names(net: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names, in its order (the same names with and without a wrapper)."""
    name_of = {id(p): n for n, p in distributed.unwrap(net).named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name, as FSDP's whole state dict is: any sharding resumes it."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def _whole(value: Any) -> Any:
    """A tensor whole and on the CPU (a DTensor shard is gathered: every rank must call this)."""
    if not isinstance(value, Tensor):
        return value
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().cpu()


def _load_optimizer(net: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state of :func:`_by_name` (whole tensors), sharding each as its parameter is sharded."""
    names = _names(net, opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(names)}

    def placed(value: Any, p: Tensor) -> Any:
        if hasattr(p, "placements") and isinstance(value, Tensor) and value.shape == p.shape:
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    opt.load_state_dict({"state": {index[n]: {k: placed(v, params[index[n]]) for k, v in st.items()}
                                   for n, st in state["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                          for g in state["param_groups"]]})


def _progress(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="sample", unit_scale=True, dynamic_ncols=True)
