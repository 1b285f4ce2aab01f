"""The ``adabatch`` command: tune the controller with Optuna studies, and run the demo.

Bad input (a missing or malformed study file, an unknown study, an unreachable database) ends
with exit status 2 and one line on stderr.

Example:
    >>> main(["study", "run", "no-such-file.toml"])
    2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Sequence

DESCRIPTION = """\
Adaptive batch-size scheduling for PyTorch.

  adabatch study run studies/mnist1d_quick.toml    tune the controller (results in ./adabatch.db)
  adabatch study best mnist1d-quick                 the best trial, or the Pareto front
  adabatch study export mnist1d-quick -o best.json  its config, for ControllerConfig.load()
  adabatch study plot mnist1d-quick -o report/      PNGs and a self-contained report/index.html
  adabatch demo                                     see the controller grow the batch
"""

STUDY_HELP = """\
A study tunes the controller's knobs (grow/shrink thresholds, target_factor, cooldown_steps,
ema_decay, lr_rule, ...) with Optuna. It is defined by a TOML file (see studies/) and stored in a
database: by default the SQLite file adabatch.db in the working directory. To spread a study over
several machines, point every worker at one PostgreSQL database with --storage
postgresql+psycopg://user@host:5432/db and start 'adabatch study run' on each; a worker that dies
mid-trial has its trial marked failed (heartbeat) and re-run once by another worker.

