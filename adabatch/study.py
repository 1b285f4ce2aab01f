"""Optuna studies that tune the controller's knobs against accuracy, wall time and energy.

A study is defined by a TOML file (see ``studies/``) with these tables:

- ``[study]``: ``name``, ``workload`` (a built-in name or ``module:function``), ``objectives``
  (one or more of :data:`OBJECTIVES`), ``sampler`` (``tpe``, multi-objective TPE when there are
  several objectives, or ``nsga2``), ``pruner`` (single objective only), ``require_target``
  (a constraint: the validation metric must reach the target), ``target``, ``n_trials`` (the
  study's total), ``seed`` (seeds the workload and the sampler), ``seeds_per_trial`` (each trial
  trains on seeds ``seed .. seed + n - 1`` and reports their mean, so a config is chosen for
  what it does, not for one lucky run; default 1), ``sample_budget``, ``eval_every``,
  ``stop_at_target``, ``startup_trials`` (TPE), ``population_size`` (NSGA-II).
- ``[pruner]``: the pruner's settings, counted in samples like the budget (see
  :data:`PRUNER_KEYS`): ``startup_trials`` (completed trials before any pruning, default 5),
  ``warmup_samples`` (no pruning before, default half the budget), ``interval_samples``
  (default: every evaluation), ``percentile`` (Optuna's meaning: keep trials in the top
  ``percentile`` percent at the same step; default 75, the median pruner is 50),
  ``min_samples`` and ``reduction_factor`` (Hyperband, successive halving). The report at the
  end of the budget never prunes, so a trial that ran its whole budget keeps its value.
- ``[reliability]``: ``heartbeat_interval`` and ``grace_period`` in seconds, ``max_retry``,
  ``db_retry_seconds`` (how long a worker waits for a database that went away).
- ``[verify]`` (one objective): ``top_k`` (default 5 when the table is there; 0 turns it off),
  ``seeds`` (default 5), ``baseline`` (default true). Once the study has all its trials, the
  ``top_k`` best are trained again on ``seeds`` fresh seeds, and so is the default config; ``best``
  and ``export`` choose by those runs (:mod:`adabatch.verify`). Not fingerprinted: it changes no
  trial.
- ``[fixed]``: :class:`~adabatch.ControllerConfig` fields held constant.
- ``[search]``: one entry per tuned field, e.g. ``grow_threshold = {low = 1.1, high = 3.0}``,
  ``cooldown_samples = {low = 0, high = 4096, step = 256}``, ``target_factor = {low = 0.1,
  high = 2.0, log = true}`` or ``lr_rule = {choices = ["linear", "sqrt"]}``.

The first run stores the file's settings in the study with a fingerprint; a later run from a
changed file is refused with the changed keys named (``n_trials`` and ``[reliability]`` may
change). Running the file again finishes the study to ``n_trials``. Each trial builds a config
from the fixed and sampled values, trains the workload with :func:`adabatch.workloads.train`,
stores the per-step trace through :class:`adabatch.storage.TraceStore` and returns the
objectives. Optuna cannot prune multi-objective studies, so a pruner needs a single objective.

Example:
    >>> spec = StudySpec.from_dict({
    ...     "study": {"name": "doc", "workload": "linreg", "n_trials": 2, "sample_budget": 2000,
    ...               "eval_every": 1000},
    ...     "search": {"grow_threshold": {"low": 1.2, "high": 3.0}}})
    >>> spec.directions()
    ['minimize']
    >>> import tempfile, os
    >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "studies.db")
    >>> study = run_study(spec, url, progress=False)
    >>> len(study.trials), len(run_study(spec, url, progress=False).trials)  # the second run has nothing left
    (2, 2)
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import decimal
import hashlib
import html
import itertools
import json
import math
import os
import signal
import socket
import statistics
import threading
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from adabatch.config import ConfigError, ControllerConfig
from adabatch.verify import Report, Verifier, VerifySettings, fresh_seeds
from adabatch.verify import report as verify_report
from adabatch.storage import (
    DB_RETRY_S,
    DEFAULT_STORAGE,
    DatabaseRetry,
    DatabaseUnavailable,
    Heartbeat,
    StorageError,
    TraceStore,
    describe_url,
    fail_stale_trials,
    is_memory_sqlite,
    open_optuna_storage,
    retried_trial_number,
    study_lock,
)

SAMPLERS = ("tpe", "nsga2")
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving")
# The [pruner] settings each pruner takes; every count is in samples, like sample_budget.
PRUNER_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "median": ("startup_trials", "warmup_samples", "interval_samples"),
    "percentile": ("startup_trials", "warmup_samples", "interval_samples", "percentile"),
    "hyperband": ("min_samples", "reduction_factor"),
    "successive_halving": ("min_samples", "reduction_factor"),
}
DEFAULT_EVAL_EVERY = 8_000
# Study attributes: the settings that define the trials (fingerprinted), their hash, and what
# the latest run used of the rest (n_trials, [reliability]), which may change between runs.
SPEC_ATTR = "adabatch_spec"
FINGERPRINT_ATTR = "adabatch_fingerprint"
RUN_ATTR = "adabatch_run"
# Trial attributes: the signal that interrupted a trial, and why a trial failed.
INTERRUPTED_ATTR = "interrupted"
FAIL_REASON_ATTR = "fail_reason"
MAX_STUDY_NAME = 512  # Optuna's column width
MAX_SEED = 2**32 - 1  # numpy's and the samplers' limit
MAX_COUNT = 10**9
MAX_SECONDS = 7 * 24 * 3600
# At most this many corners of the search box are checked against ControllerConfig up front.
MAX_CORNERS = 4096


class StudySpecError(ValueError):
    """A study file or study request is invalid; the message names the key and what to do."""


class StudyNotFoundError(LookupError):
    """No study of that name in the storage."""


class StudyInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``run_study``; the trial it stopped, if any, is retried on the next run.

    Example:
        >>> exc = StudyInterrupted(signal.SIGTERM)
        >>> exc.signame, exc.exit_code
        ('SIGTERM', 143)
    """

    def __init__(self, signum: int, trial_number: int | None = None) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.trial_number = trial_number  # the interrupted trial, None when none was running
        self.recorded = False  # whether its FAIL and retry reached the database (else its heartbeat goes stale)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

