"""Database engine and sessions.

The same code runs on Postgres and on SQLite. SQLite gets WAL mode, a busy timeout and
`BEGIN IMMEDIATE` transactions, so that concurrent writers queue for the lock instead of failing
when a read transaction tries to become a write transaction.

On Postgres each process keeps a bounded pool (`AGENTQ_DB_POOL_SIZE` + `AGENTQ_DB_MAX_OVERFLOW`
connections, waiting at most `AGENTQ_DB_POOL_TIMEOUT_S` for a free one). Opening a connection is
retried briefly when the server refuses it (restarting, or "too many clients"), and
`retry_transient` runs a whole transaction again after an error that rolled it back (a deadlock,
a serialization failure, a dropped connection), but never after a COMMIT whose outcome is unknown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from core.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_read_factories: dict[str, sessionmaker[Session]] = {}
_WRITE_OPTION = "agentq_write"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Units of work that write take the lock up front; readers never block anyone (WAL).
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# About 3.5 seconds of tries in all (0.1 s, doubling, up to 2 s apart).
CONNECT_ATTEMPTS = 6
_CONNECT_GAVE_UP = "agentq_connect_gave_up"


def _retry_connect(engine: Engine) -> None:
    """A refused connection (the server restarting, or at max_connections) is tried again a
    few times, so that a short spike costs a brief wait instead of a failed unit of work. A
    refusal that outlasts the tries is marked, and `retry_transient` does not wait for it
    again."""
    def _log(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("database connection refused (attempt %d): %s", state.attempt_number,
                    str(exc).strip().splitlines()[0] if exc else "")

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Dialect, _record: Any, cargs: tuple[Any, ...],
                 cparams: dict[str, Any]) -> Any:
        refused = dialect.loaded_dbapi.OperationalError
        retrying = Retrying(retry=retry_if_exception(lambda e: isinstance(e, refused)),
                            stop=stop_after_attempt(CONNECT_ATTEMPTS),
                            wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
                            before_sleep=_log, reraise=True)
        try:
            return retrying(dialect.connect, *cargs, **cparams)
        except refused as exc:
            setattr(exc, _CONNECT_GAVE_UP, True)
            raise


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=20,
            max_overflow=80,
        )
        _configure_sqlite(engine)
        return engine
    settings = get_settings()
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["application_name"] = settings.db_application_name
    engine = create_engine(url, pool_size=settings.db_pool_size,
                           max_overflow=settings.db_max_overflow,
                           pool_timeout=settings.db_pool_timeout_s, pool_pre_ping=True,
                           connect_args=connect_args)
    _retry_connect(engine)
    return engine


def pool_capacity(url: str | None = None) -> int | None:
    """The most connections this process opens to the database at once; None for SQLite
    (its pool is sized for lock waits, not for a server's connection limit)."""
    url = url or get_settings().database_url
    if make_url(url).get_backend_name() == "sqlite":
        return None
    settings = get_settings()
    return settings.db_pool_size + settings.db_max_overflow


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            _engines[url] = engine
            writer = engine.execution_options(**{_WRITE_OPTION: True})
            _factories[url] = sessionmaker(bind=writer, expire_on_commit=False)
            _read_factories[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return engine


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """Sessions for units of work that write (on SQLite they take the write lock at BEGIN)."""
    url = url or get_settings().database_url
    get_engine(url)
    return _factories[url]


def read_session_factory(url: str | None = None) -> sessionmaker[Session]:
    """Sessions for reads; on SQLite they never wait for the write lock."""
    url = url or get_settings().database_url
    get_engine(url)
    return _read_factories[url]


_OUTCOME_UNKNOWN = "agentq_commit_outcome_unknown"


def commit(session: Session) -> None:
    """Flush, then COMMIT. A COMMIT that fails without the server saying the transaction was
    rolled back (the connection dropped) may have been applied: the error is marked so that
    `retry_transient` never runs that transaction a second time."""
    session.flush()
    try:
        session.commit()
    except DBAPIError as exc:
        if not _rolled_back(exc):
            setattr(exc, _OUTCOME_UNKNOWN, True)
        raise


# Serialization failure and deadlock: the server rolled the transaction back.
_ROLLED_BACK_STATES = frozenset({"40001", "40P01"})


def _rolled_back(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _ROLLED_BACK_STATES


def is_transient(exc: BaseException) -> bool:
    """Whether the failed transaction may simply be run again: a connection lost, a deadlock,
    a serialization failure, a lock wait that timed out; never a COMMIT whose outcome is
    unknown, a pool that had no free connection in time, nor a refused connection that was
    already tried again for seconds when it was opened."""
    if not isinstance(exc, DBAPIError) or getattr(exc, _OUTCOME_UNKNOWN, False) \
            or getattr(exc.orig, _CONNECT_GAVE_UP, False):
        return False
    return exc.connection_invalidated or isinstance(exc, OperationalError)


TRANSACTION_ATTEMPTS = 3


def retry_transient(fn: Callable[[], T], *, attempts: int = TRANSACTION_ATTEMPTS) -> T:
    """Run `fn`, a whole unit of work (or several, each safe to repeat), again after a
    transient database error, with jittered exponential backoff."""
    def _log(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("transient database error (attempt %d of %d), retrying: %s",
                    state.attempt_number, attempts,
                    str(exc).strip().splitlines()[0] if exc else "")

    retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(attempts),
                        wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
                        before_sleep=_log,
                        reraise=True)
    return retrying(fn)


@contextmanager
def session_scope(*, read_only: bool = False) -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on error. Only outer boundaries use it.
    `read_only`: a session that never takes SQLite's write lock (for reads)."""
    session = (read_session_factory() if read_only else session_factory())()
    try:
        yield session
        commit(session)
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()
        _read_factories.clear()
