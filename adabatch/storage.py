"""Where studies live: Optuna's RDB storage plus the per-step controller trace of every trial.

Any SQLAlchemy URL works. The default is a SQLite file ``adabatch.db`` in the working directory;
SQLite is opened in WAL mode with a busy timeout so several workers on one machine can share the
file. For workers on many machines use PostgreSQL (``postgresql+psycopg://user@host:5432/db``).

The trace is kept in the project's own table ``adabatch_trace`` in the same database, keyed by
study name and trial number, written in batched transactions while the trial runs. What was
committed survives a worker that dies; a retried trial writes under its new trial number.

A database that goes away mid-study is waited for: :class:`DatabaseRetry` runs each operation
again with exponential back-off for a bounded time, then raises :class:`DatabaseUnavailable`.
Messages never show a password (:func:`describe_url`, :func:`redact`).

Example:
    >>> import tempfile, os
    >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "s.db")
    >>> traces = TraceStore(url)
    >>> with traces.writer("demo", 0) as w:
    ...     w(dict(step=0, samples=8, batch=8, lr=0.1, loss=1.0, metrics={"accuracy": 0.5}))
    >>> traces.read("demo", 0)[0]["metrics"]
    {'accuracy': 0.5}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

DEFAULT_STORAGE = "sqlite:///adabatch.db"
# Seconds a SQLite writer waits for another one to finish before giving up.
SQLITE_BUSY_TIMEOUT_S = 60.0
# Seconds before giving up on a database server that does not answer.
CONNECT_TIMEOUT_S = 10
# Default seconds a worker keeps retrying a database that went away before it gives up.
DB_RETRY_S = 60
# Passwords shorter than this are not scrubbed from output: replacing every "a" would garble it.
MIN_SECRET_LEN = 3
TRACE_TABLE = "adabatch_trace"
FLOAT_COLUMNS = ("b_simple", "grad_sq", "trace_sigma", "lr", "loss", "seconds", "energy_j", "noise_low", "noise_high")
# Columns added after the first release: a trace table created before them gets them on open.
ADDED_FLOAT_COLUMNS = ("noise_low", "noise_high")
INT_COLUMNS = ("step", "samples", "batch", "micro_batches", "micro_batch_size")


T = TypeVar("T")


class StorageError(RuntimeError):
    """The database URL is malformed, its driver is missing, or the server cannot be reached."""


class DatabaseUnavailable(StorageError):
    """The database stayed unreachable for longer than the worker was told to wait."""


def describe_url(url: str) -> str:
    """The URL with any password hidden, for messages.

    Example:
        >>> describe_url("postgresql+psycopg://me:s3cret@db:5432/studies")
        'postgresql+psycopg://me:***@db:5432/studies'
    """
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL is reported by whoever parses it next; it has no parsable password
        return redact(url, url)


def url_secrets(url: str) -> list[str]:
    """The password in ``url`` as it may be printed: raw and URL-quoted (empty when there is none).

    Example:
        >>> url_secrets("postgresql://me:p%40ss@db/x"), url_secrets("sqlite:///adabatch.db")
        (['p%40ss', 'p@ss'], [])
    """
    try:
        password = make_url(url).password
    except Exception:
        password = _raw_password(url)
    if not password or len(str(password)) < MIN_SECRET_LEN:
        return []
    password = str(password)
    return sorted({password, quote(password, safe=""), quote_plus(password)}, key=len, reverse=True)


def _raw_password(url: str) -> str | None:
    # user:password@ in a string that SQLAlchemy cannot parse
    head = url.partition("://")[2].rpartition("@")[0]
    return head.partition(":")[2] or None if ":" in head else None


def redact(text: str, *urls: str) -> str:
    """``text`` with the password of every URL in ``urls`` replaced by ``***``.

    Example:
        >>> redact("cannot log in as me:s3cret", "postgresql://me:s3cret@db/x")
        'cannot log in as me:***'
    """
    for url in urls:
        for secret in url_secrets(url):
            text = text.replace(secret, "***")
    return text


def is_memory_sqlite(url: str) -> bool:
    """True for an in-memory SQLite URL (``sqlite://``, ``sqlite:///``, ``:memory:``), which no other process sees.

    Example:
        >>> is_memory_sqlite("sqlite:///"), is_memory_sqlite("sqlite:///adabatch.db")
        (True, False)
    """
    try:
        parsed = make_url(url)
    except Exception:
        return False
    if parsed.get_backend_name() != "sqlite":
        return False
    db = parsed.database or ""
    return db in ("", ":memory:") or "mode=memory" in url


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) means the database connection failed, not the request.

    Connection refused or dropped, server restarting, SQLite busy: worth retrying. A constraint
    violation or a missing table is not.

    Example:
        >>> import sqlalchemy as sa
        >>> is_transient(sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError()))
        True
        >>> is_transient(ValueError("bad value"))
        False
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError,
                            sa.exc.TimeoutError, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        kind = type(exc)
        if kind.__name__ in ("OperationalError", "InterfaceError") and kind.__module__.startswith(("psycopg", "sqlite3")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class DatabaseRetry:
    """Runs a database operation again, with exponential back-off, while the database is unreachable.

    Only transient failures (:func:`is_transient`) are retried, for at most ``seconds`` from the
    first failure of one operation; then :class:`DatabaseUnavailable` says what was being done.
    ``notify`` hears one line when an outage starts and one when it ends; ``check`` runs between
    attempts (e.g. to honour an interrupt while waiting).

    Example:
        >>> import sqlalchemy as sa
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError())
        ...     return "ok"
        >>> retry = DatabaseRetry(5, first_delay=0.01)
        >>> retry(flaky, "reading"), retry.retries
        ('ok', 2)
    """

    def __init__(self, seconds: float = DB_RETRY_S, *, url: str = "", notify: Callable[[str], None] | None = None,
                 check: Callable[[], None] | None = None, first_delay: float = 0.25, max_delay: float = 8.0) -> None:
        self.seconds, self.url, self.notify, self.check = float(seconds), url, notify, check
        self.first_delay, self.max_delay = first_delay, max_delay
        self.retries = 0  # failed attempts that were tried again
        self.outages = 0  # operations that needed at least one retry

    def __call__(self, fn: Callable[[], T], what: str) -> T:
        started: float | None = None
        delay = self.first_delay
        while True:
            try:
                result = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if started is None:
                    started = now
                    self.outages += 1
                    self._say(f"database {describe_url(self.url)} unreachable while {what} ({_first_line(exc)}); "
                              f"retrying for up to {self.seconds:g} s")
                left = self.seconds - (now - started)
                if left <= 0:
                    raise DatabaseUnavailable(
                        f"the database {describe_url(self.url)} stayed unreachable for {self.seconds:g} s while "
                        f"{what} ({_first_line(exc)}); what was committed is kept: run the same command again "
                        "once the database is back") from None
                self.retries += 1
                self._sleep(min(delay, left))
                delay = min(delay * 2, self.max_delay)
                continue
            if started is not None:
                self._say(f"database back after {time.monotonic() - started:.1f} s; continuing")
            return result

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            if self.check is not None:
                self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    def _say(self, line: str) -> None:
        if self.notify is not None:
            self.notify(redact(line, self.url))


def engine_kwargs(url: str) -> dict[str, Any]:
    """``create_engine`` arguments that make ``url`` safe for several concurrent workers.

    SQLite: ``timeout`` is the driver's busy timeout, so a writer waits for the lock instead of
    failing with "database is locked". Servers: a connect timeout, and ``pool_pre_ping`` so a
    connection the server dropped between trials is replaced rather than failing the next query.
    """
    backend = _parse(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def create_engine(url: str) -> Engine:
    """An engine for ``url`` that has been checked to connect; raises :class:`StorageError`.

    SQLite connections switch the file to WAL (readers never block the writer; the mode persists
    in the file, so Optuna's own engine gets it too) and set the busy timeout.

    Example:
        >>> create_engine("sqlite://").dialect.name
        'sqlite'
    """
    try:
        engine = sa.create_engine(url, **engine_kwargs(url))
    except StorageError:
        raise
    except Exception as exc:  # ArgumentError, NoSuchModuleError, missing driver (ImportError)
        raise StorageError(f"cannot use storage {describe_url(url)!r}: {redact(_first_line(exc), url)}. "
                           "Give a SQLAlchemy URL such as sqlite:///adabatch.db or "
                           "postgresql+psycopg://user@host:5432/db (pip install 'adabatch[postgres]').") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    check_connection(engine, url)
    return engine


def check_connection(engine: Engine, url: str) -> None:
    """Open and close one connection; an unreachable database becomes one :class:`StorageError` line."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        raise StorageError(f"cannot reach database {describe_url(url)}: {redact(_first_line(exc), url)}. "
                           "Check the URL, that the server is running and that this user may connect.") from None


