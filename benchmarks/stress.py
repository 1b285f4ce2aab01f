"""Stress test of studies: workers killed and interrupted, the database cut away, fuzzed input.

Needs the PostgreSQL server at 127.0.0.1:5432 (``ADABATCH_TEST_PG`` names another); every
scenario runs in a database of its own, dropped afterwards. A few minutes on two cores::

    python -m benchmarks.stress            # figures printed and written to benchmarks/results/stress.json

1. Workers: 4 workers share a 100-trial study; one is SIGKILLed and one SIGINTed mid-trial. Every
   trial must end COMPLETE or PRUNED, or FAIL with a retry that does; none lost, none run twice
   to an outcome, each trace whole (contiguous steps, complete for finished trials).
2. Outage: workers reach the database through a loopback TCP proxy that is cut for a few seconds
   and restored (they must wait and go on), then cut for good (they must exit 75 with one line,
   keeping every trial committed before the cut).
3. Fuzzing: the hypothesis tests of ``tests/test_fuzz.py`` with many more examples.

The module also provides what the tests reuse: :class:`TcpProxy`, :func:`scratch_database` and
the ``slow_linreg`` workload (a linreg whose micro-batches take a few milliseconds, so trials
last long enough to be killed mid-way).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("ADABATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RESULTS = ROOT / "benchmarks" / "results" / "stress.json"
# Seconds each micro-batch of slow_linreg sleeps: 100 micro-batches make a trial of about 1 s.
SLOW_STEP_S = float(os.environ.get("ADABATCH_SLOW_STEP_S", "0.004"))


# ----------------------------------------------------------------------------- workload


def _slow_mse(pred: Any, y: Any) -> Any:
    from adabatch.workloads import WORKLOADS

    time.sleep(SLOW_STEP_S)
    return WORKLOADS["linreg"].loss(pred, y)


def slow_linreg() -> Any:
    """The linreg workload with a short sleep per micro-batch (``benchmarks.stress:slow_linreg``)."""
    from adabatch.workloads import WORKLOADS

    return dataclasses.replace(WORKLOADS["linreg"], name="slow-linreg", loss=_slow_mse)


def study_text(name: str, *, n_trials: int, budget: int = 1600, eval_every: int = 400, heartbeat: int = 1,
               grace: int = 4, max_retry: int = 2, db_retry: int = 30, pruner: str = "median") -> str:
    """A study file on ``slow_linreg`` whose trials last about ``budget / 16 * SLOW_STEP_S`` seconds."""
    pruner_table = "" if pruner == "none" else "[pruner]\nstartup_trials = 4\n"
    return textwrap.dedent(f"""\
        [study]
        name = "{name}"
        workload = "benchmarks.stress:slow_linreg"
        pruner = "{pruner}"
        n_trials = {n_trials}
        sample_budget = {budget}
        eval_every = {eval_every}
        seed = 0
        startup_trials = 8

        [reliability]
        heartbeat_interval = {heartbeat}
        grace_period = {grace}
        max_retry = {max_retry}
        db_retry_seconds = {db_retry}

        [fixed]
        max_batch = 128

        [search]
        grow_threshold = {{ low = 1.2, high = 3.0 }}
        window_fraction = {{ low = 0.05, high = 0.5 }}
        lr_rule = {{ choices = ["linear", "sqrt"] }}
    """) + pruner_table


def worker(study_file: Path, storage: str, *, n_trials: int | None = None, env: dict[str, str] | None = None,
           cwd: Path = ROOT) -> subprocess.Popen:
    """``adabatch study run`` in a process of its own (stdout and stderr piped)."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(cwd)]))
    environ.update(env or {})
    cmd = [sys.executable, "-m", "adabatch.cli", "study", "run", str(study_file), "--storage", storage,
           "--no-progress"]
    if n_trials is not None:
        cmd += ["--n-trials", str(n_trials)]
    return subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------- databases


def with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


@contextlib.contextmanager
def scratch_database(url: str = PG_URL, prefix: str = "adabatch_stress") -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``url``, dropped afterwards; yields its URL."""
    import sqlalchemy as sa

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(with_database(url, "postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield with_database(url, name)
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


def postgres_available(url: str = PG_URL) -> str | None:
    """None when the server of ``url`` answers, else why not (one line)."""
    from adabatch.storage import StorageError, create_engine

    try:
        create_engine(with_database(url, "postgres")).dispose()
    except StorageError as exc:
        return str(exc)
    return None


class TcpProxy:
    """A loopback TCP proxy to ``host:port`` that can be cut (every connection dropped, new ones refused).

    Example:
        >>> proxy = TcpProxy("127.0.0.1", 9).start()
        >>> proxy.port > 0
        True
        >>> proxy.stop()
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._up = False

    def start(self) -> "TcpProxy":
        self._listen()
        return self

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        from sqlalchemy.engine import make_url

        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener, self._up = listener, True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut or stopped
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._up:
                    client.close()
                    server.close()
                    continue
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except (OSError, ValueError):  # a socket closed by cut() (select raises ValueError on fd -1)
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._up = False
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        if not self._up:
            self._listen()

    def stop(self) -> None:
        self.cut()


