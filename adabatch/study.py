"""Optuna studies that tune the controller's knobs against accuracy, wall time and energy.

A study is defined by a TOML file (see ``studies/``) with four tables:

- ``[study]``: ``name``, ``workload`` (a built-in name or ``module:function``), ``objectives``
  (one or more of :data:`OBJECTIVES`), ``sampler`` (``tpe``, multi-objective TPE when there are
  several objectives, or ``nsga2``), ``pruner`` (single objective only), ``require_target``
  (a constraint: the validation metric must reach the target), ``target``, ``n_trials``,
  ``seed``, ``sample_budget``, ``eval_every``, ``stop_at_target``.
- ``[reliability]``: ``heartbeat_interval`` and ``grace_period`` in seconds, ``max_retry``.
- ``[fixed]``: :class:`~adabatch.ControllerConfig` fields held constant.
- ``[search]``: one entry per tuned field, e.g. ``grow_threshold = {low = 1.1, high = 3.0}``,
  ``cooldown_steps = {low = 0, high = 200, step = 10}``, ``target_factor = {low = 0.1,
  high = 2.0, log = true}`` or ``lr_rule = {choices = ["linear", "sqrt"]}``.

Each trial builds a config from the fixed and sampled values, trains the workload with
:func:`adabatch.workloads.train`, stores the per-step trace through
:class:`adabatch.storage.TraceStore` and returns the objectives. Optuna cannot prune
multi-objective studies, so a pruner is accepted only with a single objective.

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
    >>> len(study.trials)
    2
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import socket
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from adabatch.config import ConfigError, ControllerConfig
from adabatch.storage import DEFAULT_STORAGE, StorageError, TraceStore, open_optuna_storage, retried_trial_number

SAMPLERS = ("tpe", "nsga2")
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving")
SPEC_ATTR = "adabatch_spec"


class StudySpecError(ValueError):
    """A study file or study request is invalid; the message names the key and what to do."""


class StudyNotFoundError(LookupError):
    """No study of that name in the storage."""


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
        >>> Param.from_dict("cooldown_steps", {"low": 0, "high": 100, "step": 10}).kind
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
        return cls(name, kind, low, high, log, step)

    def values_to_check(self) -> tuple[Any, ...]:
        return self.choices if self.kind == "categorical" else (self.low, self.high)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


STUDY_KEYS = ("name", "workload", "objectives", "sampler", "pruner", "require_target", "target", "n_trials",
              "seed", "sample_budget", "eval_every", "stop_at_target", "startup_trials", "population_size")
RELIABILITY_KEYS = ("heartbeat_interval", "grace_period", "max_retry")
TOP_KEYS = ("study", "reliability", "fixed", "search")


@dataclass(frozen=True)
class StudySpec:
    """A validated study definition (what a ``studies/*.toml`` file says).

    Example:
        >>> spec = StudySpec.from_dict({"study": {"name": "s", "workload": "linreg"},
        ...                             "search": {"ema_decay": {"low": 0.5, "high": 0.99}}})
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
    sample_budget: int | None = None
    eval_every: int | None = None
    stop_at_target: bool = False
    startup_trials: int = 10
    population_size: int = 20
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 3
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path) -> "StudySpec":
        """Read and validate a study file; every problem is a :class:`StudySpecError` naming the key."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise StudySpecError(f"no study file at {path}; see studies/ for examples.") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            raise StudySpecError(f"cannot read study file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise StudySpecError(f"{path} is not valid TOML: {exc}") from None
        try:
            return cls.from_dict(data)
        except StudySpecError as exc:
            raise StudySpecError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudySpec":
        _no_unknown(data, TOP_KEYS, "top level")
        study = _table(data, "study")
        reliability = _table(data, "reliability")
        fixed = dict(_table(data, "fixed"))
        search = _table(data, "search")
        _no_unknown(study, STUDY_KEYS, "[study]")
        _no_unknown(reliability, RELIABILITY_KEYS, "[reliability]")
        kw: dict[str, Any] = {}
        for key in ("name", "workload"):
            if key not in study:
                raise StudySpecError(f"[study] needs {key} = \"...\".")
            kw[key] = _typed(study, key, str, "a string")
            if not kw[key].strip():
                raise StudySpecError(f"[study] {key} must not be empty.")
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
        for key, minimum in (("n_trials", 1), ("seed", 0), ("sample_budget", 1), ("eval_every", 1),
                             ("startup_trials", 0), ("population_size", 2)):
            if key in study:
                kw[key] = _int_at_least(study, key, minimum, "[study]")
        for key, minimum in (("heartbeat_interval", 1), ("grace_period", 1), ("max_retry", 0)):
            if key in reliability:
                kw[key] = _int_at_least(reliability, key, minimum, "[reliability]")
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
        spec = cls(params=params, fixed=fixed, **kw)
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
        if self.sample_budget is not None and self.eval_every is not None and self.eval_every > self.sample_budget:
            raise StudySpecError(f"[study] eval_every={self.eval_every} exceeds sample_budget={self.sample_budget}; "
                                 "evaluate at least once per run.")
        self.workload_obj()  # an unknown workload fails here, before any trial starts

    def workload_obj(self) -> Any:
        """The :class:`~adabatch.workloads.Workload`, with ``target`` overridden if the file sets one."""
        from adabatch.workloads import get_workload

        try:
            wl = get_workload(self.workload)
        except ValueError as exc:
            raise StudySpecError(f"[study] workload: {exc}") from None
        return wl if self.target is None else dataclasses.replace(wl, target=float(self.target))

    def directions(self) -> list[str]:
        higher = self.workload_obj().higher_is_better
        return [OBJECTIVES[o].resolve_direction(higher) for o in self.objectives]

    def config_for(self, params: Mapping[str, Any]) -> ControllerConfig:
        """The controller config a trial with ``params`` runs (fixed values plus sampled ones)."""
        return ControllerConfig.from_dict({**self.fixed, **params})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["params"] = [dataclasses.asdict(p) for p in self.params]
        out["fixed"] = dict(self.fixed)
        return out


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise StudySpecError(f"[{key}] must be a table, got {type(value).__name__}.")
    return value


def _no_unknown(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise StudySpecError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(known)}.")


def _typed(data: Mapping[str, Any], key: str, kind: Any, accepted: str) -> Any:
    value = data[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise StudySpecError(f"{key}={value!r} has the wrong type: expected {accepted}.")
    return value


def _int_at_least(data: Mapping[str, Any], key: str, minimum: int, where: str) -> int:
    value = data[key]
    if not _is_int(value) or value < minimum:
        raise StudySpecError(f"{where} {key}={value!r} is invalid: accepted an integer >= {minimum}.")
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


# ----------------------------------------------------------------------------- running


def constraint_values(trial: Any) -> Sequence[float]:
    """Optuna ``constraints_func``: feasible when <= 0. Trials without a result count as infeasible."""
    return trial.user_attrs.get("constraint", (1.0,))


def _native_constraints() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


# Optuna >= 5 takes constraints from the trial (set_constraint); older ones from the sampler.
_NATIVE_CONSTRAINTS = _native_constraints()


def make_sampler(spec: StudySpec) -> Any:
    import optuna

    constraints = constraint_values if spec.require_target and not _NATIVE_CONSTRAINTS else None
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.population_size, constraints_func=constraints)
    # TPE is multi-objective TPE when the study has several directions; constant_liar keeps
    # parallel workers from proposing the same point.
    return optuna.samplers.TPESampler(n_startup_trials=spec.startup_trials, constraints_func=constraints,
                                      multivariate=True, constant_liar=True)


def make_pruner(spec: StudySpec) -> Any:
    import optuna

    return {
        "none": optuna.pruners.NopPruner,
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
        "percentile": lambda: optuna.pruners.PercentilePruner(25.0, n_startup_trials=3),
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[spec.pruner]()


class TrialRunner:
    """The objective function: config from the trial, one training run, trace and results stored.

    It sees only configs and run results; the controller's internals stay inside ``train``.
    """

    def __init__(self, spec: StudySpec, traces: TraceStore, study_name: str) -> None:
        self.spec, self.traces, self.study_name = spec, traces, study_name
        self.workload = spec.workload_obj()
        self._data: Any = None

    def __call__(self, trial: Any) -> Sequence[float] | float:
        import optuna

        from adabatch.workloads import train

        spec, wl = self.spec, self.workload
        params = {p.name: p.suggest(trial) for p in spec.params}
        config = spec.config_for(params)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("metric_name", wl.metric)
        trial.set_user_attr("target", wl.target)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if self._data is None:
            self._data = wl.make_data(spec.seed)  # the same data for every trial of this worker
        writer = self.traces.writer(self.study_name, trial.number)
        single = len(spec.objectives) == 1

        def on_eval(ev: dict[str, float]) -> None:
            writer.flush_all()
            if single and spec.pruner != "none":
                trial.report(float(ev[wl.metric]), step=int(ev["due"]))  # the same steps in every trial
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{wl.metric}={ev[wl.metric]:.4g} at {int(ev['samples'])} samples")

        meter = _energy_meter()
        try:
            result = train(wl, config, seed=spec.seed, sample_budget=spec.sample_budget,
                           eval_every=spec.eval_every or 8_000, stop_at_target=spec.stop_at_target,
                           energy_meter=meter, callbacks=(writer,), on_eval=on_eval, data=self._data)
        finally:
            try:
                writer.flush_all()
            finally:
                if meter is not None:
                    meter.close()
        _store_result(trial, result, wl, spec.require_target)
        values = [OBJECTIVES[o].read(result) for o in spec.objectives]
        return values[0] if single else values


def _energy_meter() -> Any:
    try:
        from adabatch.energy import detect_meter
    except ImportError:
        return None
    return detect_meter()


def _store_result(trial: Any, r: Any, wl: Any, require_target: bool) -> None:
    attrs = {
        "final_metric": r.final_metric, "best_metric": r.best_metric, "wall_seconds": r.wall_seconds,
        "samples": r.samples, "steps": r.steps, "reached_target": r.reached_target,
        "seconds_to_target": r.seconds_to_target, "samples_to_target": r.samples_to_target,
        "energy_j": r.energy_j, "energy_to_target": r.energy_to_target, "energy_source": r.energy_source,
        "energy_measured": r.energy_measured,
        "energy_kind": None if r.energy_source is None else ("measured" if r.energy_measured else "estimate"),
        "final_batch": r.stats.get("batch_size"),
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, _jsonable(value))
    if require_target:
        gap = float(wl.target - r.best_metric if wl.higher_is_better else r.best_metric - wl.target)
        trial.set_user_attr("constraint", [gap])
        if _NATIVE_CONSTRAINTS:
            trial.set_constraint("reach_target", gap)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def create_or_load(spec: StudySpec, storage: str = DEFAULT_STORAGE, study_name: str | None = None) -> Any:
    """The study named ``study_name`` (default: the file's name), created if new, resumed if not.

    A stored study with other objectives is an error: change ``--study-name`` to start a new one.
    """
    import optuna

    name = study_name or spec.name
    rdb = open_optuna_storage(storage, heartbeat_interval=spec.heartbeat_interval,
                              grace_period=spec.grace_period, max_retry=spec.max_retry)
    directions = spec.directions()
    try:
        existing = optuna.load_study(study_name=name, storage=rdb)
    except KeyError:
        existing = None
    if existing is not None:
        stored = [d.name.lower() for d in existing.directions]
        if stored != directions:
            raise StudySpecError(f"study {name!r} already exists with directions {stored}, but the file asks for "
                                 f"{directions} ({', '.join(spec.objectives)}); use --study-name to start a new study.")
    study = optuna.create_study(storage=rdb, study_name=name, directions=directions, load_if_exists=True,
                                sampler=make_sampler(spec), pruner=make_pruner(spec))
    if SPEC_ATTR not in study.user_attrs:
        try:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
            if study.metric_names is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names([_objective_label(o, spec) for o in spec.objectives])
        except optuna.exceptions.StorageInternalError:
            pass  # a worker that started at the same moment wrote the same attributes first
    return study


def _objective_label(objective: str, spec: StudySpec) -> str:
    metric = spec.workload_obj().metric
    return {"metric": metric, "best_metric": f"best_{metric}"}.get(objective, objective)


def run_study(spec: StudySpec, storage: str = DEFAULT_STORAGE, *, n_trials: int | None = None,
              study_name: str | None = None, timeout: float | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> Any:
    """Run ``n_trials`` more trials (default: the file's ``n_trials``) of the study in this process.

    Several processes may run the same study against one database at once; each adds its own
    ``n_trials``. Trials that raise :class:`ConfigError` or hit non-finite losses are recorded as
    FAIL and the run goes on.

    Example:
        >>> spec = StudySpec.from_dict({"study": {"name": "doc2", "workload": "linreg",
        ...     "sample_budget": 1000, "eval_every": 500}, "search": {"ema_decay": {"low": 0.5, "high": 0.9}}})
        >>> import tempfile, os
        >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "studies.db")
        >>> run_study(spec, url, n_trials=1, progress=False).trials[0].state.name
        'COMPLETE'
    """
    study = create_or_load(spec, storage, study_name)
    traces = TraceStore(storage)
    total = n_trials or spec.n_trials
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=study.study_name, unit="trial", dynamic_ncols=True)

    def after_trial(st: Any, trial: Any) -> None:
        line = describe_trial(trial, st)
        if bar is not None:
            bar.update(1)
            bar.write(line)
        elif log is not None:
            log(line)

    try:
        study.optimize(TrialRunner(spec, traces, study.study_name), n_trials=total, timeout=timeout,
                       catch=(ConfigError, FloatingPointError), callbacks=[after_trial], gc_after_trial=False)
    finally:
        if bar is not None:
            bar.close()
        traces.close()
    return study


# ----------------------------------------------------------------------------- reading results


def load_study(name: str, storage: str = DEFAULT_STORAGE) -> Any:
    """An existing study; :class:`StudyNotFoundError` lists the names that do exist."""
    import optuna

    rdb = open_optuna_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=rdb)
    except KeyError:
        names = optuna.get_all_study_names(storage=rdb)
        known = ", ".join(names) if names else "none yet"
        raise StudyNotFoundError(f"no study {name!r} in {_short(storage)}; studies there: {known}.") from None


def list_studies(storage: str = DEFAULT_STORAGE) -> list[Any]:
    """Summaries (name, directions, trial count, start time) of every study in the storage."""
    import optuna

    return optuna.get_all_study_summaries(open_optuna_storage(storage), include_best_trial=False)


def delete_study(name: str, storage: str = DEFAULT_STORAGE) -> None:
    """Remove a study and its traces."""
    import optuna

    load_study(name, storage)
    optuna.delete_study(study_name=name, storage=open_optuna_storage(storage))
    store = TraceStore(storage)
    try:
        store.delete(name)
    finally:
        store.close()


def objective_names(study: Any) -> list[str]:
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    names = study.metric_names or spec.get("objectives") or [f"value{i}" for i in range(len(study.directions))]
    return list(names)


def best_trials(study: Any) -> list[Any]:
    """The best feasible trial (one objective) or the feasible Pareto front (several), by number."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return []
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
    """Write the chosen trial's config with :meth:`ControllerConfig.save`; returns (trial, path)."""
    trial = pick_trial(study, trial_number)
    return trial, trial_config(study, trial).save(path)


def describe_trial(trial: Any, study: Any) -> str:
    """One line: number, state, objective values (energy labelled when it is an estimate), params."""
    parts = [f"trial {trial.number}", trial.state.name]
    if trial.values is not None:
        for name, value in zip(objective_names(study), trial.values):
            parts.append(f"{name}={value:.4g}{_energy_label(name, trial)}")
    ua = trial.user_attrs
    if "constraint" in ua and ua.get("constraint", [0])[0] > 0:
        parts.append("infeasible(target not reached)")
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


__all__ = ["OBJECTIVES", "StudyNotFoundError", "StudySpec", "StudySpecError", "StorageError", "best_trials",
           "delete_study", "export_config", "list_studies", "load_study", "plot_study", "run_study"]