def open_optuna_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                        max_retry: int | None = None) -> Any:
    """Optuna's ``RDBStorage`` on ``url``, with heartbeats and retry of trials whose worker died.

    With ``heartbeat_interval`` set, a running trial writes a heartbeat that often; a trial whose
    heartbeat is older than ``grace_period`` seconds is marked FAIL by :func:`fail_stale_trials`
    (which every command that opens a study runs), and Optuna's retry callback enqueues one copy
    of it (up to ``max_retry`` times per original trial), which exactly one worker then runs under
    a new trial number.

    Example:
        >>> s = open_optuna_storage("sqlite://")
        >>> type(s).__name__
        'RDBStorage'
    """
    import warnings

    import optuna

    create_engine(url).dispose()  # fail with one clear line first; also puts SQLite into WAL
    with warnings.catch_warnings():
        # Heartbeats have been "experimental" in Optuna since 2.x; the warning says nothing a user can act on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _open_rdb(url, heartbeat_interval, grace_period, max_retry)


def _open_rdb(url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None) -> Any:
    import optuna
    from optuna.storages import RDBStorage

    callback = retry_callback(max_retry) if heartbeat_interval else None
    last: Exception | None = None
    # Workers starting together on an empty server can race to create Optuna's tables; the loser
    # sees a duplicate-object error and simply finds the tables on its next try.
    for attempt in range(3):
        try:
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(url), heartbeat_interval=heartbeat_interval,
                                 grace_period=grace_period, heartbeat_stale_trial_callback=callback)
            if storage.engine.dialect.name == "sqlite":
                event.listen(storage.engine, "connect", _sqlite_pragmas)
            return storage
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
            last = exc
            time.sleep(0.5 * (attempt + 1))
        except optuna.exceptions.StorageInternalError as exc:
            raise StorageError(f"cannot open Optuna storage at {describe_url(url)}: {redact(_first_line(exc), url)}") from None
    raise StorageError(f"cannot create Optuna's tables at {describe_url(url)}: {redact(_first_line(last), url)}")