# ----------------------------------------------------------------------------- audit


def audit(url: str, name: str, n_trials: int | None = None) -> dict[str, Any]:
    """Every trial of study ``name`` accounted for: outcomes, retries, losses, doubles, trace integrity.

    A trial and its retries form one chain (``failed_trial`` names the original). A chain is
    *lost* when no run of it ended COMPLETE or PRUNED, *doubled* when more than one did. A trace
    is *broken* when its steps are not 0, 1, 2, ... without gaps or repeats, when a COMPLETE
    trial's trace does not hold every step it ran up to the budget, or when a trial not yet
    started has rows. A PRUNED or FAIL trial's trace is a prefix: the controller releases step
    records in groups, and a run stopped mid-group never releases the rest.
    """
    import optuna
    from optuna.trial import TrialState

    from adabatch.storage import TraceStore

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    budget = study.user_attrs["adabatch_spec"]["study"]["sample_budget"]
    chains: dict[int, list[Any]] = {}
    for t in trials:
        chains.setdefault(t.system_attrs.get("failed_trial", t.number), []).append(t)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    store = TraceStore(url)
    broken: list[int] = []
    rows_total = 0
    try:
        for t in trials:
            rows = store.read(name, t.number)
            rows_total += len(rows)
            steps = [r["step"] for r in rows]
            ok = steps == list(range(len(steps)))
            if t.state == TrialState.COMPLETE:
                ok = ok and len(rows) == t.user_attrs.get("steps") and rows[-1]["samples"] >= budget
            elif t.state == TrialState.WAITING:
                ok = not rows
            if not ok:
                broken.append(t.number)
    finally:
        store.close()
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    originals = sum("failed_trial" not in t.system_attrs for t in trials)
    return {
        "trials_run": len(trials),
        "originals": originals,
        "n_trials": n_trials,
        "states": {k: v for k, v in states.items() if v},
        "retries": len(trials) - originals,
        "interrupted": sum(bool(t.user_attrs.get("interrupted")) for t in trials),
        "lost": sorted(root for root, runs in chains.items() if not any(r.state in finished for r in runs)),
        "duplicated": sorted(root for root, runs in chains.items() if sum(r.state in finished for r in runs) > 1),
        "over_n_trials": max(0, originals - n_trials) if n_trials is not None else None,
        "missing_originals": max(0, n_trials - originals) if n_trials is not None else None,
        "trace_rows": rows_total,
        "traces_broken": broken,
    }


def mid_trial(url: str, name: str, proc: subprocess.Popen, timeout: float = 120.0) -> int:
    """Wait until ``proc`` runs a trial that has committed part of its trace; returns the trial's number."""
    import optuna
    from optuna.trial import TrialState

    from adabatch.storage import TraceStore

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = TraceStore(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({proc.returncode}) before it ran a trial: "
                                   f"{proc.stderr.read() if proc.stderr else ''}")
            try:
                study = optuna.load_study(study_name=name, storage=url)
            except KeyError:
                time.sleep(0.2)
                continue
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if str(t.user_attrs.get("worker", "")).endswith(f":{proc.pid}") and store.read(name, t.number):
                    return t.number
            time.sleep(0.1)
    finally:
        store.close()
    raise TimeoutError(f"worker {proc.pid} never had a trial with a committed trace within {timeout:g} s")


