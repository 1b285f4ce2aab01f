"""Fuzzing with hypothesis: ControllerConfig, study files and command lines get clear errors only.

A clear error is one line naming what was wrong: ConfigError, StudySpecError, or exit status 2
with one line on stderr. Never a traceback, never another exception, and never a study left in
the storage by a command that failed. ``ADABATCH_FUZZ_EXAMPLES`` raises the number of examples
(``python -m benchmarks.stress`` does); ``ADABATCH_FUZZ_REPORT`` names a JSON file that receives
how many cases each test tried.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adabatch import ControllerConfig
from adabatch.cli import main
from adabatch.config import ConfigError
from adabatch.study import FINGERPRINT_ATTR, StudySpec, StudySpecError

EXAMPLES = int(os.environ.get("ADABATCH_FUZZ_EXAMPLES", "30"))
CASES: collections.Counter[str] = collections.Counter()


def fuzz_settings(share: float = 1.0) -> settings:
    # No example database: nothing written into the working tree.
    return settings(max_examples=max(5, int(EXAMPLES * share)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    path = os.environ.get("ADABATCH_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps(dict(CASES), indent=2))


# ----------------------------------------------------------------------------- values

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    text, st.sampled_from(["linear", "sqrt", "none", "auto", "noise", "median", "tpe", "linreg"]))
toml_values = st.one_of(scalars, st.lists(scalars, max_size=3),
                        st.dictionaries(st.sampled_from(["low", "high", "log", "step", "choices", "type", "x"]),
                                        st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=4))
python_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                          st.floats(allow_nan=True, allow_infinity=True), text, st.lists(st.integers(), max_size=2),
                          st.dictionaries(text, st.integers(), max_size=2))

# Every field, read from the dataclass: new fields are fuzzed as soon as they exist.
FIELDS = [f.name for f in dataclasses.fields(ControllerConfig) if f.name != "extra"]


def one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip() and "Traceback" not in message


# ----------------------------------------------------------------------------- ControllerConfig


@fuzz_settings(3)
@given(st.dictionaries(st.sampled_from(FIELDS), python_values, max_size=6))
def test_controller_config_is_built_or_refused_with_a_config_error_naming_a_field(values):
    CASES["controller_config"] += 1
    try:
        config = ControllerConfig(**values)
    except ConfigError as exc:
        assert one_line(str(exc)) and any(name in str(exc) for name in FIELDS), str(exc)
        return
    assert ControllerConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------- study files

BASE = {
    "study": {"name": "fz", "workload": "linreg", "n_trials": 1, "sample_budget": 64, "eval_every": 32,
              "pruner": "median", "seed": 0},
    "pruner": {"startup_trials": 1},
    "reliability": {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 1, "db_retry_seconds": 5},
    "verify": {"top_k": 1, "seeds": 1},
    "fixed": {"max_batch": 64},
    "search": {"grow_threshold": {"low": 1.2, "high": 3.0}, "lr_rule": {"choices": ["linear", "sqrt"]}},
}
KEYS = {
    "study": ["name", "workload", "objectives", "sampler", "pruner", "require_target", "target", "n_trials", "seed",
              "seeds_per_trial", "sample_budget", "eval_every", "stop_at_target", "startup_trials", "population_size",
              "colour"],
    "pruner": ["startup_trials", "warmup_samples", "interval_samples", "percentile", "min_samples",
               "reduction_factor", "kind"],
    "reliability": ["heartbeat_interval", "grace_period", "max_retry", "db_retry_seconds", "retries"],
    "verify": ["top_k", "seeds", "baseline", "rounds"],
    "fixed": FIELDS + ["extra", "max_bach"],
    "search": FIELDS + ["extra", "grow_thresold"],
}


@st.composite
def study_dicts(draw, keep_small: bool = False) -> dict:
    """The valid BASE study with one to four random edits: a key removed, set to any value, or added."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        table = draw(st.sampled_from([*KEYS, "top"]))
        if table == "top":
            key = draw(st.sampled_from([*KEYS, "extra"]))
            if draw(st.booleans()):
                data.pop(key, None)
            else:
                data[key] = draw(toml_values)
            continue
        if not isinstance(data.get(table), dict):
            data[table] = {}
        key = draw(st.sampled_from(KEYS[table]))
        if key in data[table] and draw(st.booleans()):
            del data[table][key]
        else:
            data[table][key] = draw(toml_values)
    if keep_small and isinstance(data.get("study"), dict):
        # Runs that pass validation really train: keep them to a few milliseconds.
        data["study"].update(workload="linreg", sample_budget=64, eval_every=32, n_trials=1)
    return data


