"""The ``adabatch`` command end to end: run, resume, best, export, plot, and one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from adabatch.cli import main

ROOT = Path(__file__).resolve().parents[1]

STUDY = textwrap.dedent("""
    [study]
    name = "cli-tiny"
    workload = "linreg"
    n_trials = 3
    sample_budget = 800
    eval_every = 400

    [fixed]
    max_batch = 128

    [search]
    grow_threshold = { low = 1.2, high = 3.0 }
    target_factor = { low = 0.1, high = 2.0, log = true }
    lr_rule = { choices = ["linear", "sqrt"] }
""")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(STUDY)
    return tmp_path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_run_resume_best_export_plot_on_the_default_sqlite_file(workdir, capsys):
    import torch

    from adabatch import AdaptiveBatchController, ControllerConfig

    assert main(["study", "run", "tiny.toml", "--no-progress"]) == 0
    assert (workdir / "adabatch.db").exists()  # the default storage needs no server
    assert main(["study", "run", "tiny.toml", "--n-trials", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "'cli-tiny': 5 trials in total" in out  # the second run resumed the same study

    assert main(["study", "list"]) == 0
    assert "cli-tiny" in capsys.readouterr().out
    assert main(["study", "best", "cli-tiny"]) == 0
    best_line = capsys.readouterr().out.strip()
    assert best_line.startswith("trial ") and "val_loss=" in best_line
    best_number = int(best_line.split()[1])

    assert main(["study", "export", "cli-tiny", "-o", "best.json"]) == 0
    cfg = ControllerConfig.load(workdir / "best.json")
    assert cfg.max_batch == 128 and cfg.lr_rule in ("linear", "sqrt")
    model = torch.nn.Linear(32, 1)
    ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.01), micro_batch_size=16,
                                  config=cfg)
    assert ctl.config.grow_threshold == cfg.grow_threshold

    assert main(["study", "export", "cli-tiny", "--trial", "0", "-o", "t0.json"]) == 0
    assert ControllerConfig.load(workdir / "t0.json").max_batch == 128

    assert main(["study", "plot", "cli-tiny", "-o", "report"]) == 0
    report = workdir / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert "history.png" in pngs and "importances.png" in pngs and f"trial_{best_number}.png" in pngs
    page = (report / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)  # self-contained: images embedded

    assert main(["study", "show", "cli-tiny"]) == 0
    assert capsys.readouterr().out.count("COMPLETE") == 5


def test_multiobjective_best_lists_the_front_and_export_needs_a_trial(workdir, capsys):
    text = STUDY.replace('n_trials = 3', 'n_trials = 3\nobjectives = ["metric", "seconds"]\nsampler = "nsga2"')
    (workdir / "multi.toml").write_text(text)
    assert main(["study", "run", "multi.toml", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["study", "best", "cli-tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Pareto front of 'cli-tiny'")
    front = [line for line in out.splitlines() if line.startswith("  trial ")]
    if len(front) > 1:
        assert main(["study", "export", "cli-tiny", "-o", "c.json"]) == 2
        assert "--trial N" in one_error_line(capsys)
    first = front[0].split()[1]
    assert main(["study", "export", "cli-tiny", "--trial", first, "-o", "c.json"]) == 0
    assert main(["study", "plot", "cli-tiny", "-o", "r"]) == 0
    assert (workdir / "r" / "pareto_front.png").exists() and (workdir / "r" / "index.html").exists()


@pytest.mark.parametrize("argv, expected", [
    (["study", "run", "missing.toml"], "no study file at missing.toml"),
    (["study", "run", "broken.toml"], "broken.toml is not valid TOML"),
    (["study", "run", "bad_schema.toml"], "low=3.0 is above high=1.2"),
    (["study", "show", "nope"], "no study 'nope'"),
    (["study", "best", "nope", "--storage", "postgresql+psycopg://nobody@127.0.0.1:1/x"], "cannot reach database"),
    (["study", "list", "--storage", "definitely not a url"], "is not a database URL"),
    (["study", "export", "nope"], "the following arguments are required: -o/--output"),
    (["study", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["study", "run", "tiny.toml", "--n-trials", "0"], "0 must be >= 1"),
    (["study", "run", "tiny.toml", "--storage", "sqlite:///"], "is an in-memory database"),
    (["study", "run", "tiny.toml", "--storage", ""], "the URL is empty"),
    (["study", "run", "tiny.toml", "--timeout", "nan"], "'nan' must be a positive, finite number of seconds"),
    (["study", "run", "tiny.toml", "--timeout", "-5"], "'-5' must be a positive, finite number of seconds"),
    (["study", "run", "tiny.toml", "--study-name", ""], "--study-name must be a non-empty string"),
    (["study", "run", "tiny.toml", "--study-name", "x" * 513], "at most 512 are stored"),
    (["study", "export", "cli-tiny", "--trial", "-1", "-o", "c.json"], "trial numbers start at 0"),
    (["study", "export", "cli-tiny", "-o", "."], "is a folder; give a file name"),
    (["study", "export", "cli-tiny", "-o", "no/such/dir/c.json"], "the folder no/such/dir does not exist"),
    (["study", "plot", "cli-tiny", "-o", "tiny.toml"], "is a file; give a folder"),
    (["demo", "--threads", "0"], "--threads: 0 is out of range"),
    (["demo", "--samples", "-5"], "--samples: -5 is out of range"),
    (["demo", "--samples", "0"], "--samples: 0 is out of range"),
])
def test_bad_input_exits_2_with_one_line(workdir, capsys, argv, expected):
    (workdir / "broken.toml").write_text("[study\n")
    (workdir / "bad_schema.toml").write_text(STUDY.replace("low = 1.2, high = 3.0", "low = 3.0, high = 1.2"))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("adabatch") and expected in line


def test_console_script_reports_an_unreachable_database_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "adabatch.cli", "study", "list", "--storage",
                           "postgresql+psycopg://nobody@127.0.0.1:1/x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot reach database" in proc.stderr


def test_help_explains_storage_and_the_pruning_limit(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "adabatch.db" in text and "postgresql+psycopg" in text
    assert "cannot prune multi-objective" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["study", "run", "--help"])
    assert "cannot prune multi-objective" in " ".join(capsys.readouterr().out.split())


def test_demo_subcommand_hands_its_arguments_to_the_demo_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("adabatch.demo")
    fake.add_arguments = lambda parser: parser.add_argument("--steps", type=int, default=1)
    fake.run = lambda args: seen.setdefault("steps", args.steps) and 0
    monkeypatch.setitem(sys.modules, "adabatch.demo", fake)
    import adabatch

    monkeypatch.setattr(adabatch, "demo", fake, raising=False)
    assert main(["demo", "--steps", "7"]) == 0
    assert seen == {"steps": 7}


def test_show_prints_the_settings_stored_with_the_study(workdir, capsys):
    assert main(["study", "run", "tiny.toml", "--no-progress"]) == 0
    (workdir / "tiny.toml").write_text(STUDY.replace("max_batch = 128", "max_batch = 256"))  # edited afterwards
    capsys.readouterr()
    assert main(["study", "show", "cli-tiny"]) == 0
    out = capsys.readouterr().out
    assert "[fixed] max_batch = 128" in out and "256" not in out  # what the trials ran, not the edited file
    assert '[search] grow_threshold = {type = "float", low = 1.2, high = 3.0}' in out
    assert "[pruner] kind = \"none\"" in out and "latest run: n_trials = 3" in out
    assert "trials: 3 of 3 (3 complete)" in out


def test_a_changed_study_file_is_refused_in_one_line_naming_the_change(workdir, capsys):
    assert main(["study", "run", "tiny.toml", "--no-progress", "--n-trials", "1"]) == 0
    (workdir / "tiny.toml").write_text(STUDY.replace("sample_budget = 800", "sample_budget = 1600"))
    capsys.readouterr()
    assert main(["study", "run", "tiny.toml", "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "[study] sample_budget: 800 -> 1600" in line and "--study-name NEW" in line
    assert main(["study", "run", "tiny.toml", "--no-progress", "--study-name", "cli-tiny-1600"]) == 0


def test_the_storage_url_can_come_from_the_environment(workdir, capsys, monkeypatch):
    url = f"sqlite:///{workdir / 'env.db'}"
    monkeypatch.setenv("ADABATCH_STORAGE", url)
    assert main(["study", "run", "tiny.toml", "--no-progress", "--n-trials", "1"]) == 0
    assert "--storage" not in capsys.readouterr().out  # the hint relies on the environment too
    assert (workdir / "env.db").exists() and not (workdir / "adabatch.db").exists()
    assert main(["study", "list"]) == 0 and "cli-tiny" in capsys.readouterr().out
    monkeypatch.setenv("ADABATCH_STORAGE", " ")
    assert main(["study", "list"]) == 2
    assert "ADABATCH_STORAGE is set but empty" in one_error_line(capsys)


SLOW_STUDY = textwrap.dedent("""
    [study]
    name = "slow"
    workload = "benchmarks.stress:slow_linreg"
    n_trials = 2
    sample_budget = 3200
    eval_every = 320

    [reliability]
    heartbeat_interval = 1
    grace_period = 3

    [fixed]
    max_batch = 64

    [search]
    grow_threshold = { low = 1.2, high = 3.0 }
    window_fraction = { low = 0.05, high = 0.5 }