def retry_callback(max_retry: int | None) -> Any:
    """Optuna's callback that re-enqueues a trial failed by a stale heartbeat (renamed in Optuna 4.9)."""
    from optuna import storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


def retried_trial_number(trial: Any) -> int | None:
    """The number of the failed trial that ``trial`` re-runs, or None for an original trial."""
    return trial.system_attrs.get("failed_trial")


def fail_stale_trials(study: Any, rdb: Any) -> list[int]:
    """Mark FAIL, and enqueue for retry, every RUNNING trial whose worker is gone; returns their numbers.

    Gone means no heartbeat for ``grace_period`` seconds (Optuna's own check), or no heartbeat at
    all and started more than ``grace_period + heartbeat_interval`` seconds ago: a worker that died
    between claiming a trial and its first heartbeat, which Optuna's check never looks at. Needs
    ``rdb`` opened with a heartbeat interval; without one nothing is ever stale.
    """
    import datetime
    import warnings

    import optuna
    from optuna.trial import TrialState

    interval = rdb.get_heartbeat_interval()
    if interval is None:
        return []
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not before:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    grace = rdb.grace_period or 2 * interval
    now = datetime.datetime.now()
    old = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace + interval]
    if old:
        study_id = rdb.get_study_id_from_name(study.study_name)
        ids = [rdb.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in old]
        query = sa.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
            sa.bindparam("ids", expanding=True))
        with rdb.engine.connect() as conn:
            beating = {int(row[0]) for row in conn.execute(query, {"ids": ids})}
        callback = rdb.get_heartbeat_stale_trial_callback()
        for trial_id in ids:
            if trial_id in beating:
                continue
            try:
                if rdb.set_trial_state_values(trial_id, state=TrialState.FAIL) and callback is not None:
                    callback(study, rdb.get_trial(trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker finished or failed it first
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before)


class Heartbeat:
    """Keeps one RUNNING trial's heartbeat fresh from a daemon thread while the trial runs.

    The first beat is written before :meth:`start` returns (through ``retry``), so a trial is
    RUNNING without a heartbeat for one round trip at most. Later beats that fail (the database
    is away) are counted, not raised: the trial goes on, and only after ``grace_period`` without a
    beat may another worker fail it.

    Example:
        >>> import optuna
        >>> rdb = open_optuna_storage("sqlite://")
        >>> study = optuna.create_study(storage=rdb)
        >>> trial = study.ask()
        >>> with Heartbeat(rdb, trial._trial_id, 60) as beat:
        ...     pass
        >>> beat.beats, beat.failures
        (1, 0)
    """

    def __init__(self, rdb: Any, trial_id: int, interval: float,
                 retry: Callable[[Callable[[], Any], str], Any] | None = None) -> None:
        self.rdb, self.trial_id, self.interval = rdb, trial_id, float(interval)
        self.retry = retry or (lambda fn, what: fn())
        self.beats = self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        self.retry(lambda: self.rdb.record_heartbeat(self.trial_id), "writing a heartbeat")
        self.beats += 1
        self._thread = threading.Thread(target=self._run, name=f"adabatch-heartbeat-{self.trial_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.rdb.record_heartbeat(self.trial_id)
                self.beats += 1
            except Exception:  # the database is away; the trial's worker decides what that means
                self.failures += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT_S + 5)

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def study_lock(engine: Engine, study_name: str) -> Iterator[None]:
    """Held by one worker of ``study_name`` at a time, while it decides whether to claim a trial.

    PostgreSQL: a session advisory lock, which the server releases if the worker dies. A SQLite
    file: an ``flock`` on the database's folder (all workers are on one machine). Other databases:
    no lock, so two workers may claim the study's last trial together and it ends one over.

    Example:
        >>> with study_lock(create_engine("sqlite://"), "s"):
        ...     pass
    """
    if engine.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"adabatch:{study_name}".encode()).digest()[:8], "big", signed=True)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
                except Exception:
                    # A pooled connection must never keep the lock; a dropped one has lost it already.
                    conn.invalidate()
        return
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        fcntl = None  # type: ignore[assignment]
    if not path or path == ":memory:" or fcntl is None:
        yield
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cur.close()