def to_toml(data: dict) -> str:
    """A TOML document for ``data`` (tables of scalars, lists and inline tables)."""
    def key(k: str) -> str:
        return json.dumps(str(k), ensure_ascii=False).replace("\x7f", "\\u007f")

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        if isinstance(v, str):
            return key(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"

    lines = [f"{key(k)} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{key(name)}]")
            lines += [f"{key(k)} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@fuzz_settings(4)
@given(study_dicts())
def test_a_study_definition_is_accepted_or_refused_in_one_line(data):
    CASES["study_dict"] += 1
    try:
        spec = StudySpec.from_dict(data)
    except StudySpecError as exc:
        assert one_line(str(exc)), str(exc)
        return
    # An accepted definition is usable throughout: its settings, fingerprint and sampler.
    assert spec.fingerprint() == StudySpec.from_dict(data).fingerprint()
    json.dumps(spec.to_dict())
    spec.directions()


@fuzz_settings()
@given(st.one_of(text, st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                 study_dicts().map(to_toml).map(lambda t: t[: len(t) // 2])))
def test_any_text_as_a_study_file_is_refused_in_one_line(tmp_path_factory, content):
    CASES["study_file_text"] += 1
    path = tmp_path_factory.mktemp("text") / "study.toml"
    path.write_text(content)
    try:
        StudySpec.from_toml(path)
    except StudySpecError as exc:
        assert one_line(str(exc)), str(exc)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            code = exc.code
    return int(code or 0), out.getvalue(), err.getvalue()


def assert_clear(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("adabatch"), err


@fuzz_settings(0.5)
@given(study_dicts(keep_small=True))
def test_study_run_on_a_fuzzed_file_runs_or_fails_cleanly_and_never_half_creates_a_study(fuzz_dir, data):
    CASES["study_run"] += 1
    tag = CASES["study_run"]  # a new study name for every example
    path = fuzz_dir / f"run{tag}.toml"
    path.write_text(to_toml(data))
    url = f"sqlite:///{fuzz_dir / 'runs.db'}"
    name = f"fz-{tag}"
    code, _, err = run_main(["study", "run", str(path), "--storage", url, "--study-name", name, "--no-progress"])
    assert_clear(code, err)
    names = optuna.get_all_study_names(storage=url) if (fuzz_dir / "runs.db").exists() else []
    if code == 2:
        assert name not in names, f"a refused file left study {name!r} behind: {err}"
    else:
        study = optuna.load_study(study_name=name, storage=url)
        assert FINGERPRINT_ATTR in study.user_attrs and len(study.trials) == 1


# ----------------------------------------------------------------------------- command lines

OPTIONS = ["--storage", "--n-trials", "--timeout", "--study-name", "--trial", "-o", "--no-progress", "--help",
           "--bogus"]
VALUES = ["0", "1", "2", "-1", "nan", "inf", "-inf", "1e309", "x", "", " ", "\x00", "fz", "nope", "a" * 600,
          "sqlite:///", "sqlite://", "not a url", "postgresql+psycopg://u:pw123@127.0.0.1:1/x", "9" * 30]


@pytest.fixture(scope="module")
def cli_world(fuzz_dir):
    """A storage holding one finished study ``fz``, a valid and a broken study file."""
    url = f"sqlite:///{fuzz_dir / 'cli.db'}"
    ok = fuzz_dir / "ok.toml"
    ok.write_text(to_toml(BASE))
    (fuzz_dir / "broken.toml").write_text("[study\n")
    code, _, err = run_main(["study", "run", str(ok), "--storage", url, "--no-progress"])
    assert code == 0, err
    return {"url": url, "dir": fuzz_dir, "files": [str(ok), str(fuzz_dir / "broken.toml"), str(fuzz_dir / "missing.toml"),
                                  str(fuzz_dir)],
            "outputs": [str(fuzz_dir / "cfg.json"), str(fuzz_dir / "missing" / "cfg.json"), str(ok),
                        str(fuzz_dir)]}


@st.composite
def command_lines(draw, world: dict) -> list[str]:
    action = draw(st.sampled_from(["run", "list", "show", "best", "export", "plot", "delete", "frobnicate"]))
    argv = ["study", action]
    if action == "run":
        argv.append(draw(st.sampled_from(world["files"])))
    elif action not in ("list", "frobnicate") and draw(st.integers(0, 4)):
        argv.append(draw(st.sampled_from(["fz", "nope", "", "a" * 600])))
    for option in draw(st.lists(st.sampled_from(OPTIONS), max_size=4)):
        argv.append(option)
        if option in ("--no-progress", "--help"):
            continue
        if option == "-o":
            argv.append(draw(st.sampled_from(world["outputs"] + VALUES[:3])))
        else:
            argv.append(draw(st.sampled_from(VALUES + [world["url"]] * 4)))
    if "--storage" not in argv:
        argv += ["--storage", world["url"]]
    if action == "run":
        argv += ["--n-trials", "1"]  # the last one counts: a valid command trains one tiny trial at most
    return argv


@fuzz_settings()
@given(st.data())
def test_every_command_line_succeeds_or_fails_in_one_line(cli_world, monkeypatch, data):
    CASES["command_line"] += 1
    monkeypatch.chdir(cli_world["dir"])  # "-o 2" writes ./2: into the scratch folder, never the working tree
    argv = data.draw(command_lines(cli_world))
    before = set(optuna.get_all_study_names(storage=cli_world["url"]))
    code, out, err = run_main(argv)
    assert_clear(code, err)
    assert "pw123" not in out + err  # a password in a URL is never printed
    if code == 2:
        assert set(optuna.get_all_study_names(storage=cli_world["url"])) <= before


@fuzz_settings(2)
@given(st.lists(st.sampled_from(["--samples", "--threads", "--seed", "--out", "--config", "--workload",
                                 "--energy-aware"]), max_size=3).flatmap(
    lambda opts: st.tuples(st.just(opts), st.lists(st.sampled_from(VALUES + ["linreg", "mnist1d-mlp"]),
                                                   min_size=len(opts), max_size=len(opts)))))
def test_demo_arguments_are_validated_in_one_line(tmp_path_factory, opts_and_values):
    import argparse

    from adabatch import demo
    from adabatch.cli import _Parser

    CASES["demo_arguments"] += 1
    argv = []
    for option, value in zip(*opts_and_values):
        argv += [option] if option == "--energy-aware" else [option, value]
    parser = _Parser(prog="adabatch demo")
    demo.add_arguments(parser)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 2 and one_line(err.getvalue()), err.getvalue()
            return
    assert isinstance(args, argparse.Namespace)
    assert args.threads >= 1 and 0 <= args.seed < 2**32 and (args.samples is None or args.samples >= 1)
