"""Storage: the trace table, SQLite concurrency, unreachable databases, and real PostgreSQL workers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from adabatch import StepRecord
from adabatch.storage import StorageError, TraceStore, create_engine, open_optuna_storage, retried_trial_number

ROOT = Path(__file__).resolve().parents[1]

PG_URL = os.environ.get("ADABATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def study_file(tmp_path: Path, name: str, *, budget: int, n_trials: int = 2) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        [study]
        name = "{name}"
        workload = "benchmarks.stress:slow_linreg"  # sleeps in its loss: trials last long enough to kill
        n_trials = {n_trials}
        sample_budget = {budget}
        eval_every = 320

        [reliability]
        heartbeat_interval = 1
        grace_period = 2
        max_retry = 1

        [fixed]
        max_batch = 64

        [search]
        grow_threshold = {{ low = 1.2, high = 3.0 }}
        window_fraction = {{ low = 0.05, high = 0.5 }}
    """))
    return path


def worker(path: Path, storage: str, n_trials: int, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "adabatch.cli", "study", "run", str(path), "--storage", storage,
           "--n-trials", str(n_trials), "--no-progress"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def record(step: int, **kw) -> StepRecord:
    base = dict(step=step, samples=16 * (step + 1), batch=16, micro_batches=1, micro_batch_size=16,
                b_simple=math.nan, grad_sq=math.nan, trace_sigma=math.nan, lr=0.1, loss=1.0 / (step + 1),
                measured=False, seconds=0.01 * step)
    base.update(kw)
    return StepRecord(**base)


def test_trace_round_trip_keeps_every_field(tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    recs = [record(0, b_simple=math.inf), record(1, b_simple=123.5, grad_sq=0.25, trace_sigma=30.875, measured=True,
                                energy_j=4.5, energy_source="estimate:cpu-time", metrics={"accuracy": 0.75})]
    with store.writer("s", 7) as write:
        for r in recs:
            write(r)
    rows = store.read("s", 7)
    assert len(rows) == 2
    for got, want in zip(rows, [r.to_dict() for r in recs]):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == value, key
    assert store.read("s", 8) == [] and store.trial_numbers("s") == [7]


def test_writer_commits_in_batches_and_holds_back_the_newest_record(tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 't.db'}")
    write = store.writer("s", 0, flush_every=4)
    for i in range(4):
        write(record(i))
    assert store.read("s", 0) == []  # nothing committed before a batch is full
    last = record(4)
    write(last)
    assert [r["step"] for r in store.read("s", 0)] == [0, 1, 2, 3]
    last.metrics["accuracy"] = 0.5  # the controller attaches eval metrics to the newest record later
    write.flush_all()
    assert store.read("s", 0)[-1]["metrics"] == {"accuracy": 0.5}


def test_sqlite_files_use_wal_and_a_busy_timeout(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() >= 10_000


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg://nobody@127.0.0.1:1/x", "cannot reach database postgresql+psycopg://nobody@127.0.0.1:1/x"),
    ("not a url", "is not a database URL"),
    ("nosuchdialect://x/y", "cannot use storage"),
    ("sqlite:////no/such/dir/x.db", "cannot reach database"),
])
def test_bad_or_unreachable_database_is_one_storage_error(url, message):
    with pytest.raises(StorageError) as err:
        open_optuna_storage(url)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_password_is_not_shown_in_errors():
    with pytest.raises(StorageError) as err:
        create_engine("postgresql+psycopg://user:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(err.value)


def test_two_workers_share_one_sqlite_file_without_lock_errors(tmp_path):
    path = study_file(tmp_path, "sqlite-pair", budget=640)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [worker(path, url, 3, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err + out
    study = optuna.load_study(study_name="sqlite-pair", storage=url)
    assert len(study.trials) == 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.fixture
def postgres_url():
    try:
        create_engine(PG_URL).dispose()
    except StorageError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    return PG_URL


@pytest.mark.postgres
def test_postgres_workers_share_a_study_and_a_killed_trial_is_retried_once(tmp_path, postgres_url):
    from adabatch.study import delete_study

    name = f"pg-workers-{uuid.uuid4().hex[:10]}"
    had_optuna_tables = _has_table(postgres_url, "studies")
    # ~1.5 s of sleeping per trial: long enough to kill one mid-way, short enough for a test.
    path = study_file(tmp_path, name, budget=4800)
    states = optuna.trial.TrialState
    try:
        victim = worker(path, postgres_url, 3, tmp_path)
        store = TraceStore(postgres_url)
        killed, deadline = None, time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=name, storage=postgres_url)
            except KeyError:
                continue
            running = [t for t in study.trials if t.state == states.RUNNING]
            # Kill once the running trial has committed part of its trace.
            if running and store.read(name, running[0].number):
                killed = running[0]
        assert killed is not None, "the first worker never got a trial running"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        flushed = len(store.read(name, killed.number))
        done_before = sum(t.state == states.COMPLETE
                          for t in optuna.load_study(study_name=name, storage=postgres_url).trials)

        time.sleep(2 + 1 + 1)  # grace_period + heartbeat_interval + slack: the trial is now stale
        procs = [worker(path, postgres_url, 2, tmp_path) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err

        trials = optuna.load_study(study_name=name, storage=postgres_url).trials
        by_state = {s: [t for t in trials if t.state == s] for s in states}
        assert by_state[states.RUNNING] == [] and by_state[states.WAITING] == []
        assert [t.number for t in by_state[states.FAIL]] == [killed.number]
        retries = [t for t in trials if retried_trial_number(t) == killed.number]
        assert len(retries) == 1, "the killed trial must be re-run exactly once"
        assert retries[0].state == states.COMPLETE and retries[0].params == killed.params
        # Every trial the two workers ran completed, the retry among them, and none twice.
        assert len(by_state[states.COMPLETE]) == done_before + 4
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        # What the killed worker committed stays; the retry wrote under its own number.
        assert len(store.read(name, killed.number)) == flushed > 0
        assert store.read(name, retries[0].number)[-1]["samples"] >= 4800
        store.close()
    finally:
        for p in locals().get("procs", []) + [locals().get("victim")]:
            if p is not None and p.poll() is None:
                p.kill()
        try:
            delete_study(name, postgres_url)
        except Exception:
            pass
        _drop_tables_we_created(postgres_url, optuna_too=not had_optuna_tables)


def _has_table(url: str, table: str) -> bool:
    engine = create_engine(url)
    try:
        return sa.inspect(engine).has_table(table)
    finally:
        engine.dispose()


def _drop_tables_we_created(url: str, optuna_too: bool) -> None:
    """Drop the trace table, and Optuna's if this test created them, but only while they are empty."""
    from optuna.storages._rdb.models import BaseModel

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if sa.inspect(conn).has_table("adabatch_trace"):
                if conn.execute(sa.text("SELECT count(*) FROM adabatch_trace")).scalar() == 0:
                    conn.execute(sa.text("DROP TABLE adabatch_trace"))
        if optuna_too:
            with engine.begin() as conn:
                if conn.execute(sa.text("SELECT count(*) FROM studies")).scalar() == 0:
                    BaseModel.metadata.drop_all(conn)
                    conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
    finally:
        engine.dispose()


def test_plot_reads_exactly_the_trace_a_trial_wrote(tmp_path, monkeypatch):
    import tomllib

    import adabatch.plots
    import adabatch.workloads
    from adabatch.study import StudySpec, load_study, plot_study, run_study

    histories = {}
    real_train = adabatch.workloads.train

    def recording_train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        histories[len(histories)] = result.history
        return result

    drawn = {}
    real_plot = adabatch.plots.plot_training

    def recording_plot(rows, path, **kwargs):
        drawn["rows"] = rows
        return real_plot(rows, path, **kwargs)

    monkeypatch.setattr(adabatch.workloads, "train", recording_train)
    monkeypatch.setattr(adabatch.plots, "plot_training", recording_plot)
    spec = StudySpec.from_dict(tomllib.loads(textwrap.dedent("""
        [study]
        name = "roundtrip"
        workload = "linreg"
        sample_budget = 1200
        eval_every = 400
        [search]
        window_fraction = { low = 0.05, high = 0.5 }
    """)))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_study(spec, url, n_trials=2, progress=False)
    files = plot_study(load_study("roundtrip", url), tmp_path / "out", url, trial_number=1)
    assert files["trial"].name == "trial_1.png"
    written, read = histories[1], drawn["rows"]
    assert len(read) == len(written) > 10
    assert sum(bool(r["metrics"]) for r in read) == 3  # the three evaluations
    for got, want in zip(read, written):
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == value, key


def test_a_trace_table_of_the_first_release_gains_the_interval_columns(tmp_path):
    import sqlalchemy as sa

    from adabatch.storage import TRACE_TABLE, TraceStore

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the table as the first release created it, with one row
        conn.execute(sa.text(f"CREATE TABLE {TRACE_TABLE} (id INTEGER PRIMARY KEY, study_name VARCHAR(512), "
                             "trial_number INTEGER, step BIGINT, samples BIGINT, batch BIGINT, micro_batches BIGINT, "
                             "micro_batch_size BIGINT, b_simple FLOAT, grad_sq FLOAT, trace_sigma FLOAT, lr FLOAT, "
                             "loss FLOAT, seconds FLOAT, energy_j FLOAT, measured BOOLEAN, energy_source VARCHAR(128), "
                             "metrics TEXT, CONSTRAINT uq_adabatch_trace_step UNIQUE (study_name, trial_number, step))"))
        conn.execute(sa.text(f"INSERT INTO {TRACE_TABLE} (study_name, trial_number, step, samples, batch, lr, loss, "
                             "metrics) VALUES ('old', 0, 0, 32, 32, 0.1, 2.0, '{}')"))
    engine.dispose()
    store = TraceStore(url)
    store.write("new", 0, [dict(step=0, samples=64, batch=64, lr=0.1, loss=1.0, noise_low=10.0,
                                noise_high=float("inf"))])
    old, new = store.read("old", 0)[0], store.read("new", 0)[0]
    store.close()
    assert old["samples"] == 32 and math.isnan(old["noise_low"])
    assert new["noise_low"] == 10.0 and new["noise_high"] == float("inf")
