"""``adabatch demo``: train a small model on generated MNIST-1D and plot what the controller did.

Under torchrun it trains on every process (DDP, or FSDP2 with ``--sharding fsdp``)::

    torchrun --standalone --nproc_per_node 2 -m adabatch demo --workload linreg

Rank 0 alone prints and writes the plot and trace; the trace's ``ranks`` lists every rank's digest
of its batch trajectory and of its weights, which must all be equal. ``--checkpoint FILE`` makes
the run resumable, on any number of processes (see :func:`adabatch.workloads.train`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from adabatch.config import ConfigError, ControllerConfig
from adabatch.distributed import BACKENDS, DEFAULT_TIMEOUT_S, SHARDINGS, close, init_from_env
from adabatch.plots import plot_training
from adabatch.workloads import WORKLOADS, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="mnist1d-mlp", choices=sorted(WORKLOADS),
                        help="built-in workload (default: mnist1d-mlp, generated offline)")
    parser.add_argument("--samples", type=_int_in(1, 10**12), default=None,
                        help="training budget in samples (default: the workload's)")
    parser.add_argument("--config", type=_existing_file, default=None,
                        help="controller config JSON (e.g. from 'adabatch study export')")
    parser.add_argument("--energy-aware", action="store_true",
                        help="pick batches by statistical progress per joule (estimated here without RAPL/NVML)")
    parser.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="random seed, 0 to 2**32 - 1")
    parser.add_argument("--out", type=_folder, default=Path("adabatch-out"), help="folder for the plot and trace")
    parser.add_argument("--threads", type=_int_in(1, 4096), default=1, help="torch threads (1 gives steady timings)")
    dist = parser.add_argument_group("under torchrun")
    dist.add_argument("--sharding", choices=SHARDINGS, default="ddp",
                      help="wrap the model in DistributedDataParallel (default) or shard it with FSDP2")
    dist.add_argument("--backend", choices=BACKENDS, default=None,
                      help="process-group backend (default: nccl with CUDA, else gloo)")
    dist.add_argument("--timeout", type=_int_in(1, 86_400), default=int(DEFAULT_TIMEOUT_S), metavar="SECONDS",
                      help="a collective that waits this long on a failed rank raises (default: %(default)s)")
    dist.add_argument("--checkpoint", type=_checkpoint_file, default=None, metavar="FILE",
                      help="resume from FILE if it exists; write it every --checkpoint-every samples and at the end")
    dist.add_argument("--checkpoint-every", type=_int_in(1, 10**12), default=None, metavar="SAMPLES",
                      help="samples between checkpoints (needs --checkpoint)")


def _int_in(low: int, high: int) -> Any:
    """An argparse type: an integer from ``low`` to ``high``, else one line saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: accepted {low} to {high}")
        return value

    return parse


def _existing_file(text: str) -> Path:
    path = Path(text)
    try:
        found = path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise argparse.ArgumentTypeError(f"cannot use {text[:60]!r}: {exc.strerror}") from None
    if not found:
        raise argparse.ArgumentTypeError(f"no file at {text!r}; write one with 'adabatch study export NAME -o FILE'")
    return path


def _folder(text: str) -> Path:
    path = Path(text)
    try:
        usable = bool(text.strip()) and (path.is_dir() or not path.exists())
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot use {text[:60]!r}: {exc.strerror}") from None
    if not usable:
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder; give a folder for the plot and trace")
    return path


def _checkpoint_file(text: str) -> Path:
    path = Path(text)
    try:
        usable = bool(text.strip()) and not path.is_dir() and (path.parent.is_dir() or not path.parent.exists())
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot use {text[:60]!r}: {exc.strerror}") from None
    if not usable:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name; give a file for the checkpoint")
    return path


def run(args: argparse.Namespace) -> int:
    if args.checkpoint_every is not None and args.checkpoint is None:
        raise ConfigError("--checkpoint-every needs --checkpoint FILE: the file the run is saved to.")
    torch.set_num_threads(args.threads)
    try:
        ctx = init_from_env(args.backend, args.timeout)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return _train_and_report(args, ctx)
    finally:
        close()


def _train_and_report(args: argparse.Namespace, ctx: Any) -> int:
    config = ControllerConfig.load(args.config) if args.config else ControllerConfig()
    meter = None
    if args.energy_aware:
        from adabatch.energy import detect_meter

        config = config.replace(policy="energy")
        meter = detect_meter()
        if ctx.is_main:
            print(f"energy: {meter.describe()}")
    if args.checkpoint is not None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = train(args.workload, config, seed=args.seed, sample_budget=args.samples, progress=True,
                       energy_meter=meter, sharding=args.sharding, checkpoint=args.checkpoint,
                       checkpoint_every=args.checkpoint_every)
    except ValueError as exc:  # a checkpoint of another run
        if isinstance(exc, ConfigError) or "checkpoint" not in str(exc):
            raise
        raise ConfigError(str(exc)) from None
    if not ctx.is_main:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot_training(result.history, args.out / f"{args.workload}.png", metric=result.metric,
                        title=f"adabatch on {args.workload}")
    trace = args.out / f"{args.workload}.json"
    trace.write_text(json.dumps({"summary": result.summary(), "evals": result.evals, "history": result.history},
                                default=str))
    batches = sorted({r["batch"] for r in result.history})
    print(f"{result.metric}: final {result.final_metric:.4f}, best {result.best_metric:.4f} "
          f"(target {'reached' if result.reached_target else 'not reached'})")
    print(f"{result.steps} optimizer steps, {result.samples} samples, {result.wall_seconds:.1f} s; "
          f"batch sizes used: {batches}; final noise scale {result.stats['noise_scale']:.0f}")
    if result.energy_j is not None:
        kind = "measured" if result.energy_measured else "ESTIMATED"
        print(f"energy: {result.energy_j:.1f} J ({kind}, {result.energy_source})")
    if result.ranks:
        same = all((r["batches"], r["weights"]) == (result.ranks[0]["batches"], result.ranks[0]["weights"])
                   for r in result.ranks)
        print(f"{ctx.world_size} processes ({ctx.backend}, {args.sharding}): every rank took the same batches and "
              f"holds the same weights: {'yes' if same else 'NO'}")
    print(f"plot: {png}\ntrace: {trace}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adabatch demo", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        parser.exit(2, f"adabatch demo: {exc}\n")
    return 0
