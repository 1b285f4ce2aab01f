"""Studies under faults: several workers, killed and interrupted workers, a database that goes away.

The PostgreSQL tests run in a database of their own and reach it, where the test cuts the
connection, through a loopback TCP proxy (``benchmarks.stress.TcpProxy``). The big version of
each scenario is ``python -m benchmarks.stress``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import optuna
import pytest
from sqlalchemy.engine import make_url

from adabatch.study import StudySpec, run_study
from benchmarks.stress import (
    TcpProxy,
    audit,
    finished_trials,
    mid_trial,
    study_text,
    wait_for,
    worker,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def clean(result: dict) -> None:
    """Every trial accounted for: none lost, none finished twice, every trace whole, none left over."""
    assert result["lost"] == [] and result["duplicated"] == [] and result["traces_broken"] == []
    assert result["over_n_trials"] == 0 and result["missing_originals"] == 0
    assert not {"RUNNING", "WAITING"} & set(result["states"]), result["states"]


@pytest.mark.slow
def test_workers_started_together_stop_at_the_files_n_trials(tmp_path):
    path = tmp_path / "three.toml"
    path.write_text(study_text("three", n_trials=7, budget=480, eval_every=160, pruner="none"))
    url = f"sqlite:///{tmp_path / 'three.db'}"
    procs = [worker(path, url) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    result = audit(url, "three", 7)
    clean(result)
    assert result["trials_run"] == 7 and result["states"] == {"COMPLETE": 7}


@pytest.fixture
def proxied(pg_database):
    """(direct URL, URL through a proxy the test can cut, the proxy)."""
    target = make_url(pg_database)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    try:
        yield pg_database, proxy.url_for(pg_database), proxy
    finally:
        proxy.stop()


@pytest.mark.postgres
def test_workers_wait_out_a_database_outage_and_finish_the_study(tmp_path, proxied):
    direct, via, proxy = proxied
    path = tmp_path / "outage.toml"
    path.write_text(study_text("outage", n_trials=5, budget=960, eval_every=320, heartbeat=1, grace=20, db_retry=60))
    proc = worker(path, via)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its stdout pipe from filling
    wait_for(lambda: len(finished_trials(direct, "outage")) >= 2, 120, "two finished trials")
    proxy.cut()
    # the outage lasts until the worker has met it (a fixed 3 s could fall inside one trial's training
    # on a loaded machine, with nothing to notice), then 2 s more: it must wait, not give up
    wait_for(lambda: any("unreachable while" in line for line in lines), 60, "the worker to notice the outage")
    time.sleep(2)
    proxy.restore()
    proc.wait(timeout=300)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "unreachable while" in err and "database back after" in err  # it noticed, waited and went on
    clean(audit(direct, "outage", 5))


@pytest.mark.postgres
def test_a_database_that_stays_away_ends_the_run_in_one_error_line_and_keeps_what_was_committed(tmp_path, proxied):
    direct, via, proxy = proxied
    path = tmp_path / "down.toml"
    path.write_text(study_text("down", n_trials=5, budget=960, eval_every=320, heartbeat=1, grace=2, db_retry=3))
    proc = worker(path, via)
    wait_for(lambda: len(finished_trials(direct, "down")) >= 2, 120, "two finished trials")
    committed = finished_trials(direct, "down")
    proxy.cut()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("adabatch: error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err
    assert "stayed unreachable for 3 s" in errors[0] and "run the same command again" in errors[0]
    after = finished_trials(direct, "down")
    assert all(after[n] == v for n, v in committed.items())  # nothing committed was lost

    # Back up: the next run fails the trial the worker held once it is stale, and finishes the study.
    time.sleep(2 + 1 + 1)
    notices = []
    run_study(StudySpec.from_toml(path), direct, progress=False, notify=notices.append)
    assert any("stale trial" in line for line in notices), notices
    clean(audit(direct, "down", 5))


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_one_killed_one_interrupted_lose_and_double_nothing(tmp_path, pg_database, monkeypatch):
    path = tmp_path / "four.toml"
    # no pruner and slower micro-batches (the workers inherit the setting): a trial seen mid-way still has
    # most of its run ahead when the signal lands; with the stress default (4 ms, micro-batches growing to
    # 128 samples) a trial took a fraction of a second and the signal sometimes found the worker between
    # trials or in its next one
    monkeypatch.setenv("ADABATCH_SLOW_STEP_S", "0.02")
    path.write_text(study_text("four", n_trials=24, heartbeat=1, grace=4, pruner="none"))
    procs = [worker(path, pg_database) for _ in range(4)]
    killed = mid_trial(pg_database, "four", procs[0])
    os.kill(procs[0].pid, signal.SIGKILL)
    interrupted = mid_trial(pg_database, "four", procs[1])
    os.kill(procs[1].pid, signal.SIGINT)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [-signal.SIGKILL, 130, 0, 0], [err for _, err in outs]
    said = re.fullmatch(r"adabatch: interrupted \(SIGINT\); trial (\d+) will be retried on the next run",
                        outs[1][1].strip())
    assert said is not None, outs[1][1]
    time.sleep(4 + 1 + 1)
    final = worker(path, pg_database)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    result = audit(pg_database, "four", 24)
    clean(result)
    assert result["retries"] >= 2 and result["interrupted"] == 1, result
    trials = optuna.load_study(study_name="four", storage=pg_database).trials

    def failed(proc) -> list[int]:
        return [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL
                and str(t.user_attrs.get("worker", "")).endswith(f":{proc.pid}")]

    # each signalled worker left exactly one failed trial: the one it held (retried), never an earlier one
    held = {p.pid: failed(p) for p in procs}
    assert len(held[procs[0].pid]) == 1 and held[procs[0].pid][0] >= killed, (killed, held)
    assert held[procs[1].pid] == [int(said.group(1))] and int(said.group(1)) >= interrupted, (interrupted, held)
    assert held[procs[2].pid] == held[procs[3].pid] == [], held


@pytest.mark.postgres
def test_workers_share_the_verification_runs_and_do_none_twice(tmp_path, pg_database):
    from adabatch.study import load_study, verification
    from adabatch.verify import CLAIM_PREFIX

    path = tmp_path / "verified.toml"
    path.write_text(study_text("verified", n_trials=4, budget=480, eval_every=160, pruner="none")
                    + "\n[verify]\ntop_k = 2\nseeds = 3\n")
    procs = [worker(path, pg_database) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    clean(audit(pg_database, "verified", 4))
    lines = [line for out, _ in outs for line in out.splitlines() if line.startswith("verify ")]
    # 2 trials and the default on 3 seeds: each run once, whichever worker took it.
    assert len(lines) == 9 and len(set(lines)) == 9
    study = load_study("verified", pg_database)
    assert verification(study).complete
    assert not [k for k, v in study.user_attrs.items() if k.startswith(CLAIM_PREFIX) and v]