# ----------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """One quantity a trial reports: its name, how to read it from a run, and which way is better.

    ``direction`` is ``"maximize"``, ``"minimize"`` or ``"metric"`` (the workload's own direction:
    maximize accuracy, minimize validation loss).
    """

    name: str
    direction: str
    read: Callable[[Any], float]
    help: str

    def resolve_direction(self, higher_is_better: bool) -> str:
        if self.direction == "metric":
            return "maximize" if higher_is_better else "minimize"
        return self.direction


def _or(value: Any, fallback: Any) -> float:
    # A run that never reaches the target is charged its whole budget; pair such objectives with
    # require_target so the sampler also knows the trial is infeasible.
    return float(fallback if value is None else value)


def _energy(value: Any) -> float:
    return math.nan if value is None else float(value)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("metric", "metric", lambda r: r.final_metric, "validation metric at the end of the run"),
    Objective("best_metric", "metric", lambda r: r.best_metric, "best validation metric over the run"),
    Objective("seconds", "minimize", lambda r: r.wall_seconds, "wall seconds of the run"),
    Objective("energy", "minimize", lambda r: _energy(r.energy_j), "joules of the run (see energy_source)"),
    Objective("seconds_to_target", "minimize", lambda r: _or(r.seconds_to_target, r.wall_seconds),
              "wall seconds until the target was reached (whole run if never)"),
    Objective("samples_to_target", "minimize", lambda r: _or(r.samples_to_target, r.samples),
              "samples until the target was reached (whole run if never)"),
    Objective("energy_to_target", "minimize", lambda r: _or(r.energy_to_target, _energy(r.energy_j)),
              "joules until the target was reached (whole run if never)"),
)}


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Param:
    """One tuned :class:`ControllerConfig` field and its range (or choices).

    Example:
        >>> Param.from_dict("cooldown_samples", {"low": 0, "high": 4096, "step": 256}).kind
        'int'
    """

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    KEYS = ("type", "low", "high", "log", "step", "choices")

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "Param":
        where = f"[search] {name}"
        if not isinstance(data, Mapping):
            raise StudySpecError(f"{where} must be a table such as {{low = 1, high = 2}} or {{choices = [...]}}, "
                                 f"got {data!r}.")
        _no_unknown(data, cls.KEYS, where)
        kind = data.get("type")
        if kind is None:
            if "choices" in data:
                kind = "categorical"
            else:
                kind = "int" if all(_is_int(data.get(k)) for k in ("low", "high")) else "float"
        if kind not in ("float", "int", "categorical"):
            raise StudySpecError(f"{where}: type={kind!r} is invalid: accepted float, int or categorical.")
        if kind == "categorical":
            extra = sorted(set(data) - {"type", "choices"})
            if extra:
                raise StudySpecError(f"{where}: {', '.join(extra)} do not apply to choices; remove them.")
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices:
                raise StudySpecError(f"{where}: choices must be a non-empty list, got {choices!r}.")
            for c in choices:
                # Optuna stores choices as JSON scalars; a table, list or date cannot be one.
                if not (isinstance(c, (str, bool, int)) or (isinstance(c, float) and math.isfinite(c))):
                    raise StudySpecError(f"{where}: choice {c!r} must be a string, number or true/false.")
            if len({json.dumps(c) for c in choices}) != len(choices):
                raise StudySpecError(f"{where}: choices lists a value twice: {choices!r}.")
            return cls(name, kind, choices=tuple(choices))
        for key in ("low", "high"):
            if key not in data:
                raise StudySpecError(f"{where}: missing {key}; give both low and high (or choices).")
            v = data[key]
            ok = _is_int(v) if kind == "int" else _is_number(v)
            if not ok:
                raise StudySpecError(f"{where}: {key}={v!r} must be {'an integer' if kind == 'int' else 'a number'}.")
        low, high = data["low"], data["high"]
        if low > high:
            raise StudySpecError(f"{where}: low={low!r} is above high={high!r}; swap them.")
        if kind == "float" and not math.isfinite(float(high) - float(low)):
            raise StudySpecError(f"{where}: the range [{low!r}, {high!r}] is too wide to sample; narrow it.")
        log = data.get("log", False)
        if not isinstance(log, bool):
            raise StudySpecError(f"{where}: log={log!r} must be true or false.")
        if log and low <= 0:
            raise StudySpecError(f"{where}: log=true needs low > 0, got low={low!r}.")
        step = data.get("step")
        if step is not None:
            if not (_is_int(step) if kind == "int" else _is_number(step)) or step <= 0:
                raise StudySpecError(f"{where}: step={step!r} must be a positive {kind}.")
            if log and (kind == "float" or step != 1):
                raise StudySpecError(f"{where}: step and log=true cannot be combined; drop one.")
            span = decimal.Decimal(str(high)) - decimal.Decimal(str(low))
            if span % decimal.Decimal(str(step)) != 0:
                fit = decimal.Decimal(str(low)) + (span // decimal.Decimal(str(step))) * decimal.Decimal(str(step))
                raise StudySpecError(f"{where}: high - low = {span} is not a multiple of step={step!r}; "
                                     f"set high = {fit} (or change step).")
        return cls(name, kind, low, high, log, step)

    def values_to_check(self) -> tuple[Any, ...]:
        return self.choices if self.kind == "categorical" else (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        """The entry as the study file writes it (``type`` only where it cannot be inferred)."""
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


STUDY_KEYS = ("name", "workload", "objectives", "sampler", "pruner", "require_target", "target", "n_trials",
              "seed", "seeds_per_trial", "sample_budget", "eval_every", "stop_at_target", "startup_trials",
              "population_size")
RELIABILITY_KEYS = ("heartbeat_interval", "grace_period", "max_retry", "db_retry_seconds")
VERIFY_KEYS = ("top_k", "seeds", "baseline")
TOP_KEYS = ("study", "pruner", "reliability", "verify", "fixed", "search")


@dataclass(frozen=True)
class StudySpec:
    """A validated study definition (what a ``studies/*.toml`` file says).

    Example:
        >>> spec = StudySpec.from_dict({"study": {"name": "s", "workload": "linreg"},
        ...                             "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
        >>> spec.objectives, spec.params[0].kind
        (('metric',), 'float')
    """

    name: str
    workload: str
    params: tuple[Param, ...]
    objectives: tuple[str, ...] = ("metric",)
    sampler: str = "tpe"
    pruner: str = "none"
    require_target: bool = False
    target: float | None = None
    n_trials: int = 20
    seed: int = 0
    seeds_per_trial: int = 1
    sample_budget: int | None = None
    eval_every: int | None = None
    stop_at_target: bool = False
    startup_trials: int = 10
    population_size: int = 20
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 3
    db_retry_seconds: int = DB_RETRY_S
    fixed: Mapping[str, Any] = field(default_factory=dict)
    verify: VerifySettings = VerifySettings()
    # The [pruner] table as given; pruner_config() fills in the defaults.
    pruner_settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path) -> "StudySpec":
        """Read and validate a study file; every problem is a :class:`StudySpecError` naming the key."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise StudySpecError(f"no study file at {path}; see studies/ for examples.") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # a folder, no permission, bad bytes
            if isinstance(exc, tomllib.TOMLDecodeError):
                raise StudySpecError(f"{path} is not valid TOML: {exc}") from None
            raise StudySpecError(f"cannot read study file {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except StudySpecError as exc:
            raise StudySpecError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudySpec":
        if not isinstance(data, Mapping):
            raise StudySpecError(f"a study must be a table of tables, got {type(data).__name__}.")
        _no_unknown(data, TOP_KEYS, "top level")
        study = _table(data, "study")
        pruner_table = dict(_table(data, "pruner"))
        reliability = _table(data, "reliability")
        verify = _table(data, "verify")
        fixed = dict(_table(data, "fixed"))
        search = _table(data, "search")
        _no_unknown(study, STUDY_KEYS, "[study]")
        _no_unknown(reliability, RELIABILITY_KEYS, "[reliability]")
        _no_unknown(verify, VERIFY_KEYS, "[verify]")
        kw: dict[str, Any] = {}
        if verify:
            kw["verify"] = VerifySettings(
                top_k=_int_in(verify, "top_k", 0, 1000, "[verify]") if "top_k" in verify else 5,
                seeds=_int_in(verify, "seeds", 1, 100, "[verify]") if "seeds" in verify else VerifySettings.seeds,
                baseline=_typed(verify, "baseline", bool, "true or false", "[verify]") if "baseline" in verify else True)
        for key in ("name", "workload"):
            if key not in study:
                raise StudySpecError(f"[study] needs {key} = \"...\".")
            kw[key] = _typed(study, key, str, "a string")
            if not kw[key].strip():
                raise StudySpecError(f"[study] {key} must not be empty.")
        check_study_name(kw["name"], "[study] name")
        if "objectives" in study:
            objs = study["objectives"]
            if isinstance(objs, str):
                objs = [objs]
            if not isinstance(objs, list) or not objs or not all(isinstance(o, str) for o in objs):
                raise StudySpecError(f"[study] objectives must be a non-empty list of names, got {objs!r}.")
            unknown = [o for o in objs if o not in OBJECTIVES]
            if unknown:
                raise StudySpecError(f"[study] objectives: unknown {', '.join(map(repr, unknown))}; "
                                     f"accepted: {', '.join(OBJECTIVES)}.")
            if len(set(objs)) != len(objs):
                raise StudySpecError(f"[study] objectives lists a name twice: {objs!r}.")
            kw["objectives"] = tuple(objs)
        for key, accepted in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            if key in study:
                kw[key] = _typed(study, key, str, "a string")
                if kw[key] not in accepted:
                    raise StudySpecError(f"[study] {key}={kw[key]!r} is invalid: accepted {', '.join(accepted)}.")
        for key in ("require_target", "stop_at_target"):
            if key in study:
                kw[key] = _typed(study, key, bool, "true or false")
        if "target" in study:
            kw["target"] = _typed(study, "target", (int, float), "a number")
            if not math.isfinite(kw["target"]):
                raise StudySpecError(f"[study] target={kw['target']!r} must be a finite number.")
        for key, low, high in (("n_trials", 1, MAX_COUNT), ("seed", 0, MAX_SEED), ("seeds_per_trial", 1, 100),
                               ("sample_budget", 1, 10**12),
                               ("eval_every", 1, 10**12), ("startup_trials", 0, MAX_COUNT),
                               ("population_size", 2, MAX_COUNT)):
            if key in study:
                kw[key] = _int_in(study, key, low, high, "[study]")
        for key, low, high in (("heartbeat_interval", 1, MAX_SECONDS), ("grace_period", 1, MAX_SECONDS),
                               ("max_retry", 0, 1000), ("db_retry_seconds", 0, MAX_SECONDS)):
            if key in reliability:
                kw[key] = _int_in(reliability, key, low, high, "[reliability]")
        if not search:
            raise StudySpecError("[search] is empty: add at least one ControllerConfig field to tune, "
                                 "e.g. grow_threshold = {low = 1.1, high = 3.0}.")
        known = {f.name for f in dataclasses.fields(ControllerConfig)} - {"extra"}
        for table, names in (("[fixed]", fixed), ("[search]", search)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise StudySpecError(f"{table}: unknown ControllerConfig field(s) {', '.join(unknown)}; "
                                     f"known: {', '.join(sorted(known))}.")
        both = sorted(set(fixed) & set(search))
        if both:
            raise StudySpecError(f"{', '.join(both)} appear in both [fixed] and [search]; keep each in one.")
        params = tuple(Param.from_dict(name, value) for name, value in search.items())
        base = _config(fixed, "[fixed]")
        for p in params:
            for value in p.values_to_check():
                try:
                    base.replace(**{p.name: value})
                except (ConfigError, TypeError) as exc:
                    raise StudySpecError(f"[search] {p.name}: {value!r} cannot be used: {exc}") from None
        _check_corners(base, params)
        spec = cls(params=params, fixed=fixed, pruner_settings=pruner_table, **kw)
        spec._check_combination()
        return spec

    def _check_combination(self) -> None:
        if self.pruner != "none":
            if len(self.objectives) > 1:
                raise StudySpecError(f"[study] pruner={self.pruner!r} with {len(self.objectives)} objectives: Optuna "
                                     "cannot prune multi-objective studies; set pruner = \"none\".")
            if OBJECTIVES[self.objectives[0]].direction != "metric":
                raise StudySpecError(f"[study] pruner={self.pruner!r} prunes on the validation metric, so the "
                                     f"objective must be metric or best_metric, not {self.objectives[0]!r}.")
        if self.grace_period <= self.heartbeat_interval:
            raise StudySpecError(f"[reliability] grace_period={self.grace_period} must exceed heartbeat_interval="
                                 f"{self.heartbeat_interval}, or live trials look dead; use at least twice the interval.")
        if self.verify.top_k and len(self.objectives) > 1:
            raise StudySpecError(f"[verify] re-runs the best trials of a study with one objective; this one has "
                                 f"{len(self.objectives)} ({', '.join(self.objectives)}): remove [verify] or set "
                                 "top_k = 0.")
        self.workload_obj()  # an unknown workload fails here, before any trial starts
        self.trial_seeds()
        self.verify_seeds()
        budget = self.budget()
        if self.eval_every is not None and self.eval_every > budget:
            raise StudySpecError(f"[study] eval_every={self.eval_every} exceeds sample_budget={budget}; "
                                 "evaluate at least once per run.")
        self.pruner_config()

    def workload_obj(self) -> Any:
        """The :class:`~adabatch.workloads.Workload`, with ``target`` overridden if the file sets one."""
        from adabatch.workloads import get_workload

        try:
            wl = get_workload(self.workload)
        except ValueError as exc:
            raise StudySpecError(f"[study] workload: {exc}") from None
        except Exception as exc:  # a user's module:function that fails when called
            raise StudySpecError(f"[study] workload {self.workload!r} failed to load: "
                                 f"{type(exc).__name__}: {exc}") from None
        return wl if self.target is None else dataclasses.replace(wl, target=float(self.target))

    def budget(self) -> int:
        """Samples per run: ``sample_budget``, else the workload's own budget."""
        return int(self.sample_budget or self.workload_obj().sample_budget)

    def trial_seeds(self) -> list[int]:
        """The seeds every trial trains on, in order (the same for every trial)."""
        if self.seed + self.seeds_per_trial - 1 > MAX_SEED:
            raise StudySpecError(f"[study] seed={self.seed} with seeds_per_trial={self.seeds_per_trial} runs past "
                                 f"the largest seed {MAX_SEED}.")
        return list(range(self.seed, self.seed + self.seeds_per_trial))

    def verify_seeds(self) -> list[int]:
        """The fresh seeds ``[verify]`` re-runs the best trials on: the ones after the trials' own."""
        seeds = fresh_seeds(self.seed, self.seeds_per_trial, self.verify)
        if self.verify.top_k and seeds[-1] > MAX_SEED:
            raise StudySpecError(f"[verify] seeds={self.verify.seeds} after seed={self.seed} and seeds_per_trial="
                                 f"{self.seeds_per_trial} run past the largest seed {MAX_SEED}.")
        return seeds if self.verify.top_k else []

    def eval_interval(self) -> int:
        """Samples between evaluations (and pruning checks)."""
        return int(self.eval_every or min(DEFAULT_EVAL_EVERY, self.budget()))

    def pruner_config(self) -> dict[str, Any]:
        """The pruner's kind and settings with defaults filled in; raises :class:`StudySpecError`.

        Example:
            >>> spec = StudySpec.from_dict({"study": {"name": "s", "workload": "linreg", "pruner": "median",
            ...     "sample_budget": 4000, "eval_every": 1000}, "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
            >>> spec.pruner_config()
            {'kind': 'median', 'startup_trials': 5, 'warmup_samples': 2000, 'interval_samples': 1000}
        """
        kind, given = self.pruner, dict(self.pruner_settings)
        accepted = PRUNER_KEYS[kind]
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            hint = f"accepted for pruner = \"{kind}\": {', '.join(accepted)}" if accepted else \
                "pruner = \"none\" takes no settings; remove the table or pick a pruner in [study]"
            raise StudySpecError(f"[pruner]: {', '.join(unknown)} do not apply; {hint}.")
        budget, every = self.budget(), self.eval_interval()
        defaults: dict[str, Any] = {
            "startup_trials": 5, "warmup_samples": budget // 2, "interval_samples": every, "percentile": 75.0,
            "min_samples": every, "reduction_factor": 3 if kind == "hyperband" else 4,
        }
        out: dict[str, Any] = {"kind": kind}
        for key in accepted:
            out[key] = given.get(key, defaults[key])
        for key, low in (("startup_trials", 0), ("warmup_samples", 0), ("interval_samples", 1), ("min_samples", 1),
                         ("reduction_factor", 2)):
            if key in given:
                _int_in(given, key, low, 10**12, "[pruner]")
        if "percentile" in given:
            v = given["percentile"]
            if not _is_number(v) or not 0 < v < 100:
                raise StudySpecError(f"[pruner] percentile={v!r} is invalid: accepted a number in (0, 100), the "
                                     "share of trials kept at each step (50 prunes like the median pruner).")
            out["percentile"] = float(v)
        if "interval_samples" in out and out["interval_samples"] % every:
            raise StudySpecError(f"[pruner] interval_samples={out['interval_samples']} must be a multiple of "
                                 f"eval_every={every}: pruning is checked only at evaluations.")
        if "min_samples" in out and out["min_samples"] >= budget:
            raise StudySpecError(f"[pruner] min_samples={out['min_samples']} must be below the sample budget "
                                 f"{budget}.")
        return out

    def directions(self) -> list[str]:
        higher = self.workload_obj().higher_is_better
        return [OBJECTIVES[o].resolve_direction(higher) for o in self.objectives]

    def config_for(self, params: Mapping[str, Any]) -> ControllerConfig:
        """The controller config a trial with ``params`` runs (fixed values plus sampled ones)."""
        return ControllerConfig.from_dict({**self.fixed, **params})

    def default_config(self) -> ControllerConfig:
        """The config the study is measured against: ``[fixed]`` alone, every tuned field at its default."""
        return ControllerConfig.from_dict(dict(self.fixed))

    def reliability(self) -> dict[str, int]:
        return {"heartbeat_interval": self.heartbeat_interval, "grace_period": self.grace_period,
                "max_retry": self.max_retry, "db_retry_seconds": self.db_retry_seconds}

    def normalised(self) -> dict[str, Any]:
        """The settings that decide what a trial runs and how trials are chosen, defaults filled in.

        This is what the study stores and fingerprints. Left out: ``name`` (``--study-name`` may
        differ), ``n_trials`` and ``[reliability]``, which may change between runs of one study.

        Example:
            >>> spec = StudySpec.from_dict({"study": {"name": "s", "workload": "linreg", "sample_budget": 4000},
            ...                             "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
            >>> spec.normalised()["search"], spec.normalised()["study"]["eval_every"]
            ({'window_fraction': {'type': 'float', 'low': 0.05, 'high': 0.5}}, 4000)
        """
        wl = self.workload_obj()
        study: dict[str, Any] = {"workload": self.workload, "objectives": list(self.objectives),
                                 "sampler": self.sampler}
        if self.sampler == "tpe":
            study["startup_trials"] = self.startup_trials
        else:
            study["population_size"] = self.population_size
        study.update(seed=self.seed, require_target=self.require_target, target=float(wl.target),
                     sample_budget=self.budget(), eval_every=self.eval_interval(), stop_at_target=self.stop_at_target)
        if self.seeds_per_trial > 1:  # left out at 1, so studies from before the key keep their fingerprint
            study["seeds_per_trial"] = self.seeds_per_trial
        return {"study": study, "pruner": self.pruner_config(),
                "fixed": {k: self.fixed[k] for k in sorted(self.fixed)},
                "search": {p.name: p.to_dict() for p in sorted(self.params, key=lambda p: p.name)}}

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`normalised` in canonical JSON (2 and 2.0 hash alike)."""
        return fingerprint_of(self.normalised())

    def to_dict(self) -> dict[str, Any]:
        """Everything the file says, normalised: :meth:`normalised` plus name, n_trials and [reliability]."""
        out = self.normalised()
        out["study"] = {"name": self.name, "n_trials": self.n_trials, **out["study"]}
        out["reliability"] = self.reliability()
        out["verify"] = self.verify.to_dict()
        return out


def fingerprint_of(normalised: Mapping[str, Any]) -> str:
    text = json.dumps(_canonical(normalised), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def spec_changes(old: Mapping[str, Any], new: Mapping[str, Any], *, only_old_keys: bool = False) -> list[str]:
    """What differs between two normalised specs, one ``[table] key: old -> new`` per changed key.

    Example:
        >>> spec_changes({"fixed": {"max_batch": 1024}}, {"fixed": {"max_batch": 512}})
        ['[fixed] max_batch: 1024 -> 512']
    """
    def flat(spec: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
        return {(table, key): value for table, entries in spec.items() if isinstance(entries, Mapping)
                for key, value in entries.items()}

    a, b = flat(_canonical(old)), flat(_canonical(new))
    keys = a if only_old_keys else {**a, **b}
    out = []
    for table, key in sorted(keys, key=lambda k: (TOP_KEYS.index(k[0]) if k[0] in TOP_KEYS else 99, k[1])):
        before, after = a.get((table, key), _ABSENT), b.get((table, key), _ABSENT)
        if before != after:
            out.append(f"[{table}] {key}: {_toml(before)} -> {_toml(after)}")
    return out


_ABSENT = object()


def _toml(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def check_study_name(name: Any, where: str = "--study-name") -> str:
    """``name`` if Optuna can store it and a terminal can show it; else :class:`StudySpecError`.

    Example:
        >>> check_study_name("mnist1d-quick")
        'mnist1d-quick'
    """
    if not isinstance(name, str) or not name.strip():
        raise StudySpecError(f"{where} must be a non-empty string, got {name!r}.")
    if len(name) > MAX_STUDY_NAME:
        raise StudySpecError(f"{where} is {len(name)} characters long; at most {MAX_STUDY_NAME} are stored.")
    if any(not ch.isprintable() for ch in name):
        raise StudySpecError(f"{where}={name!r} contains control characters; use letters, digits, '-' or '_'.")
    return name


def _check_corners(base: ControllerConfig, params: Sequence[Param]) -> None:
    # ControllerConfig's checks are bounds and orderings, so a box whose corners are valid
    # configs holds only valid ones; checking them now spares FAIL trials later.
    values = [p.values_to_check() for p in params]
    if math.prod(len(v) for v in values) > MAX_CORNERS:
        return
    for combo in itertools.product(*values):
        changes = {p.name: v for p, v in zip(params, combo)}
        try:
            base.replace(**changes)
        except (ConfigError, TypeError) as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            raise StudySpecError(f"[search] the combination {shown} is invalid: {exc} Narrow the ranges so that "
                                 "every combination is a valid config.") from None


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise StudySpecError(f"[{key}] must be a table, got {type(value).__name__}.")
    return value


def _no_unknown(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise StudySpecError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(known)}.")


def _typed(data: Mapping[str, Any], key: str, kind: Any, accepted: str, where: str = "[study]") -> Any:
    value = data[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise StudySpecError(f"{where} {key}={value!r} has the wrong type: expected {accepted}.")
    return value


def _int_in(data: Mapping[str, Any], key: str, minimum: int, maximum: int, where: str) -> int:
    value = data[key]
    if not _is_int(value) or not minimum <= value <= maximum:
        raise StudySpecError(f"{where} {key}={value!r} is invalid: accepted an integer from {minimum} to {maximum}.")
    return value


def _config(values: Mapping[str, Any], where: str) -> ControllerConfig:
    try:
        return ControllerConfig.from_dict(values)
    except (ConfigError, TypeError) as exc:
        raise StudySpecError(f"{where}: {exc}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

# ----------------------------------------------------------------------------- sampling and pruning


def constraint_values(trial: Any) -> Sequence[float]:
    """Optuna ``constraints_func``: feasible when <= 0. Trials without a result count as infeasible."""
    return trial.user_attrs.get("constraint", (1.0,))


# Optuna >= 5 takes constraints from the trial (set_constraint); older ones from the sampler.
_NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` in a study seeded with ``seed`` (a 32-bit hash of both).

    Example:
        >>> trial_seed(0, 0) == trial_seed(0, 0) != trial_seed(0, 1)
        True
    """
    return int.from_bytes(hashlib.sha256(f"adabatch/{seed}/{number}".encode()).digest()[:4], "big")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Samples each trial with a fresh sampler seeded from the study's seed and the trial's number.

    Trial ``n`` gets the same parameters in every run with the same history, whichever worker
    runs it, and parallel workers (which read the same seed) never draw the same random start-up
    points. The samplers used here keep their state in the study, so a fresh one loses nothing.

    Example:
        >>> def first_two(seed):
        ...     sampler = TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
        ...     study = optuna.create_study(sampler=sampler)
        ...     study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        ...     return [t.params["x"] for t in study.trials]
        >>> first_two(7) == first_two(7), first_two(7) == first_two(8)
        (True, False)
    """

    def __init__(self, make: Callable[[int], Any], seed: int) -> None:
        self.make, self.seed = make, seed
        self._number: int | None = None
        self._sampler: Any = None

    def _for(self, number: int) -> Any:
        if number != self._number:
            self._number, self._sampler = number, self.make(trial_seed(self.seed, number))
        return self._sampler

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self._for(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._for(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._for(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._for(trial.number).before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self._for(trial.number).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        pass  # seeds come from the trial number, never from the clock


def make_sampler(spec: StudySpec) -> Any:
    """The study's sampler, seeded per trial from the file's ``seed`` (see :class:`TrialSeededSampler`)."""
    constraints = constraint_values if spec.require_target and not _NATIVE_CONSTRAINTS else None

    def make(seed: int) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if spec.sampler == "nsga2":
                return optuna.samplers.NSGAIISampler(population_size=spec.population_size,
                                                     constraints_func=constraints, seed=seed)
            # TPE is multi-objective TPE when the study has several directions; constant_liar keeps
            # parallel workers from proposing the same point.
            return optuna.samplers.TPESampler(n_startup_trials=spec.startup_trials, constraints_func=constraints,
                                              multivariate=True, constant_liar=True, seed=seed)

    return TrialSeededSampler(make, spec.seed)


def make_pruner(spec: StudySpec) -> Any:
    """The pruner the file asks for; intermediate values are reported at sample counts, so its steps are samples.

    Example:
        >>> spec = StudySpec.from_dict({"study": {"name": "s", "workload": "linreg", "pruner": "percentile"},
        ...     "pruner": {"percentile": 10}, "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
        >>> type(make_pruner(spec)).__name__
        'PercentilePruner'
    """
    cfg = spec.pruner_config()
    kind = cfg["kind"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg["startup_trials"], n_warmup_steps=cfg["warmup_samples"],
                                           interval_steps=cfg["interval_samples"])
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(cfg["percentile"], n_startup_trials=cfg["startup_trials"],
                                               n_warmup_steps=cfg["warmup_samples"],
                                               interval_steps=cfg["interval_samples"])
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg["min_samples"],
                                              max_resource=spec.budget() * spec.seeds_per_trial,
                                              reduction_factor=cfg["reduction_factor"])
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg["min_samples"],
                                                      reduction_factor=cfg["reduction_factor"])
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- one trial


class TrialRunner:
    """The objective function: config from the trial, one training run, trace and results stored.

    It sees only configs and run results; the controller's internals stay inside ``train``.
    ``retry`` wraps every database call (see :class:`~adabatch.storage.DatabaseRetry`); ``check``
    runs after every optimizer step and may raise to stop the trial (an interrupt).
    """

    def __init__(self, spec: StudySpec, traces: TraceStore, study_name: str, *,
                 retry: Callable[[Callable[[], Any], str], Any] | None = None,
                 check: Callable[[], None] | None = None) -> None:
        self.spec, self.traces, self.study_name = spec, traces, study_name
        self.retry = retry or (lambda fn, what: fn())
        self.check = check or (lambda: None)
        self.workload = spec.workload_obj()
        self._data: dict[int, Any] = {}  # seed -> the workload's data, made once per worker

    def __call__(self, trial: Any) -> Sequence[float] | float:
        spec, wl, retry = self.spec, self.workload, self.retry
        # Sorted, so the order of [search] in the file does not change what a seed draws.
        params = {p.name: retry(lambda p=p: p.suggest(trial), f"sampling trial {trial.number}")
                  for p in sorted(spec.params, key=lambda p: p.name)}
        config = spec.config_for(params)
        attrs = {"config": config.to_dict(), "metric_name": wl.metric, "target": wl.target,
                 "worker": f"{socket.gethostname()}:{os.getpid()}"}
        retry(lambda: [trial.set_user_attr(k, v) for k, v in attrs.items()], f"starting trial {trial.number}")
        budget = spec.budget()
        prune = len(spec.objectives) == 1 and spec.pruner != "none"
        seeds = spec.trial_seeds()
        results = []
        for i, seed in enumerate(seeds):
            results.append(self._run_seed(trial, config, seed, offset=i * budget, last=i == len(seeds) - 1,
                                          prune=prune, trace=i == 0))
        retry(lambda: _store_results(trial, results, wl, spec.require_target), f"storing trial {trial.number}")
        values = [statistics.fmean(OBJECTIVES[o].read(r) for r in results) for o in spec.objectives]
        return values[0] if len(values) == 1 else values

    def _run_seed(self, trial: Any, config: ControllerConfig, seed: int, *, offset: int, last: bool,
                  prune: bool, trace: bool) -> Any:
        """One run of the trial's config on ``seed``; its evaluations are reported at ``offset`` + samples,
        so every trial's k-th seed is compared at the same pruner steps. Only the first seed's
        steps are stored as the trial's trace."""
        spec, wl, retry = self.spec, self.workload, self.retry
        budget = spec.budget()
        writer = self.traces.writer(self.study_name, trial.number) if trace else None

        def on_step(record: Any) -> None:
            self.check()
            if writer is not None:
                writer(record)

        def on_eval(ev: dict[str, float]) -> None:
            if writer is not None:
                writer.flush_all()
            if not prune:
                return
            value, due = float(ev[wl.metric]), int(ev["due"])
            # same steps in every trial
            retry(lambda: trial.report(value, step=offset + due), f"reporting trial {trial.number}")
            # The evaluation at the end of the last run (or at the target) ends the trial anyway:
            # pruning there would only throw its value away.
            final = last and (due >= budget or (spec.stop_at_target and wl.reached(value)))
            if not final and retry(trial.should_prune, f"asking the pruner about trial {trial.number}"):
                raise optuna.TrialPruned(f"{wl.metric}={value:.4g} at {due} samples of seed {seed}")

        result = self._train(config, seed, on_step, on_eval)
        if writer is not None:
            writer.flush_all()
        return result

    def _train(self, config: ControllerConfig, seed: int, on_step: Callable[[Any], None],
               on_eval: Callable[[dict[str, float]], None] | None = None) -> Any:
        from adabatch.workloads import train

        spec = self.spec
        if seed not in self._data:
            self._data[seed] = self.workload.make_data(seed)  # the same data for every trial of this worker
        meter = _energy_meter()
        try:
            return train(self.workload, config, seed=seed, sample_budget=spec.budget(),
                         eval_every=spec.eval_interval(), stop_at_target=spec.stop_at_target, energy_meter=meter,
                         callbacks=(on_step,), on_eval=on_eval, data=self._data[seed])
        finally:
            if meter is not None:
                meter.close()

    def run_config(self, config: ControllerConfig, seed: int, beat: Callable[[], None]) -> tuple[float, Any]:
        """One run of ``config`` on ``seed`` outside any trial (verification): (objective value, result)."""
        def on_step(record: Any) -> None:
            self.check()
            beat()

        result = self._train(config, seed, on_step)
        return float(OBJECTIVES[self.spec.objectives[0]].read(result)), result


def _energy_meter() -> Any:
    try:
        from adabatch.energy import detect_meter
    except ImportError:
        return None
    return detect_meter()


def _store_results(trial: Any, results: Sequence[Any], wl: Any, require_target: bool) -> None:
    """The trial's run results as user attributes: each quantity's mean over the trial's seeds
    (``None`` where a run has none: a target not reached on every seed has no time to it), and
    with several seeds, the final metric of each under ``seed_metrics``."""
    per_run = [{
        "final_metric": r.final_metric, "best_metric": r.best_metric, "wall_seconds": r.wall_seconds,
        "samples": r.samples, "steps": r.steps, "seconds_to_target": r.seconds_to_target,
        "samples_to_target": r.samples_to_target, "energy_j": r.energy_j, "energy_to_target": r.energy_to_target,
        "final_batch": r.stats.get("batch_size"),
    } for r in results]
    attrs: dict[str, Any] = {key: _mean([run[key] for run in per_run]) for key in per_run[0]}
    first = results[0]
    attrs.update(reached_target=all(r.reached_target for r in results), energy_source=first.energy_source,
                 energy_measured=first.energy_measured,
                 energy_kind=None if first.energy_source is None else ("measured" if first.energy_measured
                                                                       else "estimate"))
    if len(results) > 1:
        attrs["seed_metrics"] = [r.final_metric for r in results]
    for key, value in attrs.items():
        trial.set_user_attr(key, _jsonable(value))
    if require_target:
        best = statistics.fmean(r.best_metric for r in results)
        gap = float(wl.target - best if wl.higher_is_better else best - wl.target)
        trial.set_user_attr("constraint", [gap])
        if _NATIVE_CONSTRAINTS:
            trial.set_constraint("reach_target", gap)


def _mean(values: Sequence[Any]) -> Any:
    """Mean of numbers; ``None`` if any is missing; an integer stays one when all agree (one seed)."""
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        return values[0]
    return statistics.fmean(float(v) for v in values)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ----------------------------------------------------------------------------- opening a study


def open_study(spec: StudySpec, storage: str = DEFAULT_STORAGE, study_name: str | None = None, *,
               notify: Callable[[str], None] | None = None) -> Any:
    """The study named ``study_name`` (default: the file's name), created if new, resumed if not.

    A new study stores the file's normalised settings and their fingerprint. An existing one must
    have been created from the same settings: a changed file is refused with the changed keys named
    (``--study-name NEW`` starts a new study instead). Stale trials are failed first (see
    :func:`maintain_study`); ``notify`` hears what was done.

    Example:
        >>> import tempfile, os
        >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "s.db")
        >>> spec = StudySpec.from_dict({"study": {"name": "s", "workload": "linreg"},
        ...                             "fixed": {"max_batch": 256}, "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
        >>> open_study(spec, url).user_attrs["adabatch_fingerprint"] == spec.fingerprint()
        True
        >>> open_study(dataclasses.replace(spec, fixed={"max_batch": 512}), url)
        Traceback (most recent call last):
        ...
        adabatch.study.StudySpecError: study 's' was created from other settings; changed: [fixed] max_batch: 256 -> 512. ...
    """
    return _open(spec, storage, study_name, notify)[0]


def _open(spec: StudySpec, storage: str, study_name: str | None,
          notify: Callable[[str], None] | None) -> tuple[Any, Any]:
    if is_memory_sqlite(storage):
        raise StorageError(f"{describe_url(storage)} is an in-memory database: other workers cannot see it and its "
                           "trials vanish when the command ends; give a file such as sqlite:///adabatch.db.")
    name = check_study_name(study_name or spec.name)
    # Everything that can reject the file runs before the study is created: never a half-made study.
    normal = spec.normalised()
    fingerprint = fingerprint_of(normal)
    directions = spec.directions()
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    rdb = open_optuna_storage(storage, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                              max_retry=spec.max_retry)
    try:
        study = optuna.create_study(storage=rdb, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner)
        _record_spec(study, spec, normal, fingerprint)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner)
        _check_same_spec(study, spec, normal, fingerprint, notify)
    run = {"n_trials": spec.n_trials, **spec.reliability()}
    if spec.verify.top_k:
        run["verify"] = spec.verify.to_dict()
    if study.user_attrs.get(RUN_ATTR) != run:
        study.set_user_attr(RUN_ATTR, run)
    maintain_study(study, rdb, notify)
    return study, rdb


def _record_spec(study: Any, spec: StudySpec, normal: dict[str, Any], fingerprint: str) -> None:
    study.set_user_attr(SPEC_ATTR, normal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([_objective_label(o, spec) for o in spec.objectives])
    # Written last: a study with a fingerprint has everything else.
    study.set_user_attr(FINGERPRINT_ATTR, fingerprint)


def _check_same_spec(study: Any, spec: StudySpec, normal: dict[str, Any], fingerprint: str,
                     notify: Callable[[str], None] | None) -> None:
    name, directions = study.study_name, spec.directions()
    stored_dirs = [d.name.lower() for d in study.directions]
    if stored_dirs != directions:
        raise StudySpecError(f"study {name!r} already exists with directions {stored_dirs}, but the file asks for "
                             f"{directions} ({', '.join(spec.objectives)}); use --study-name to start a new study.")
    attrs = study.user_attrs
    # A worker that created the study a moment ago writes its fingerprint right after.
    deadline = time.monotonic() + 5.0
    while FINGERPRINT_ATTR not in attrs and not study.trials and time.monotonic() < deadline:
        time.sleep(0.2)
        attrs = study.user_attrs
    stored = attrs.get(FINGERPRINT_ATTR)
    if stored == fingerprint:
        return
    if stored is not None:
        changes = spec_changes(attrs.get(SPEC_ATTR) or {}, normal) or ["(the stored settings are unreadable)"]
        raise StudySpecError(
            f"study {name!r} was created from other settings; changed: {'; '.join(changes)}. Trials run under "
            f"different settings are never mixed: restore the file, or start a new study with --study-name NEW "
            f"(e.g. --study-name {name}-2).")
    legacy = attrs.get(SPEC_ATTR)
    if legacy is not None or study.trials:
        changes = spec_changes(_legacy_normalised(legacy), normal, only_old_keys=True) if legacy else \
            ["(the study has trials but no stored settings)"]
        if changes:
            raise StudySpecError(
                f"study {name!r} holds trials run from other settings; changed: {'; '.join(changes)}. Start a new "
                f"study with --study-name NEW (e.g. --study-name {name}-2).")
    _record_spec(study, spec, normal, fingerprint)
    if notify is not None and legacy is not None:
        notify(f"study {name!r} had no fingerprint (older adabatch); recorded this file's")


def _legacy_normalised(old: Mapping[str, Any]) -> dict[str, Any]:
    # Studies from before fingerprints stored StudySpec's fields flat; compare what they recorded.
    study = {k: old[k] for k in ("workload", "objectives", "sampler", "seed", "require_target", "target",
                                 "sample_budget", "eval_every", "stop_at_target") if old.get(k) is not None}
    params = {p["name"]: Param(**{k: (tuple(v) if k == "choices" else v) for k, v in p.items()}).to_dict()
              for p in old.get("params", [])}
    return {"study": study, "pruner": {"kind": old.get("pruner", "none")}, "fixed": dict(old.get("fixed", {})),
            "search": params}


def _objective_label(objective: str, spec: StudySpec) -> str:
    metric = spec.workload_obj().metric
    return {"metric": metric, "best_metric": f"best_{metric}"}.get(objective, objective)


def maintain_study(study: Any, rdb: Any, notify: Callable[[str], None] | None = None) -> list[int]:
    """Fail the study's stale trials and make sure every interrupted trial has a retry queued.

    Runs under the study's lock, so two workers never queue the same retry. Returns the numbers
    of the trials it failed.
    """
    with study_lock(rdb.engine, study.study_name):
        failed = fail_stale_trials(study, rdb)
        queued = _queue_interrupted_retries(study)
    if notify is not None:
        if failed:
            grace = rdb.grace_period or 2 * (rdb.get_heartbeat_interval() or 0)
            notify(f"failed {len(failed)} stale trial(s) of study {study.study_name!r} (no heartbeat for {grace} s): "
                   f"{', '.join(map(str, failed))}; each is retried (up to max_retry times)")
        if queued:
            notify(f"queued the retry of interrupted trial(s) {', '.join(map(str, queued))}")
    return failed


def _queue_interrupted_retries(study: Any) -> list[int]:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR) and t.number not in retried:
            history = [*t.system_attrs.get("retry_history", []), t.number]
            study.add_trial(optuna.create_trial(
                state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                system_attrs={"failed_trial": t.system_attrs.get("failed_trial", t.number), "retry_history": history}))
            queued.append(t.number)
    return queued


# ----------------------------------------------------------------------------- running


class _SignalGuard:
    """Turns SIGINT and SIGTERM into :class:`StudyInterrupted` at the next safe point.

    The first signal is only noted; :meth:`check` (called between optimizer steps, trials and
    database retries) raises it, so no write is cut in half. A second signal raises at once.
    Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self.quiet = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.quiet:
            return
        if self.pending is not None:
            raise StudyInterrupted(self.pending)
        self.pending = signum

    def check(self) -> None:
        if self.pending is not None and not self.quiet:
            raise StudyInterrupted(self.pending)

    @contextlib.contextmanager
    def hush(self) -> Iterator[None]:
        """No interrupts while an interrupted trial is being recorded."""
        self.quiet = True
        try:
            yield
        finally:
            self.quiet = False


def is_original(trial: Any) -> bool:
    """Whether ``trial`` is one of the study's ``n_trials`` (not a retry of a failed one)."""
    return retried_trial_number(trial) is None


def run_study(spec: StudySpec, storage: str = DEFAULT_STORAGE, *, n_trials: int | None = None,
              study_name: str | None = None, timeout: float | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, notify: Callable[[str], None] | None = None) -> Any:
    """Run the study until it has the file's ``n_trials`` trials, or ``n_trials`` more in this process.

    ``n_trials`` in the file is the study's total: a rerun finishes what is left, and retries of
    failed trials do not count again. Several processes may run the same study against one
    database; together they stop at the total. Queued retries are run first. Trials that raise
    :class:`ConfigError` or hit non-finite losses are recorded as FAIL and the run goes on.

    SIGINT or SIGTERM stop the run between two optimizer steps: the running trial is marked FAIL
    and queued again, and :class:`StudyInterrupted` is raised. A database that goes away is waited
    for (``[reliability] db_retry_seconds``), then :class:`~adabatch.storage.DatabaseUnavailable`.
    ``log`` gets one line per trial (when there is no progress bar), ``notify`` the notices.

    Example:
        >>> spec = StudySpec.from_dict({"study": {"name": "doc2", "workload": "linreg",
        ...     "sample_budget": 1000, "eval_every": 500}, "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
        >>> import tempfile, os
        >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "studies.db")
        >>> run_study(spec, url, n_trials=1, progress=False).trials[0].state.name
        'COMPLETE'
    """
    with _SignalGuard() as guard:
        worker = _Worker(spec, storage, study_name, guard, notify)
        try:
            return worker.run(n_trials, timeout, progress, log)
        finally:
            worker.close()


class _Worker:
    """One process's share of a study: claim a trial, run it, record it, until the study is done."""

    def __init__(self, spec: StudySpec, storage: str, study_name: str | None, guard: _SignalGuard,
                 notify: Callable[[str], None] | None) -> None:
        self.spec, self.guard, self.notify = spec, guard, notify or (lambda line: None)
        self.retry = DatabaseRetry(spec.db_retry_seconds, url=storage, notify=self.notify, check=guard.check)
        self.study, self.rdb = _open(spec, storage, study_name, self.notify)
        self.traces = TraceStore(self.rdb.engine, retry=self.retry)
        self.runner = TrialRunner(spec, self.traces, self.study.study_name, retry=self.retry, check=guard.check)

    def close(self) -> None:
        self.traces.close()

    def run(self, n_trials: int | None, timeout: float | None, progress: bool,
            log: Callable[[str], None] | None) -> Any:
        study, started = self.study, time.monotonic()
        # Read once: between trials, only calls that wait out an outage touch the database.
        names = self.retry(lambda: objective_names(study), "reading the study")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = n_trials if n_trials is not None else self.retry(self._left, "reading the study")
            bar = tqdm(total=total, desc=study.study_name, unit="trial", dynamic_ncols=True)
        done, timed_out = 0, False
        try:
            while n_trials is None or done < n_trials:
                self.guard.check()
                if timeout is not None and time.monotonic() - started >= timeout:
                    timed_out = True
                    break
                trial = self.retry(lambda: self._claim(finish=n_trials is None), "claiming a trial")
                if trial is None:
                    break
                frozen = self._run_one(trial)
                done += 1
                if frozen is not None:
                    line = describe_trial(frozen, study, names)
                    if bar is not None:
                        bar.update(1)
                        bar.write(line)
                    elif log is not None:
                        log(line)
        finally:
            if bar is not None:
                bar.close()
        if self.spec.verify.top_k and not timed_out:
            full, busy = self.retry(self._trials_state, "reading the study")
            if full and not busy:
                self._verify(progress, log)
            elif full:
                self.notify("[verify] starts once no trial is running or queued: the last worker to finish runs it "
                            "(or run the study file again)")
        return study

    def _trials_state(self) -> tuple[bool, bool]:
        """(whether the study has all its trials, whether one is still running or queued)."""
        trials = self.study.get_trials(deepcopy=False)
        return sum(map(is_original, trials)) >= self.spec.n_trials, any(
            t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)

    def _verify(self, progress: bool, log: Callable[[str], None] | None) -> None:
        """Re-run the best trials and the default config on fresh seeds (see :mod:`adabatch.verify`)."""
        spec, study = self.spec, self.study
        seeds = spec.verify_seeds()

        def state() -> Report | None:
            return verify_report(study, spec.verify, seeds, lambda t: trial_config(study, t), spec.default_config())

        before = self.retry(state, "reading the study")
        if before is None or before.missing == 0:
            return
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=before.missing, desc=f"{study.study_name} verify", unit="run", dynamic_ncols=True)

        def line(text: str) -> None:
            if bar is not None:
                bar.update(1)
                bar.write(text)
            elif log is not None:
                log(text)

        verifier = Verifier(study, spec.verify, seeds, config_of=lambda t: trial_config(study, t),
                            default_config=spec.default_config(), run_config=self.runner.run_config,
                            lock=lambda: study_lock(self.rdb.engine, study.study_name), retry=self.retry,
                            heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period, log=line)
        try:
            verifier.run()
        finally:
            if bar is not None:
                bar.close()
        after = self.retry(state, "reading the study")
        if after is not None and after.missing:
            self.notify(f"{after.missing} verification run(s) are still running in other workers")

    def _left(self) -> int:
        trials = self.study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        return max(0, self.spec.n_trials - sum(map(is_original, trials))) + waiting

    def _claim(self, finish: bool) -> Any:
        """The next trial: a queued retry, else a new one while the study is short of n_trials, else None."""
        study = self.study
        with study_lock(self.rdb.engine, study.study_name):
            failed = fail_stale_trials(study, self.rdb)
            queued = _queue_interrupted_retries(study)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            trial = None
            if waiting or not finish or sum(map(is_original, trials)) < self.spec.n_trials:
                with warnings.catch_warnings():
                    # Our loop keeps the heartbeat itself (Study.optimize would); Optuna warns regardless.
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
        if failed:
            self.notify(f"failed {len(failed)} stale trial(s): {', '.join(map(str, failed))} (no heartbeat for "
                        f"{self.spec.grace_period} s); each is retried (up to max_retry times)")
        if queued:
            self.notify(f"queued the retry of interrupted trial(s) {', '.join(map(str, queued))}")
        return trial

    def _run_one(self, trial: Any) -> Any:
        """Run and record one claimed trial; returns it frozen, or None if another worker had failed it."""
        study, spec, retry = self.study, self.spec, self.retry
        values: Any = None
        reason: str | None = None
        # trial._trial_id: the storage's id of the trial, which heartbeats are keyed by.
        beat = Heartbeat(self.rdb, trial._trial_id, spec.heartbeat_interval, retry=retry)
        try:
            try:
                self.guard.check()
                beat.start()
                values = self.runner(trial)
                state = TrialState.COMPLETE
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (ConfigError, FloatingPointError) as exc:
                state, reason = TrialState.FAIL, f"{type(exc).__name__}: {exc}"
            finally:
                beat.stop()
        except StudyInterrupted as exc:
            exc.trial_number = trial.number
            exc.recorded = self._record_interrupt(trial, exc)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            self._lost(trial)
            return None
        except (DatabaseUnavailable, KeyboardInterrupt):
            raise  # the trial stays RUNNING; without heartbeats it goes stale and is retried
        except BaseException:
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        if state == TrialState.COMPLETE:
            listed = values if isinstance(values, (list, tuple)) else [values]
            bad = [name for name, v in zip(spec.objectives, listed) if v is None or not math.isfinite(v)]
            if bad:
                state, values = TrialState.FAIL, None
                reason = f"objective {', '.join(bad)} is not a finite number"
        if reason is not None:
            retry(lambda: trial.set_user_attr(FAIL_REASON_ATTR, reason), f"recording trial {trial.number}")
        frozen = retry(lambda: study.tell(trial, values if state == TrialState.COMPLETE else None, state=state,
                                          skip_if_finished=True), f"recording trial {trial.number}")
        if frozen.state != state:
            self._lost(trial)
            return None
        return frozen

    def _lost(self, trial: Any) -> None:
        self.notify(f"trial {trial.number} was failed by another worker while this one ran it (no heartbeat for "
                    f"{self.spec.grace_period} s, e.g. during a database outage); its retry counts instead")

    def _record_interrupt(self, trial: Any, exc: StudyInterrupted) -> bool:
        """Mark the trial FAIL as interrupted and queue its retry; False if the database would not take it."""
        quick = DatabaseRetry(min(5, self.spec.db_retry_seconds), url=self.retry.url)
        with self.guard.hush():
            try:
                # Marked first (a finished trial takes no attributes); only FAIL trials get a retry queued.
                quick(lambda: trial.set_user_attr(INTERRUPTED_ATTR, exc.signame),
                      f"recording interrupted trial {trial.number}")
                quick(lambda: self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True),
                      f"recording interrupted trial {trial.number}")
                quick(lambda: self._queue_locked(), f"queueing the retry of trial {trial.number}")
                return True
            except Exception:
                return False

    def _queue_locked(self) -> None:
        with study_lock(self.rdb.engine, self.study.study_name):
            _queue_interrupted_retries(self.study)

# ----------------------------------------------------------------------------- reading results


def load_study(name: str, storage: str = DEFAULT_STORAGE, *, notify: Callable[[str], None] | None = None) -> Any:
    """An existing study, its stale trials failed first; :class:`StudyNotFoundError` lists the names that exist.

    The heartbeat settings of the study's latest run say which trials are stale (see
    :func:`maintain_study`); ``notify`` hears how many were failed.
    """
    rdb = open_optuna_storage(storage)
    try:
        study = optuna.load_study(study_name=name, storage=rdb)
    except KeyError:
        names = optuna.get_all_study_names(storage=rdb)
        known = ", ".join(names) if names else "none yet"
        raise StudyNotFoundError(f"no study {name!r} in {_short(storage)}; studies there: {known}.") from None
    run = study.user_attrs.get(RUN_ATTR) or {}
    if run.get("heartbeat_interval"):
        rdb.engine.dispose()
        rdb = open_optuna_storage(storage, heartbeat_interval=run["heartbeat_interval"],
                                  grace_period=run.get("grace_period"), max_retry=run.get("max_retry"))
        study = optuna.load_study(study_name=name, storage=rdb)
        maintain_study(study, rdb, notify)
    return study


def list_studies(storage: str = DEFAULT_STORAGE) -> list[Any]:
    """Summaries (name, directions, trial count, start time) of every study in the storage."""
    return optuna.get_all_study_summaries(open_optuna_storage(storage), include_best_trial=False)


def delete_study(name: str, storage: str = DEFAULT_STORAGE) -> None:
    """Remove a study and its traces."""
    rdb = open_optuna_storage(storage)
    try:
        optuna.delete_study(study_name=name, storage=rdb)
    except KeyError:
        load_study(name, storage)  # raises StudyNotFoundError naming the studies that exist
        raise
    store = TraceStore(storage)
    try:
        store.delete(name)
    finally:
        store.close()


def objective_names(study: Any) -> list[str]:
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    names = (study.metric_names or (spec.get("study") or {}).get("objectives") or spec.get("objectives")
             or [f"value{i}" for i in range(len(study.directions))])
    return list(names)


def trial_counts(study: Any) -> dict[str, int]:
    """How the study's trials stand: ``trials`` (originals, what ``n_trials`` counts), ``retries``, one count per
    state, ``FAIL_RETRIED`` (failed trials with a retry) and ``n_trials`` (the latest run's total, 0 if unknown).

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        >>> trial_counts(study)
        {'trials': 2, 'retries': 0, 'n_trials': 0, 'COMPLETE': 2}
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = {"trials": sum(map(is_original, trials)), "retries": sum(not is_original(t) for t in trials),
           "n_trials": int((study.user_attrs.get(RUN_ATTR) or {}).get("n_trials") or 0)}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
        if t.state == TrialState.FAIL and t.number in retried:
            out["FAIL_RETRIED"] = out.get("FAIL_RETRIED", 0) + 1
    return out


def describe_settings(study: Any) -> list[str]:
    """The settings stored in the study, one line per table of the study file, as ``show`` prints them."""
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    objectives = ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(objective_names(study), study.directions))
    if "study" not in spec:  # made outside adabatch, or by a version without fingerprints
        lines = [f"study {study.study_name}: workload {spec.get('workload', '?')}, objectives {objectives}"]
        if spec:
            lines.append(f"  [fixed] {_entries(spec.get('fixed', {}))}")
            lines.append(f"  [search] {', '.join(p.get('name', '?') for p in spec.get('params', []))}")
        return lines
    fingerprint = str(study.user_attrs.get(FINGERPRINT_ATTR, "?"))[:12]
    lines = [f"study {study.study_name}: workload {spec['study'].get('workload', '?')}, objectives {objectives}",
             f"settings stored with the study (fingerprint {fingerprint}):"]
    for table in ("study", "pruner", "fixed", "search"):
        lines.append(f"  [{table}] {_entries(spec.get(table, {})) or '(none)'}")
    run = study.user_attrs.get(RUN_ATTR)
    if run:
        lines.append(f"  latest run: {_entries(run)}")
    return lines


def _entries(table: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {_toml(v)}" for k, v in table.items())


def verification(study: Any) -> Report | None:
    """The ``[verify]`` stage of the study's latest run as stored (None when it had none).

    Example:
        >>> import tempfile, os
        >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "v.db")
        >>> spec = StudySpec.from_dict({"study": {"name": "v", "workload": "linreg", "n_trials": 2,
        ...     "sample_budget": 1000, "eval_every": 500}, "verify": {"top_k": 1, "seeds": 2},
        ...     "search": {"window_fraction": {"low": 0.05, "high": 0.5}}})
        >>> v = verification(run_study(spec, url, progress=False))
        >>> v.seeds, v.complete, len(v.baseline.values)
        ([1, 2], True, 2)
    """
    settings = (study.user_attrs.get(RUN_ATTR) or {}).get("verify")
    stored = (study.user_attrs.get(SPEC_ATTR) or {}).get("study")
    if not isinstance(settings, Mapping) or not isinstance(stored, Mapping):
        return None
    settings = VerifySettings(**{k: settings[k] for k in VERIFY_KEYS if k in settings})
    seeds = fresh_seeds(int(stored.get("seed", 0)), int(stored.get("seeds_per_trial", 1)), settings)
    default = ControllerConfig.from_dict(dict((study.user_attrs.get(SPEC_ATTR) or {}).get("fixed", {})))
    return verify_report(study, settings, seeds, lambda t: trial_config(study, t), default)


def best_trials(study: Any) -> list[Any]:
    """The best feasible trial (one objective) or the feasible Pareto front (several), by number.

    With a finished ``[verify]`` stage, the best trial is the one with the best mean on the fresh
    seeds, not on its own.
    """
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return []
    verified = verification(study)
    if verified is not None and verified.best is not None:
        return [verified.best.candidate.trial]
    if len(study.directions) == 1:
        try:
            return [study.best_trial]
        except ValueError:  # no feasible trial
            return []
    return sorted(study.best_trials, key=lambda t: t.number)


def pick_trial(study: Any, number: int | None) -> Any:
    """Trial ``number``, or the single best one; several Pareto-optimal trials need a number."""
    if number is not None:
        for t in study.trials:
            if t.number == number:
                return t
        raise StudySpecError(f"study {study.study_name!r} has no trial {number}; it has 0..{len(study.trials) - 1}.")
    best = best_trials(study)
    if not best:
        raise StudySpecError(f"study {study.study_name!r} has no completed feasible trial yet; run more trials "
                             "or pick one with --trial N.")
    if len(best) > 1:
        numbers = ", ".join(str(t.number) for t in best)
        raise StudySpecError(f"study {study.study_name!r} has {len(best)} Pareto-optimal trials ({numbers}); "
                             "pick one with --trial N (see 'adabatch study best').")
    return best[0]


def trial_config(study: Any, trial: Any) -> ControllerConfig:
    """The :class:`ControllerConfig` a trial ran with."""
    if "config" in trial.user_attrs:
        return ControllerConfig.from_dict(trial.user_attrs["config"])
    fixed = (study.user_attrs.get(SPEC_ATTR) or {}).get("fixed", {})
    return ControllerConfig.from_dict({**fixed, **trial.params})


def export_config(study: Any, path: str | Path, trial_number: int | None = None) -> tuple[Any, Path]:
    """Write the chosen config with :meth:`ControllerConfig.save`; returns (trial, path).

    Without ``trial_number``, a finished ``[verify]`` stage in which the default config scored at
    least as well as every trial writes the default config, and the trial returned is None.
    """
    if trial_number is None:
        verified = verification(study)
        if verified is not None and verified.default_wins:
            return None, verified.baseline.candidate.config.save(path)
    trial = pick_trial(study, trial_number)
    return trial, trial_config(study, trial).save(path)


def describe_trial(trial: Any, study: Any, names: Sequence[str] | None = None) -> str:
    """One line: number, state, objective values (energy labelled when it is an estimate), params.

    ``names`` (default: read from the study) are the objectives' names.
    """
    parts = [f"trial {trial.number}", trial.state.name]
    if trial.values is not None:
        for name, value in zip(names if names is not None else objective_names(study), trial.values):
            parts.append(f"{name}={value:.4g}{_energy_label(name, trial)}")
    ua = trial.user_attrs
    if "constraint" in ua and ua.get("constraint", [0])[0] > 0:
        parts.append("infeasible(target not reached)")
    if ua.get(INTERRUPTED_ATTR):
        parts.append(f"interrupted ({ua[INTERRUPTED_ATTR]}), retried")
    if ua.get(FAIL_REASON_ATTR):
        parts.append(f"({ua[FAIL_REASON_ATTR]})")
    retried = retried_trial_number(trial)
    if retried is not None:
        parts.append(f"retry of trial {retried}")
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    return "  ".join(parts) + (f"  [{params}]" if params else "")


def _energy_label(name: str, trial: Any) -> str:
    kind, source = trial.user_attrs.get("energy_kind"), str(trial.user_attrs.get("energy_source"))
    if "energy" not in name or kind is None:
        return ""
    if kind == "estimate" and not source.startswith("estimate"):
        return f" J (estimate, {source})"
    return f" J ({source})"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _short(url: str) -> str:
    from adabatch.storage import describe_url

    return describe_url(url)


# ----------------------------------------------------------------------------- plots


def plot_study(study: Any, out_dir: str | Path, storage: str = DEFAULT_STORAGE,
               trial_number: int | None = None) -> dict[str, Path]:
    """Pareto front (or optimisation history), parameter importances and one trial's curves.

    Writes PNGs and ``index.html``, a self-contained page with the images embedded. The trial
    drawn is ``trial_number``, else the best (first on the Pareto front). Returns name -> path.
    """
    from adabatch.plots import _pyplot, plot_training

    import optuna

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    names = objective_names(study)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise StudySpecError(f"study {study.study_name!r} has no completed trial to plot yet.")
    best = best_trials(study)
    best_numbers = {t.number for t in best}
    files: dict[str, Path] = {}
    notes: list[str] = []

    files["front"] = _plot_front(plt, study, done, best_numbers, names, out)
    imp = _plot_importances(plt, study, done, names, out)
    if isinstance(imp, Path):
        files["importances"] = imp
    else:
        notes.append(imp)

    if trial_number is not None:
        chosen = pick_trial(study, trial_number)
    else:
        chosen = best[0] if best else max(done, key=lambda t: t.number)
    store = TraceStore(storage)
    try:
        rows = store.read(study.study_name, chosen.number)
    finally:
        store.close()
    if rows:
        files["trial"] = plot_training(rows, out / f"trial_{chosen.number}.png",
                                       metric=chosen.user_attrs.get("metric_name"),
                                       title=f"{study.study_name}: trial {chosen.number}")
    else:
        notes.append(f"trial {chosen.number} has no stored trace.")
    files["html"] = _write_html(study, out / "index.html", files, done, best_numbers, names, notes)
    return files


def _plot_front(plt: Any, study: Any, done: list[Any], best: set[int], names: list[str], out: Path) -> Path:
    k = len(names)
    labels = [n + _energy_label(n, done[0]) for n in names]
    if k == 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [t.number for t in done]
        ax.scatter(xs, [t.values[0] for t in done], color="tab:gray", label="trial")
        pick = [t for t in done if t.number in best]
        ax.scatter([t.number for t in pick], [t.values[0] for t in pick], color="tab:red", label="best")
        ax.set_xlabel("trial")
        ax.set_ylabel(labels[0])
        ax.set_title(f"{study.study_name}: objective per trial")
        path = out / "history.png"
    else:
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            feasible = [t for t in done if constraint_values(t)[0] <= 0]
            infeasible = [t for t in done if constraint_values(t)[0] > 0 and "constraint" in t.user_attrs]
            for group, color, label in ((feasible, "tab:blue", "trial"), (infeasible, "tab:gray", "infeasible"),
                                        ([t for t in done if t.number in best], "tab:red", "Pareto front")):
                if group:
                    ax.scatter([t.values[i] for t in group], [t.values[j] for t in group], color=color, label=label)
            ax.set_xlabel(labels[i])
            ax.set_ylabel(labels[j])
        axes[0][0].legend()
        fig.suptitle(f"{study.study_name}: Pareto front")
        path = out / "pareto_front.png"
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_importances(plt: Any, study: Any, done: list[Any], names: list[str], out: Path) -> Path | str:
    import optuna

    if len(done) < 2:
        return "parameter importances need at least two completed trials."
    per_objective: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        try:
            # Importance evaluators rank parameters by how they lower the target; flip maximised ones.
            sign = -1.0 if study.directions[i] == optuna.study.StudyDirection.MAXIMIZE else 1.0
            with warnings.catch_warnings():  # the evaluator's reminder about the sign, handled above
                warnings.simplefilter("ignore", UserWarning)
                per_objective[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i, sign=sign: sign * t.values[i])
        except (RuntimeError, ValueError) as exc:  # e.g. every trial sampled the same values
            return f"parameter importances unavailable: {exc}"
    params = sorted({p for imp in per_objective.values() for p in imp})
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(params) * len(names) + 1.5))
    height = 0.8 / len(names)
    for i, (name, imp) in enumerate(per_objective.items()):
        ax.barh([y + i * height for y in range(len(params))], [imp.get(p, 0.0) for p in params], height=height,
                label=name)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(params))], params)
    ax.set_xlabel("importance (Optuna's default evaluator, normalised)")
    ax.legend()
    ax.set_title(f"{study.study_name}: parameter importances")
    fig.tight_layout()
    path = out / "importances.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_html(study: Any, path: Path, files: Mapping[str, Path], done: list[Any], best: set[int],
                names: list[str], notes: list[str]) -> Path:
    esc = html.escape
    imgs = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(p.name)}</figcaption></figure>\n'
        for key, p in files.items() if p.suffix == ".png")
    head = "".join(f"<th>{esc(n)}</th>" for n in ["trial", *names, "reached target", "energy source", "params"])
    rows = []
    for t in done:
        cells = [str(t.number) + (" *" if t.number in best else "")]
        cells += [_fmt(v) for v in t.values]
        cells += [str(t.user_attrs.get("reached_target", "")),
                  f"{t.user_attrs.get('energy_source') or ''} ({t.user_attrs.get('energy_kind') or 'n/a'})",
                  json.dumps(t.params)]
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    note = "".join(f"<p class=note>{esc(n)}</p>" for n in notes)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(study.study_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:90%}} td,th{{border:1px solid #ccc;padding:2px 6px}}
.note{{color:#a60}}</style></head><body>
<h1>Study {esc(study.study_name)}</h1>
<p>{len(study.trials)} trials, {len(done)} completed; directions: {esc(', '.join(
        f'{n} ({d.name.lower()})' for n, d in zip(names, study.directions)))}. * marks the best trial or the Pareto
front. Energy labelled "estimate" is not a measurement.</p>
{note}{imgs}<h2>Completed trials</h2><table><tr>{head}</tr>
{''.join(rows)}</table></body></html>
"""
    path.write_text(page)
    return path


__all__ = ["OBJECTIVES", "PRUNER_KEYS", "Param", "StorageError", "StudyInterrupted", "StudyNotFoundError",
           "StudySpec", "StudySpecError", "TrialRunner", "TrialSeededSampler", "best_trials", "delete_study",
           "describe_settings", "export_config", "list_studies", "load_study", "maintain_study", "make_pruner",
           "make_sampler", "open_study", "plot_study", "run_study", "spec_changes", "trial_counts"]