def _parse(url: str) -> sa.engine.URL:
    try:
        return make_url(url)
    except Exception as exc:
        raise StorageError(f"{redact(url, url)!r} is not a database URL ({redact(_first_line(exc), url)}); give a "
                           "SQLAlchemy URL such as "
                           "sqlite:///adabatch.db or postgresql+psycopg://user@host:5432/db.") from None


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    inner = _cause(exc)
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


def _cause(exc: BaseException) -> BaseException:
    # The driver's own error says what happened; SQLAlchemy (.orig) and Optuna (a generic
    # "exception during the commit", raised from the real one) wrap it.
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        orig = getattr(exc, "orig", None)
        if orig is not None:
            return orig
        nested = exc.__cause__ or exc.__context__
        if nested is None:
            return exc
        exc = nested
    return exc


# ----------------------------------------------------------------------------- trace

_metadata = sa.MetaData()
trace_table = sa.Table(
    TRACE_TABLE, _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_name", sa.String(512), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=False),
    *(sa.Column(name, sa.BigInteger) for name in INT_COLUMNS),
    *(sa.Column(name, sa.Float) for name in FLOAT_COLUMNS),
    sa.Column("measured", sa.Boolean),
    sa.Column("energy_source", sa.String(128)),
    sa.Column("metrics", sa.Text),  # JSON object, e.g. {"accuracy": 0.91}
    sa.UniqueConstraint("study_name", "trial_number", "step", name="uq_adabatch_trace_step"),
)


