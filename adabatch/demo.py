"""``adabatch demo``: train a small model on generated MNIST-1D and plot what the controller did."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from adabatch.config import ConfigError, ControllerConfig
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


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = ControllerConfig.load(args.config) if args.config else ControllerConfig()
    meter = None
    if args.energy_aware:
        from adabatch.energy import detect_meter

        config = config.replace(policy="energy")
        meter = detect_meter()
        print(f"energy: {meter.describe()}")
    result = train(args.workload, config, seed=args.seed, sample_budget=args.samples, progress=True,
                   energy_meter=meter)
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