def finished_trials(url: str, name: str) -> dict[int, tuple[str, Any]]:
    """Number -> (state, values) of the study's finished trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return {}
    return {t.number: (t.state.name, t.values) for t in study.get_trials(deepcopy=False) if t.state.is_finished()}


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- scenarios


def scenario_workers(base_url: str, *, n_workers: int = 4, n_trials: int = 100, log: Any = print) -> dict[str, Any]:
    """n_workers share one study; one is SIGKILLed and one SIGINTed mid-trial; the rest finish it."""
    name, grace, heartbeat = "stress-workers", 4, 1
    with scratch_database(base_url) as url, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workers.toml"
        path.write_text(study_text(name, n_trials=n_trials, heartbeat=heartbeat, grace=grace))
        started = time.monotonic()
        procs = [worker(path, url) for _ in range(n_workers)]
        killed = mid_trial(url, name, procs[0])
        os.kill(procs[0].pid, signal.SIGKILL)
        log(f"  SIGKILL worker {procs[0].pid} during trial {killed}")
        interrupted = mid_trial(url, name, procs[1])
        os.kill(procs[1].pid, signal.SIGINT)
        log(f"  SIGINT worker {procs[1].pid} during trial {interrupted}")
        outs = [p.communicate(timeout=900) for p in procs]
        workers_s = time.monotonic() - started
        codes = [p.returncode for p in procs]
        log(f"  worker exit codes {codes} after {workers_s:.0f} s")
        before_final = audit(url, name, n_trials)
        # Everyone has exited; once the grace period has passed, opening the study fails whatever
        # is still RUNNING, and a rerun finishes the study.
        time.sleep(grace + heartbeat + 1)
        final = worker(path, url)
        final_out, final_err = final.communicate(timeout=900)
        result = audit(url, name, n_trials)
    return {
        "workers": n_workers, "n_trials": n_trials, "exit_codes": codes, "final_run_exit_code": final.returncode,
        "killed_trial": killed, "interrupted_trial": interrupted,
        "interrupt_line": _last_line(outs[1][1]),
        "tracebacks": sum("Traceback" in err for _, err in outs) + ("Traceback" in final_err),
        "left_after_workers": {k: before_final["states"].get(k, 0) for k in ("RUNNING", "WAITING")},
        "final_run_notices": [line for line in final_err.splitlines() if line.startswith("adabatch:")],
        "workers_seconds": round(workers_s, 1),
        **result,
    }


def scenario_outage(base_url: str, *, n_workers: int = 2, n_trials: int = 16, outage_s: float = 5.0,
                    give_up_s: int = 5, log: Any = print) -> dict[str, Any]:
    """Workers reach the database through a proxy that is cut and restored, then cut for good."""
    from sqlalchemy.engine import make_url

    grace, heartbeat = 20, 1
    target = make_url(base_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    out: dict[str, Any] = {}
    try:
        with scratch_database(base_url) as url, tempfile.TemporaryDirectory() as tmp:
            via = proxy.url_for(url)
            # 1. Cut for outage_s seconds while trials run: the workers wait and go on.
            name = "stress-outage"
            path = Path(tmp) / "outage.toml"
            path.write_text(study_text(name, n_trials=n_trials, heartbeat=heartbeat, grace=grace, db_retry=60))
            procs = [worker(path, via) for _ in range(n_workers)]
            wait_for(lambda: len(finished_trials(url, name)) >= 3, 300, "three finished trials")
            proxy.cut()
            log(f"  proxy cut for {outage_s:g} s with {len(finished_trials(url, name))} trials finished")
            time.sleep(outage_s)
            proxy.restore()
            outs = [p.communicate(timeout=900) for p in procs]
            waited = sum(err.count("unreachable while") for _, err in outs)
            came_back = sum(err.count("database back after") for _, err in outs)
            out["brief_outage"] = {
                "outage_seconds": outage_s, "exit_codes": [p.returncode for p in procs],
                "waits_reported": waited, "recoveries_reported": came_back,
                "tracebacks": sum("Traceback" in err for _, err in outs),
                **audit(url, name, n_trials),
            }
            log(f"  brief outage: exit codes {out['brief_outage']['exit_codes']}, {waited} waits reported")

            # 2. Cut for good: each worker gives up after give_up_s with one line and status 75.
            name = "stress-outage-down"
            path = Path(tmp) / "down.toml"
            path.write_text(study_text(name, n_trials=n_trials, heartbeat=heartbeat, grace=grace, db_retry=give_up_s))
            procs = [worker(path, via) for _ in range(n_workers)]
            wait_for(lambda: len(finished_trials(url, name)) >= 3, 300, "three finished trials")
            committed = finished_trials(url, name)
            proxy.cut()
            cut_at = time.monotonic()
            outs = [p.communicate(timeout=300) for p in procs]
            exit_s = time.monotonic() - cut_at
            after = finished_trials(url, name)  # read directly, not through the proxy
            kept = all(after.get(n) == v for n, v in committed.items())
            lines = [err.strip().splitlines() for _, err in outs]
            proxy.restore()
            time.sleep(grace + heartbeat + 1)
            final = worker(path, url)
            final_out, final_err = final.communicate(timeout=900)
            out["lasting_outage"] = {
                "give_up_after_seconds": give_up_s, "exit_codes": [p.returncode for p in procs],
                "seconds_to_exit": round(exit_s, 1),
                "last_lines": [ls[-1] if ls else "" for ls in lines],
                "error_lines": [sum(line.startswith("adabatch: error") for line in ls) for ls in lines],
                "tracebacks": sum("Traceback" in err for _, err in outs) + ("Traceback" in final_err),
                "committed_before_cut": len(committed), "committed_kept": kept,
                "final_run_exit_code": final.returncode,
                "final_run_notices": [line for line in final_err.splitlines() if line.startswith("adabatch:")],
                **audit(url, name, n_trials),
            }
            log(f"  lasting outage: exit codes {out['lasting_outage']['exit_codes']} after {exit_s:.1f} s")
    finally:
        proxy.stop()
    return out


def scenario_fuzz(examples: int, log: Any = print) -> dict[str, Any]:
    """The hypothesis tests of tests/test_fuzz.py with ``examples`` examples each; counts the cases run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", ADABATCH_FUZZ_EXAMPLES=str(examples),
                   ADABATCH_FUZZ_REPORT=str(report))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
                               "tests/test_fuzz.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        counts = json.loads(report.read_text()) if report.exists() else {}
    log(f"  fuzz: {sum(counts.values())} cases in {time.monotonic() - started:.0f} s, pytest exit {proc.returncode}")
    return {"examples_per_test": examples, "pytest_exit_code": proc.returncode, "cases": counts,
            "cases_total": sum(counts.values()), "pytest_summary": _last_line(proc.stdout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=PG_URL, help="a PostgreSQL URL on the server to use (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--n-trials", type=int, default=100)
    parser.add_argument("--fuzz-examples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    why = postgres_available(args.storage)
    if why is not None:
        print(f"stress: PostgreSQL needed: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results: dict[str, Any] = {}
    print(f"workers: {args.workers} x {args.n_trials // args.workers} trials, one SIGKILL, one SIGINT")
    results["workers"] = scenario_workers(args.storage, n_workers=args.workers, n_trials=args.n_trials)
    print("outage: database behind a proxy, cut and restored, then cut for good")
    results["outage"] = scenario_outage(args.storage)
    print("fuzz: tests/test_fuzz.py")
    results["fuzz"] = scenario_fuzz(args.fuzz_examples)
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(summary(results))
    print(f"written to {args.out}")
    return 0 if passed(results) else 1


def passed(results: dict[str, Any]) -> bool:
    """Whether every scenario kept every promise (see the module docstring)."""
    w, fuzz = results["workers"], results["fuzz"]
    brief, lasting = results["outage"]["brief_outage"], results["outage"]["lasting_outage"]
    whole = [w, brief, lasting]
    return (all(not r["lost"] and not r["duplicated"] and not r["traces_broken"] and not r["tracebacks"]
                and not r["over_n_trials"] and not r["missing_originals"]
                and not set(r["states"]) & {"RUNNING", "WAITING"} for r in whole)
            and sorted(w["exit_codes"]) == sorted([-signal.SIGKILL, 130] + [0] * (w["workers"] - 2))
            and w["final_run_exit_code"] == 0 and brief["exit_codes"] == [0] * len(brief["exit_codes"])
            and all(c == 75 for c in lasting["exit_codes"]) and lasting["committed_kept"]
            and all(n == 1 for n in lasting["error_lines"]) and fuzz["pytest_exit_code"] == 0)


def summary(results: dict[str, Any]) -> str:
    w, fuzz = results["workers"], results["fuzz"]
    brief, lasting = results["outage"]["brief_outage"], results["outage"]["lasting_outage"]

    def row(label: str, r: dict[str, Any]) -> str:
        return (f"{label:16s} {r['originals']:>5d} {r['trials_run']:>5d} {r['retries']:>7d} {len(r['lost']):>4d} "
                f"{len(r['duplicated']):>10d} {len(r['traces_broken']):>13d}  {r['states']}")

    lines = [
        "",
        f"{'scenario':16s} {'trials':>5s} {'runs':>5s} {'retried':>7s} {'lost':>4s} {'duplicated':>10s} "
        f"{'broken traces':>13s}  states",
        row("workers", w), row("brief outage", brief), row("lasting outage", lasting),
        "",
        f"workers: exit codes {w['exit_codes']} (SIGKILL, SIGINT, rest), final run {w['final_run_exit_code']}; "
        f"interrupted trial {w['interrupted_trial']}: {w['interrupt_line']!r}",
        f"brief outage ({brief['outage_seconds']:g} s): exit codes {brief['exit_codes']}, "
        f"{brief['waits_reported']} waits and {brief['recoveries_reported']} recoveries reported",
        f"lasting outage: exit codes {lasting['exit_codes']} {lasting['seconds_to_exit']} s after the cut "
        f"(retry budget {lasting['give_up_after_seconds']} s); {lasting['committed_before_cut']} trials committed "
        f"before the cut, kept: {lasting['committed_kept']}; last line {lasting['last_lines'][0]!r}",
        f"fuzz: {fuzz['cases_total']} cases ({', '.join(f'{k} {v}' for k, v in fuzz['cases'].items())}); "
        f"pytest exit {fuzz['pytest_exit_code']}",
        f"all promises kept: {passed(results)}; {results['seconds']:.0f} s in all",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