""")


def start_worker(tmp_path: Path, url: str) -> subprocess.Popen:
    (tmp_path / "slow.toml").write_text(SLOW_STUDY)
    # Micro-batches of 30 ms make a trial of several seconds: a signal sent once the first part of its
    # trace is committed lands while it runs, however slowly the test polls on a loaded machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ADABATCH_SLOW_STEP_S="0.03")
    return subprocess.Popen([sys.executable, "-m", "adabatch.cli", "study", "run", "slow.toml", "--storage", url,
                             "--no-progress"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def running_trial_with_trace(url: str, proc: subprocess.Popen, timeout: float = 90) -> int:
    """The number of the trial ``proc`` runs, once part of its trace is committed."""
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                study = optuna.load_study(study_name="slow", storage=url)
                with engine.connect() as conn:
                    traced = {n for (n,) in conn.execute(sa.text("SELECT DISTINCT trial_number FROM adabatch_trace"))}
            except (KeyError, sa.exc.OperationalError):  # not created yet
                time.sleep(0.2)
                continue
            running = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
            if running and running[0] in traced:
                return running[0]
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise AssertionError("the worker never had a trial running with part of its trace committed")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_run_in_one_line_and_the_trial_is_retried_on_the_next_run(tmp_path, sig, code):
    from adabatch.study import StudySpec, run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'signals.db'}"
    proc = start_worker(tmp_path, url)
    number = running_trial_with_trace(url, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    name = signal.Signals(sig).name
    assert proc.returncode == code
    assert err.strip().splitlines() == [f"adabatch: interrupted ({name}); trial {number} will be retried on the "
                                        "next run"]
    trials = optuna.load_study(study_name="slow", storage=url).trials
    interrupted = trials[number]
    assert interrupted.state == optuna.trial.TrialState.FAIL and interrupted.user_attrs["interrupted"] == name
    queued = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(queued) == 1 and queued[0].params == interrupted.params

    # The next run starts with the queued retry and finishes the study: n_trials originals, all done.
    sys.path.insert(0, str(tmp_path))
    try:
        study = run_study(StudySpec.from_toml(tmp_path / "slow.toml"), url, progress=False)
    finally:
        sys.path.remove(str(tmp_path))
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == interrupted.params
    assert sum("failed_trial" not in t.system_attrs for t in study.trials) == 2
    assert all(t.state.is_finished() for t in study.trials)


def test_a_killed_workers_trial_is_failed_by_the_next_command_that_opens_the_study(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    proc = start_worker(tmp_path, url)
    number = running_trial_with_trace(url, proc)
    proc.kill()
    proc.communicate(timeout=30)
    time.sleep(3 + 1 + 0.5)  # grace period + heartbeat interval + slack: no worker is left to notice
    capsys.readouterr()
    assert main(["study", "show", "slow", "--storage", url]) == 0
    captured = capsys.readouterr()
    shown = f"stderr:\n{captured.err}\nstdout:\n{captured.out}"  # what a failure needs to be understood
    assert f"failed 1 stale trial(s) of study 'slow' (no heartbeat for 3 s): {number}" in captured.err, shown
    assert f"trial {number}  FAIL" in captured.out and f"retry of trial {number}" in captured.out, shown


@pytest.mark.postgres
def test_a_password_in_the_storage_url_appears_in_no_output_attribute_file_or_trace(tmp_path, pg_database, capfd,
                                                                                     monkeypatch):
    secret = "s3cret-PASSWORD"
    url = pg_database.replace("postgres@", f"postgres:{secret}@")  # trust auth: any password is accepted
    assert secret in url
    (tmp_path / "tiny.toml").write_text(STUDY.replace('n_trials = 3', 'n_trials = 2\npruner = "median"'))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outputs = []

    def cli(*argv: str, storage: str | None = url, code: int = 0, environ: dict | None = None) -> None:
        args = [sys.executable, "-m", "adabatch.cli", *argv] + (["--storage", storage] if storage else [])
        proc = subprocess.run(args, cwd=tmp_path, env={**env, **(environ or {})}, capture_output=True, text=True,
                              timeout=300)
        outputs.append(" ".join(argv) + "\n" + proc.stdout + proc.stderr)
        assert proc.returncode == code, proc.stderr

    def in_process(*argv: str, code: int = 0) -> None:
        assert main([*argv, "--storage", url]) == code
        captured = capfd.readouterr()  # file-descriptor level: log handlers included
        outputs.append(" ".join(argv) + "\n" + captured.out + captured.err)

    # Runs in processes of their own, as users start them: progress bar, per-trial lines, logs.
    cli("study", "run", "tiny.toml")  # with the progress bar
    cli("study", "run", "tiny.toml", "--no-progress", "--n-trials", "2", storage=None,
        environ={"ADABATCH_STORAGE": url})
    cli("study", "run", "tiny.toml", storage=url.replace("/adabatch_test", "/no_such_db_"), code=2)
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    for argv in (["list"], ["show", "cli-tiny"], ["best", "cli-tiny"], ["export", "cli-tiny", "-o", "best.json"],
                 ["plot", "cli-tiny", "-o", "report"]):
        in_process("study", *argv)
    in_process("study", "show", "nope", code=2)
    assert any("password hidden" in out for out in outputs)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"best.json", "index.html"} <= {p.name for p in files}
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    leaks += [out.splitlines()[0] for out in outputs if secret in out]
    study = optuna.load_study(study_name="cli-tiny", storage=url)
    stored = [study.user_attrs] + [[t.user_attrs, t.system_attrs] for t in study.trials]
    if secret in json.dumps(stored, default=str):
        leaks.append("study or trial attributes")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    if secret in str(tuple(row)):
                        leaks.append(f"table {table}")
    finally:
        engine.dispose()
    assert leaks == []
    assert len(study.trials) == 4 and len(outputs) == 9


def _demo(checkpoint: Path, out: Path, samples: int, every: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adabatch", "demo", "--workload", "linreg", "--samples", str(samples),
           "--checkpoint", str(checkpoint), "--out", str(out)]
    if every is not None:
        cmd += ["--checkpoint-every", str(every)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("writes", [1, 7])
def test_a_training_run_sigkilled_mid_run_resumes_from_its_checkpoint_to_the_same_end_bit_for_bit(tmp_path, writes):
    """Kill -9 mid-training (mid-accumulation included) after the checkpoint was written ``writes``
    times, run the same command again: the end state equals the uninterrupted run's, weights and
    controller alike."""
    import torch

    samples = 80_000
    whole = _demo(tmp_path / "whole.pt", tmp_path / "a", samples)
    assert whole.wait(timeout=240) == 0, whole.stderr.read()
    killed_ckpt = tmp_path / "killed.pt"
    victim = _demo(killed_ckpt, tmp_path / "b", samples, every=4_000)
    seen, deadline = set(), time.monotonic() + 120
    while len(seen) < writes and victim.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            seen.add(killed_ckpt.stat().st_mtime_ns)
        time.sleep(0.002)
    time.sleep(0.005)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    at_kill = torch.load(killed_ckpt, weights_only=False)["controller"]["samples"]
    assert 0 < at_kill < samples, at_kill
    again = _demo(killed_ckpt, tmp_path / "b", samples, every=4_000)
    assert again.wait(timeout=240) == 0, again.stderr.read()
    a, b = (torch.load(p, weights_only=False) for p in (tmp_path / "whole.pt", killed_ckpt))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ca, cb = a["controller"], b["controller"]
    for key in ("samples", "steps", "batch_size"):
        assert ca[key] == cb[key], key
    assert ca["estimator"] == cb["estimator"]
    assert [e["val_loss"] for e in a["evals"]] == [e["val_loss"] for e in b["evals"]]
