"""The ``adabatch`` command: tune the controller with Optuna studies, and run the demo.

Exit status: 0 done; 2 bad input (a missing or malformed study file or argument, an unknown
study, an unreachable database), with one line on stderr; 75 the database went away mid-study
and did not come back in time; 130 / 143 interrupted by SIGINT / SIGTERM (the running trial is
retried on the next run). The storage URL may come from ``ADABATCH_STORAGE`` instead of
``--storage``; its password never appears in any output.

Example:
    >>> main(["study", "run", "no-such-file.toml"])
    2
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence, TextIO

STORAGE_ENV = "ADABATCH_STORAGE"
EXIT_BAD_INPUT = 2
EXIT_DATABASE_LOST = 75  # EX_TEMPFAIL: try again later

DESCRIPTION = """\
Adaptive batch-size scheduling for PyTorch.

  adabatch study run studies/mnist1d_quick.toml    tune the controller (results in ./adabatch.db)
  adabatch study best mnist1d-quick                 the best trial, or the Pareto front
  adabatch study export mnist1d-quick -o best.json  its config, for ControllerConfig.load()
  adabatch study plot mnist1d-quick -o report/      PNGs and a self-contained report/index.html
  adabatch demo                                     see the controller grow the batch
"""

STUDY_HELP = """\
A study tunes the controller's knobs (target_factor, grow/shrink thresholds, window_fraction,
lr_rule, ...) with Optuna. It is defined by a TOML file (see studies/) and stored in a
database: by default the SQLite file adabatch.db in the working directory, or the URL in
$ADABATCH_STORAGE. To spread a study over several machines, point every worker at one PostgreSQL
database (--storage postgresql+psycopg://user@host:5432/db) and start 'adabatch study run' on
each; together they run the file's n_trials. A worker that dies mid-trial has its trial marked
failed (heartbeat) and re-run by another worker; Ctrl-C or SIGTERM queue the running trial again.
The study keeps a fingerprint of the file: a changed file is refused (use --study-name NEW).

Several objectives (e.g. accuracy, seconds, energy) give a Pareto front instead of one best
trial. Optuna cannot prune multi-objective studies: pruning needs a single objective.
Energy is measured with RAPL/NVML where available, otherwise it is an estimate and labelled so.
"""

STORAGE_HELP = (f"SQLAlchemy database URL (default: ${STORAGE_ENV}, else sqlite:///adabatch.db in the working "
                "directory); keep passwords off the command line with the environment variable")


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
        p.add_argument("--storage", type=_storage_url, default=None, metavar="URL", help=STORAGE_HELP)

    run = ss.add_parser("run", help="run (or resume) a study defined by a TOML file",
                        description="Optuna cannot prune multi-objective studies. Run the study in STUDY.toml "
                                    "until it has the file's n_trials trials (retries of failed trials do not "
                                    "count again); a rerun finishes what is left, and --n-trials N runs N more. "
                                    "Start the same command on several machines against one PostgreSQL "
                                    "--storage to run trials in parallel. A study remembers the file it was "
                                    "created from and refuses a changed one.")
    run.add_argument("file", metavar="STUDY.toml", help="study definition (see studies/)")
    run.add_argument("--n-trials", type=_positive_int, metavar="N", help="run N more trials in this process, "
                     "beyond the file's total (default: finish the study to the file's n_trials)")
    run.add_argument("--study-name", type=_study_name, metavar="NAME",
                     help="name in the storage (default: name from the file); a new name starts a new study")
    run.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS",
                     help="stop starting new trials after this long")
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
    export.add_argument("--trial", type=_trial_number, metavar="N",
                        help="trial number (needed when there is a Pareto front)")
    export.add_argument("-o", "--output", required=True, metavar="config.json", help="file to write")

    plot = named("plot", _plot, help="Pareto front, parameter importances and a trial's curves",
                 description="Write PNGs and index.html, one self-contained page embedding them: the Pareto "
                             "front (or objective per trial), parameter importances, and the batch size, "
                             "noise scale, learning rate and metric of the best trial (or --trial N).")
    plot.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write into")
    plot.add_argument("--trial", type=_trial_number, metavar="N", help="trial whose curves to draw (default: the best)")
    named("delete", _delete, help="remove a study and its stored traces")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adabatch`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Installed before anything is imported or printed, so no output of this process can show
    # the storage password: not our messages, not a library's log line, not a traceback.
    streams = sys.stdout, sys.stderr
    secrets = _secrets(argv)
    if secrets:
        sys.stdout, sys.stderr = _Redacting(sys.stdout, secrets), _Redacting(sys.stderr, secrets)
    previous_term = _raise_on_sigterm()
    try:
        return _main(argv)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
                pass
        sys.stdout, sys.stderr = streams


def _main(argv: list[str]) -> int:
    from adabatch.study import StudyInterrupted

    try:
        args = build_parser().parse_args(argv)
    except StudyInterrupted as exc:
        return _interrupted(exc)
    from adabatch.config import ConfigError
    from adabatch.storage import DatabaseUnavailable, StorageError
    from adabatch.study import StudyNotFoundError, StudySpecError

    import optuna
    import sqlalchemy

    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # piped into e.g. head, which has read what it wanted
        _silence_stdout()
        return 0
    except DatabaseUnavailable as exc:
        _error(str(exc))
        return EXIT_DATABASE_LOST
    except (StudySpecError, StudyNotFoundError, StorageError, ConfigError, OSError,
            optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError) as exc:
        if isinstance(exc, sqlalchemy.exc.OperationalError):
            exc = StorageError(f"the database failed: {str(exc.orig).strip().splitlines()[0]}")
        msg = exc.args[0] if isinstance(exc, StudyNotFoundError) and exc.args else str(exc)
        _error(str(msg))
        return EXIT_BAD_INPUT
    except StudyInterrupted as exc:
        return _interrupted(exc)
    except KeyboardInterrupt:
        return _interrupted(StudyInterrupted(signal.SIGINT))


def _silence_stdout() -> None:
    # Python flushes stdout once more at exit; into a closed pipe that would print a warning.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (e.g. captured output)
        pass


def _error(message: str) -> None:
    print(f"adabatch: error: {' '.join(message.split())}", file=sys.stderr)


def _notice(message: str) -> None:
    print(f"adabatch: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _interrupted(exc: Any) -> int:
    if exc.trial_number is None:
        what = "no trial was running"
    elif exc.recorded:
        what = f"trial {exc.trial_number} will be retried on the next run"
    else:
        what = (f"trial {exc.trial_number} could not be marked (database unreachable); it is retried once its "
                "heartbeat is older than the grace period")
    print(f"adabatch: interrupted ({exc.signame}); {what}", file=sys.stderr, flush=True)
    return exc.exit_code


def _raise_on_sigterm() -> Any:
    # SIGTERM outside a study run (e.g. while loading) still ends with one line and status 143.
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        from adabatch.study import StudyInterrupted

        raise StudyInterrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


def _secrets(argv: Sequence[str]) -> list[str]:
    from adabatch.storage import url_secrets

    # Any argument may hold a URL, e.g. one given where a study name was expected and echoed
    # back in a usage error.
    urls = [os.environ.get(STORAGE_ENV, "")] + [arg.partition("=")[2] if arg.startswith("--") else arg
                                                 for arg in argv if "://" in arg]
    return sorted({s for url in urls if url for s in url_secrets(url)}, key=len, reverse=True)


class _Redacting:
    """A text stream that writes ``***`` wherever one of ``secrets`` would have appeared."""

    def __init__(self, stream: TextIO, secrets: Sequence[str]) -> None:
        self._stream, self._secrets = stream, list(secrets)

    def write(self, text: str) -> int:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return self._stream.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _trial_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a trial number (an integer >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"trial {value} does not exist: trial numbers start at 0")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return value


def _study_name(text: str) -> str:
    from adabatch.study import StudySpecError, check_study_name

    try:
        return check_study_name(text)
    except StudySpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _storage_url(text: str) -> str:
    from adabatch.storage import redact

    if not text.strip():
        raise argparse.ArgumentTypeError("the URL is empty; give e.g. sqlite:///adabatch.db")
    if "://" not in text:
        raise argparse.ArgumentTypeError(f"{redact(text, text)!r} is not a database URL; give e.g. "
                                         "sqlite:///adabatch.db or postgresql+psycopg://user@host:5432/db")
    return text


def _storage(args: argparse.Namespace) -> str:
    """The storage URL: --storage, else $ADABATCH_STORAGE, else the SQLite file in the working directory."""
    from adabatch.storage import DEFAULT_STORAGE

    if args.storage is not None:
        return args.storage
    env = os.environ.get(STORAGE_ENV)
    if env is not None:
        if not env.strip():
            raise _usage_error(f"${STORAGE_ENV} is set but empty; unset it or give a URL")
        return env
    return DEFAULT_STORAGE


def _usage_error(message: str) -> Exception:
    from adabatch.storage import StorageError

    return StorageError(message)


def _demo(args: argparse.Namespace) -> int:
    from adabatch import demo

    parser = _Parser(prog="adabatch demo", description="Train a small model and watch the batch size adapt.")
    demo.add_arguments(parser)
    return int(demo.run(parser.parse_args(args.demo_args)) or 0)


def _run(args: argparse.Namespace) -> int:
    import logging

    import optuna

    from adabatch.storage import DatabaseRetry
    from adabatch.study import StudySpec, run_study, trial_counts

    spec = StudySpec.from_toml(args.file)
    storage = _storage(args)
    # Our per-trial line (with the energy source) replaces Optuna's INFO line per trial.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("adabatch").setLevel(logging.WARNING)
    study = run_study(spec, storage, n_trials=args.n_trials, study_name=args.study_name, timeout=args.timeout,
                      progress=not args.no_progress, log=print, notify=_notice)
    counts = DatabaseRetry(spec.db_retry_seconds, url=storage, notify=_notice)(lambda: trial_counts(study),
                                                                               "reading the study")
    print(f"study {study.study_name!r}: {counts['trials']} trials in total, n_trials = {spec.n_trials} "
          f"({_counts_text(counts)}). Next: adabatch study best {study.study_name}" + _storage_flag(args))
    return 0


def _counts_text(counts: dict[str, int]) -> str:
    """Every run of a trial by outcome: "5 complete, 1 pruned, 1 failed and retried, 1 queued"."""
    retried = counts.get("FAIL_RETRIED", 0)
    shown = {"complete": counts.get("COMPLETE", 0), "pruned": counts.get("PRUNED", 0),
             "failed and retried": retried, "failed": counts.get("FAIL", 0) - retried,
             "running": counts.get("RUNNING", 0), "queued": counts.get("WAITING", 0)}
    return ", ".join(f"{n} {what}" for what, n in shown.items() if n) or "none yet"


def _list(args: argparse.Namespace) -> int:
    from adabatch.study import list_studies

    summaries = list_studies(_storage(args))
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
    from adabatch.study import describe_settings, describe_trial, load_study, trial_counts

    study = load_study(args.name, _storage(args), notify=_notice)
    for line in describe_settings(study):
        print(line)
    counts = trial_counts(study)
    total = f" of {counts['n_trials']}" if counts.get("n_trials") else ""
    print(f"trials: {counts['trials']}{total} ({_counts_text(counts)})")
    for t in study.trials:
        print("  " + describe_trial(t, study))
    return 0


def _best(args: argparse.Namespace) -> int:
    from adabatch.study import best_trials, describe_trial, load_study, objective_names, verification

    study = load_study(args.name, _storage(args), notify=_notice)
    best = best_trials(study)
    if not best:
        print(f"study {study.study_name!r} has no completed feasible trial yet.")
        return 0
    if len(study.directions) > 1:
        print(f"Pareto front of {study.study_name!r}: {len(best)} trial(s); export one with --trial N")
    verified = verification(study)
    if verified is not None:
        for line in verified.lines(objective_names(study)[0]):
            print(line)
        print("best trial, by its mean on the fresh seeds:" if verified.complete else
              "best so far, by the trials' own seeds (verification unfinished):")
    for t in best:
        print("  " + describe_trial(t, study))
    return 0


def _export(args: argparse.Namespace) -> int:
    from adabatch.study import export_config, load_study

    out = Path(args.output)
    if out.is_dir():
        raise _usage_error(f"-o {out} is a folder; give a file name such as {out / 'best.json'}")
    if not out.parent.is_dir():
        raise _usage_error(f"-o {out}: the folder {out.parent} does not exist; create it first")
    study = load_study(args.name, _storage(args), notify=_notice)
    trial, path = export_config(study, out, args.trial)
    what = f"trial {trial.number}" if trial is not None else \
        "the default config (no trial beat it on the fresh seeds; see 'adabatch study best')"
    print(f"wrote the config of {what} to {path}; load it with ControllerConfig.load({str(path)!r})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from adabatch.study import load_study, plot_study

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise _usage_error(f"-o {out} is a file; give a folder for the PNGs and index.html")
    storage = _storage(args)
    study = load_study(args.name, storage, notify=_notice)
    files = plot_study(study, out, storage, args.trial)
    for path in files.values():
        print(path)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from adabatch.study import delete_study

    delete_study(args.name, _storage(args))
    print(f"deleted study {args.name!r} and its traces")
    return 0


def _storage_flag(args: argparse.Namespace) -> str:
    """The --storage part of a suggested next command: the password hidden, or nothing when it came from the env."""
    from adabatch.storage import DEFAULT_STORAGE, describe_url, url_secrets

    if args.storage is None or args.storage == DEFAULT_STORAGE:
        return ""
    flag = f" --storage {describe_url(args.storage)}"
    if url_secrets(args.storage):
        flag += f" (password hidden; set {STORAGE_ENV} to the URL to keep it off command lines)"
    return flag


if __name__ == "__main__":
    sys.exit(main())
