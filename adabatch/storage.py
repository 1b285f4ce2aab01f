"""Where studies live: Optuna's RDB storage plus the per-step controller trace of every trial.

Any SQLAlchemy URL works. The default is a SQLite file ``adabatch.db`` in the working directory;
SQLite is opened in WAL mode with a busy timeout so several workers on one machine can share the
file. For workers on many machines use PostgreSQL (``postgresql+psycopg://user@host:5432/db``).

The trace is kept in the project's own table ``adabatch_trace`` in the same database, keyed by
study name and trial number, written in batched transactions while the trial runs. What was
committed survives a worker that dies; a retried trial writes under its new trial number.

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

import json
import math
import time
from dataclasses import asdict, is_dataclass
from typing import Any, Mapping

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

DEFAULT_STORAGE = "sqlite:///adabatch.db"
# Seconds a SQLite writer waits for another one to finish before giving up.
SQLITE_BUSY_TIMEOUT_S = 60.0
# Seconds before giving up on a database server that does not answer.
CONNECT_TIMEOUT_S = 10
TRACE_TABLE = "adabatch_trace"
FLOAT_COLUMNS = ("b_simple", "grad_sq", "trace_sigma", "lr", "loss", "seconds", "energy_j")
INT_COLUMNS = ("step", "samples", "batch", "micro_batches", "micro_batch_size")


class StorageError(RuntimeError):
    """The database URL is malformed, its driver is missing, or the server cannot be reached."""


def describe_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL is reported by whoever parses it next
        return url


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
        raise StorageError(f"cannot use storage {describe_url(url)!r}: {_first_line(exc)}. "
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
        raise StorageError(f"cannot reach database {describe_url(url)}: {_first_line(exc)}. "
                           "Check the URL, that the server is running and that this user may connect.") from None


def open_optuna_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                        max_retry: int | None = None) -> Any:
    """Optuna's ``RDBStorage`` on ``url``, with heartbeats and retry of trials whose worker died.

    With ``heartbeat_interval`` set, a running trial writes a heartbeat that often; a trial whose
    heartbeat is older than ``grace_period`` seconds is marked FAIL by the next worker that starts
    a trial, and ``RetryFailedTrialCallback`` enqueues one copy of it (up to ``max_retry`` times
    per original trial), which exactly one worker then runs under a new trial number.

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
            raise StorageError(f"cannot open Optuna storage at {describe_url(url)}: {_first_line(exc)}") from None
    raise StorageError(f"cannot create Optuna's tables at {describe_url(url)}: {_first_line(last)}")


def retry_callback(max_retry: int | None) -> Any:
    """Optuna's callback that re-enqueues a trial failed by a stale heartbeat (renamed in Optuna 4.9)."""
    from optuna import storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


def retried_trial_number(trial: Any) -> int | None:
    """The number of the failed trial that ``trial`` re-runs, or None for an original trial."""
    return trial.system_attrs.get("failed_trial")


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
        raise StorageError(f"{url!r} is not a database URL ({_first_line(exc)}); give a SQLAlchemy URL such as "
                           "sqlite:///adabatch.db or postgresql+psycopg://user@host:5432/db.") from None


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


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

    def __init__(self, url: str | Engine) -> None:
        self.engine = url if isinstance(url, Engine) else create_engine(url)
        self._ensure_table()

    def _ensure_table(self) -> None:
        # Two workers may create the table at once; the loser finds it on the second look.
        for attempt in range(3):
            try:
                _metadata.create_all(self.engine, checkfirst=True)
                return
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def writer(self, study_name: str, trial_number: int, flush_every: int = 200) -> "TraceWriter":
        """A callable that buffers records and commits them every ``flush_every`` records."""
        return TraceWriter(self, study_name, trial_number, flush_every)

    def write(self, study_name: str, trial_number: int, records: list[Mapping[str, Any]]) -> None:
        """Commit ``records`` (``StepRecord`` objects or their dicts) in one transaction."""
        if not records:
            return
        rows = [_row(study_name, trial_number, r) for r in records]
        with self.engine.begin() as conn:
            conn.execute(trace_table.insert(), rows)

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