Several objectives (e.g. accuracy, seconds, energy) give a Pareto front instead of one best
trial. Optuna cannot prune multi-objective studies: pruning needs a single objective.
Energy is measured with RAPL/NVML where available, otherwise it is an estimate and labelled so.
"""

STORAGE_HELP = "SQLAlchemy database URL (default: sqlite:///adabatch.db in the working directory)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (and exit status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from adabatch.storage import DEFAULT_STORAGE

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="adabatch", description=DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="train a small model and watch the batch size adapt",
                          add_help=False, prefix_chars="\0")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)

    study = sub.add_parser("study", help="tune the controller with Optuna studies", description=STUDY_HELP,
                           formatter_class=fmt)
    ss = study.add_subparsers(dest="study_command", metavar="ACTION", parser_class=_Parser)
    ss.required = True

    def storage_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL", help=STORAGE_HELP)

    run = ss.add_parser("run", help="run (or resume) a study defined by a TOML file",
                        description="Run more trials of the study in STUDY.toml. If the study already exists in "
                                    "the storage, the new trials are added to it. Start the same command on "
                                    "several machines against one PostgreSQL --storage to run trials in "
                                    "parallel. Optuna cannot prune multi-objective studies.")
    run.add_argument("file", metavar="STUDY.toml", help="study definition (see studies/)")
    run.add_argument("--n-trials", type=_positive_int, metavar="N", help="trials to run in this process "
                     "(default: n_trials from the file)")
    run.add_argument("--study-name", metavar="NAME", help="name in the storage (default: name from the file)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting new trials after this long")
    run.add_argument("--no-progress", action="store_true", help="no progress bar; one line per trial instead")
    storage_arg(run)
    run.set_defaults(func=_run)

    lst = ss.add_parser("list", help="list the studies in the storage")
    storage_arg(lst)
    lst.set_defaults(func=_list)

    def named(action: str, func, **kwargs) -> argparse.ArgumentParser:
        """A subcommand that takes a study NAME and --storage."""
        sub = ss.add_parser(action, **kwargs)
        sub.add_argument("name", metavar="NAME")
        storage_arg(sub)
        sub.set_defaults(func=func)
        return sub

    named("show", _show, help="a study's settings and every trial")
    named("best", _best, help="the best trial, or the Pareto front for several objectives")

    export = named("export", _export, help="write a trial's ControllerConfig as JSON",
                   description="Write the config of the best trial (or --trial N) with "
                               "ControllerConfig.save; load it with ControllerConfig.load(path).")
    export.add_argument("--trial", type=int, metavar="N", help="trial number (needed when there is a Pareto front)")
    export.add_argument("-o", "--output", required=True, metavar="config.json", help="file to write")

    plot = named("plot", _plot, help="Pareto front, parameter importances and a trial's curves",
                 description="Write PNGs and index.html, one self-contained page embedding them: the Pareto "
                             "front (or objective per trial), parameter importances, and the batch size, "
                             "noise scale, learning rate and metric of the best trial (or --trial N).")
    plot.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write into")
    plot.add_argument("--trial", type=int, metavar="N", help="trial whose curves to draw (default: the best)")
    named("delete", _delete, help="remove a study and its stored traces")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adabatch`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from adabatch.config import ConfigError
    from adabatch.storage import StorageError
    from adabatch.study import StudyNotFoundError, StudySpecError

    import optuna
    import sqlalchemy

    try:
        return int(args.func(args) or 0)
    except (StudySpecError, StudyNotFoundError, StorageError, ConfigError, OSError,
            optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError) as exc:
        if isinstance(exc, sqlalchemy.exc.OperationalError):
            exc = StorageError(f"the database failed: {str(exc.orig).strip().splitlines()[0]}")
        msg = exc.args[0] if isinstance(exc, StudyNotFoundError) and exc.args else str(exc)
        print(f"adabatch: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adabatch: interrupted", file=sys.stderr)
        return 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    from adabatch import demo

    parser = _Parser(prog="adabatch demo", description="Train a small model and watch the batch size adapt.")
    demo.add_arguments(parser)
    return int(demo.run(parser.parse_args(args.demo_args)) or 0)


def _run(args: argparse.Namespace) -> int:
    import logging

    import optuna

    from adabatch.study import StudySpec, run_study

    spec = StudySpec.from_toml(args.file)
    # Our per-trial line (with the energy source) replaces Optuna's INFO line per trial.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("adabatch").setLevel(logging.WARNING)
    study = run_study(spec, args.storage, n_trials=args.n_trials, study_name=args.study_name,
                      timeout=args.timeout, progress=not args.no_progress, log=print)
    print(f"study {study.study_name!r}: {len(study.trials)} trials in total. "
          f"Next: adabatch study best {study.study_name}" + _storage_flag(args))
    return 0


def _list(args: argparse.Namespace) -> int:
    from adabatch.study import list_studies

    summaries = list_studies(args.storage)
    if not summaries:
        print("no studies yet; start one with: adabatch study run studies/mnist1d_quick.toml")
        return 0
    print(f"{'name':30s} {'trials':>6s}  {'directions':24s} started")
    for s in summaries:
        dirs = ",".join(d.name.lower() for d in s.directions)
        started = s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "-"
        print(f"{s.study_name:30s} {s.n_trials:>6d}  {dirs:24s} {started}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import json

    from adabatch.study import SPEC_ATTR, describe_trial, load_study, objective_names

    study = load_study(args.name, args.storage)
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    print(f"study {study.study_name}: workload {spec.get('workload', '?')}, objectives "
          + ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(objective_names(study), study.directions)))
    if spec:
        print(f"fixed: {json.dumps(spec.get('fixed', {}))}")
        print("search: " + ", ".join(_param_range(p) for p in spec.get("params", [])))
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    print("trials: " + (", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "none"))
    for t in study.trials:
        print("  " + describe_trial(t, study))
    return 0


def _param_range(p: dict[str, Any]) -> str:
    if p["kind"] == "categorical":
        return f"{p['name']} in {list(p['choices'])}"
    return f"{p['name']} in [{p['low']}, {p['high']}]" + (" log" if p.get("log") else "")


def _best(args: argparse.Namespace) -> int:
    from adabatch.study import best_trials, describe_trial, load_study

    study = load_study(args.name, args.storage)
    best = best_trials(study)
    if not best:
        print(f"study {study.study_name!r} has no completed feasible trial yet.")
        return 0
    if len(study.directions) > 1:
        print(f"Pareto front of {study.study_name!r}: {len(best)} trial(s); export one with --trial N")
    for t in best:
        print("  " + describe_trial(t, study))
    return 0


def _export(args: argparse.Namespace) -> int:
    from adabatch.study import export_config, load_study

    study = load_study(args.name, args.storage)
    trial, path = export_config(study, args.output, args.trial)
    print(f"wrote the config of trial {trial.number} to {path}; load it with ControllerConfig.load({str(path)!r})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from adabatch.study import load_study, plot_study

    study = load_study(args.name, args.storage)
    files = plot_study(study, args.output, args.storage, args.trial)
    for path in files.values():
        print(path)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from adabatch.study import delete_study

    delete_study(args.name, args.storage)
    print(f"deleted study {args.name!r} and its traces")
    return 0


def _storage_flag(args: argparse.Namespace) -> str:
    from adabatch.storage import DEFAULT_STORAGE

    return "" if args.storage == DEFAULT_STORAGE else f" --storage {args.storage}"


if __name__ == "__main__":
    sys.exit(main())