class TraceStore:
    """Reads and writes the per-step controller trace of trials, in the study's own database.

    Example:
        >>> store = TraceStore("sqlite://")
        >>> with store.writer("s", 3) as write:
        ...     write(dict(step=0, samples=32, batch=32, lr=0.1, loss=2.0))
        >>> [r["samples"] for r in store.read("s", 3)]
        [32]
    """

    def __init__(self, url: str | Engine, retry: Callable[[Callable[[], Any], str], Any] | None = None) -> None:
        self.engine = url if isinstance(url, Engine) else create_engine(url)
        # Writes go through ``retry`` (e.g. a DatabaseRetry) so a database outage is waited for.
        self.retry = retry or (lambda fn, what: fn())
        self._ensure_table()

    def _ensure_table(self) -> None:
        # Two workers may create the table at once; the loser finds it on the second look.
        for attempt in range(3):
            try:
                _metadata.create_all(self.engine, checkfirst=True)
                self._add_missing_columns()
                return
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def _add_missing_columns(self) -> None:
        """Bring a trace table of an earlier version up to date (nullable columns only, so old rows stay valid)."""
        have = {c["name"] for c in sa.inspect(self.engine).get_columns(TRACE_TABLE)}
        missing = [name for name in ADDED_FLOAT_COLUMNS if name not in have]
        if missing:
            with self.engine.begin() as conn:
                for name in missing:
                    kind = "DOUBLE PRECISION" if self.engine.dialect.name == "postgresql" else "FLOAT"
                    conn.execute(sa.text(f"ALTER TABLE {TRACE_TABLE} ADD COLUMN {name} {kind}"))

    def writer(self, study_name: str, trial_number: int, flush_every: int = 200) -> "TraceWriter":
        """A callable that buffers records and commits them every ``flush_every`` records."""
        return TraceWriter(self, study_name, trial_number, flush_every)

    def write(self, study_name: str, trial_number: int, records: list[Mapping[str, Any]]) -> None:
        """Commit ``records`` (``StepRecord`` objects or their dicts) in one transaction.

        A batch is written whole or not at all. Steps already stored are skipped, so a batch sent
        again after a lost acknowledgement is not written twice.
        """
        if not records:
            return
        rows = [_row(study_name, trial_number, r) for r in records]
        statement = _insert_skipping_duplicates(self.engine)

        def commit() -> None:
            with self.engine.begin() as conn:
                conn.execute(statement, rows)

        self.retry(commit, f"writing the trace of trial {trial_number}")

    def read(self, study_name: str, trial_number: int) -> list[dict[str, Any]]:
        """The trial's records in step order, as ``StepRecord.to_dict()``-shaped dicts."""
        q = (sa.select(trace_table).where(trace_table.c.study_name == study_name,
                                          trace_table.c.trial_number == trial_number)
             .order_by(trace_table.c.step))
        with self.engine.connect() as conn:
            return [_record(row._mapping) for row in conn.execute(q)]

    def trial_numbers(self, study_name: str) -> list[int]:
        """Trials of the study that have any trace."""
        q = (sa.select(trace_table.c.trial_number).where(trace_table.c.study_name == study_name)
             .distinct().order_by(trace_table.c.trial_number))
        with self.engine.connect() as conn:
            return [int(n) for (n,) in conn.execute(q)]

    def delete(self, study_name: str) -> int:
        """Remove the study's trace; returns how many records were deleted."""
        with self.engine.begin() as conn:
            return conn.execute(trace_table.delete().where(trace_table.c.study_name == study_name)).rowcount

    def close(self) -> None:
        self.engine.dispose()


class TraceWriter:
    """Buffers one trial's records and commits them in batches; use as a telemetry callback.

    The newest record is held back at periodic flushes because the controller may still attach
    evaluation metrics to it; :meth:`flush_all` (called at eval points and on close) writes
    everything.
    """

    def __init__(self, store: TraceStore, study_name: str, trial_number: int, flush_every: int = 200) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every={flush_every!r} is invalid: accepted an integer >= 1.")
        self.store, self.study_name, self.trial_number = store, study_name, trial_number
        self.flush_every = flush_every
        self.written = 0
        self._buffer: list[Any] = []

    def __call__(self, record: Any) -> None:
        self._buffer.append(record)
        if len(self._buffer) > self.flush_every:
            self._flush(len(self._buffer) - 1)

    def flush_all(self) -> None:
        self._flush(len(self._buffer))

    def _flush(self, n: int) -> None:
        batch, self._buffer = self._buffer[:n], self._buffer[n:]
        self.store.write(self.study_name, self.trial_number, batch)
        self.written += len(batch)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush_all()


def _insert_skipping_duplicates(engine: Engine) -> Any:
    name = engine.dialect.name
    if name in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = postgresql if name == "postgresql" else sqlite
        return dialect.insert(trace_table).on_conflict_do_nothing(
            index_elements=["study_name", "trial_number", "step"])
    return trace_table.insert()


def _row(study_name: str, trial_number: int, record: Any) -> dict[str, Any]:
    r = asdict(record) if is_dataclass(record) else dict(record)
    row: dict[str, Any] = {"study_name": study_name, "trial_number": trial_number}
    for name in INT_COLUMNS:
        row[name] = None if r.get(name) is None else int(r[name])
    for name in FLOAT_COLUMNS:
        v = r.get(name)
        # NaN (no estimate yet) is stored as NULL, since SQLite cannot hold NaN; +-inf both can.
        row[name] = None if v is None or math.isnan(float(v)) else float(v)
    row["measured"] = None if r.get("measured") is None else bool(r["measured"])
    row["energy_source"] = r.get("energy_source")
    row["metrics"] = json.dumps({k: float(v) for k, v in (r.get("metrics") or {}).items()})
    return row


def _record(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: row[name] for name in INT_COLUMNS}
    for name in FLOAT_COLUMNS:
        v = row[name]
        out[name] = (None if name == "energy_j" else math.nan) if v is None else float(v)
    out["measured"] = row["measured"]
    out["energy_source"] = row["energy_source"]
    out["metrics"] = json.loads(row["metrics"] or "{}")
    return out
