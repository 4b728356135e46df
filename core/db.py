"""Database engine, sessions and the one transaction primitive.

The same code runs on Postgres and on SQLite. SQLite gets WAL mode, a busy timeout and
`BEGIN IMMEDIATE` transactions, so that concurrent writers queue for the lock instead of failing
when a read transaction tries to become a write transaction.

On Postgres each process keeps a bounded pool (`AGENTQ_DB_POOL_SIZE` + `AGENTQ_DB_MAX_OVERFLOW`
connections, waiting at most `AGENTQ_DB_POOL_TIMEOUT_S` for a free one); see `core.db_errors`
for what is retried.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypeVar

from psycopg.abc import Buffer
from psycopg.types.string import StrBinaryDumper, StrDumperUnknown
from sqlalchemy import (
    DateTime,
    Engine,
    Float,
    any_,
    bindparam,
    create_engine,
    event,
    exc,
    func,
    literal_column,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.base import Executable

from core.db_errors import commit, retry_connect
from core.direct import Direct, Rows
from core.settings import get_settings

log = logging.getLogger(__name__)
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


# Postgres stores no NUL character, in text or in JSON; a value that held one (a command's
# output, a model's answer, a receiver's response) would fail its write every time it is tried.
# Such values are stored with U+FFFD in its place, as undecodable bytes are.
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def storable_json(value: Any) -> str:
    """JSON text of `value`, every NUL in its strings replaced by U+FFFD."""
    return _NUL_ESCAPE.sub(r"\1\\ufffd", json.dumps(value))


class _TextDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(obj.replace("\0", "\ufffd") if "\0" in obj else obj)


class _BinaryTextDumper(StrBinaryDumper):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(obj.replace("\0", "\ufffd") if "\0" in obj else obj)


def _replace_nul_in_text(dbapi_conn: Any, _record: Any) -> None:
    # The text one last: it stays the default (type unknown, inferred by the server).
    dbapi_conn.adapters.register_dumper(str, _BinaryTextDumper)
    dbapi_conn.adapters.register_dumper(str, _TextDumper)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            json_serializer=storable_json,
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
                           pool_timeout=settings.db_pool_timeout_s,
                           connect_args=connect_args, json_serializer=storable_json)
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _replace_nul_in_text)
    _ping_when_idle(engine, settings.db_ping_idle_s)
    retry_connect(engine)
    return engine


_IDLE_SINCE = "agentq_idle_since"


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Check a pooled connection before use only when it has been idle for `idle_s` (a server
    restart or an idle timeout may have closed it meanwhile): a connection in steady use is
    handed out without the extra round trip that `pool_pre_ping` costs every checkout."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as error:  # noqa: BLE001 - the pool replaces the connection
            raise exc.DisconnectionError(f"pooled connection failed its check: {error}") \
                from error


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


AFTER_COMMIT = "agentq.after_commit"


def after_commit(session: Session, key: str, action: Callable[[], None]) -> None:
    """Run `action` once the transaction of `session` has committed (never if it rolls back).
    One action per `key` and transaction: repositories register their publisher once and add
    to what it publishes."""
    actions: dict[str, Callable[[], None]] = session.info.setdefault(AFTER_COMMIT, {})
    actions.setdefault(key, action)


def on_rollback(session: Session, key: str, action: Callable[[], None]) -> None:
    """Run `action` if the transaction of `session` rolls back (give back what it took)."""
    actions: dict[str, Callable[[], None]] = session.info.setdefault(ON_ROLLBACK, {})
    actions.setdefault(key, action)


ON_ROLLBACK = "agentq.on_rollback"
BEFORE_COMMIT = "agentq.before_commit"


def before_commit(session: Session, key: str, action: Callable[[], None]) -> None:
    """Run `action` in the transaction of `session`, after the rest of its work and just before
    it commits: for writes to rows that many transactions update (running totals), so that
    their locks are always taken last and held briefly. One action per `key` and transaction."""
    actions: dict[str, Callable[[], None]] = session.info.setdefault(BEFORE_COMMIT, {})
    actions.setdefault(key, action)


def pending(session: Session, key: str) -> list[Any]:
    """A list kept with the transaction under `key` (what its after-commit action sends)."""
    lists: dict[str, list[Any]] = session.info.setdefault(AFTER_COMMIT + ".lists", {})
    return lists.setdefault(key, [])


@contextmanager
def transaction(*, read_only: bool = False) -> Iterator[Session]:
    """The unit of work, and the only one: commits on success, rolls back on error. Opened at
    the edges (an endpoint, a task), never inside services or repositories. What the
    transaction wrote to publish (outbox messages, event notifications) is published after
    commit. `read_only`: never takes SQLite's write lock."""
    session = (read_session_factory() if read_only else session_factory())()
    try:
        yield session
        last: dict[str, Callable[[], None]] = session.info.pop(BEFORE_COMMIT, {})
        for write in last.values():
            write()
        commit(session)
    except BaseException:
        undo: dict[str, Callable[[], None]] = session.info.pop(ON_ROLLBACK, {})
        try:
            session.rollback()
        finally:
            session.info.clear()
            session.close()
            for action in undo.values():
                action()
        raise
    actions: dict[str, Callable[[], None]] = session.info.pop(AFTER_COMMIT, {})
    session.close()
    for action in actions.values():
        try:
            action()
        except Exception:  # noqa: BLE001 - committed work is safe; sweepers cover the rest
            log.exception("an after-commit action failed")


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def one_of(session: Session, column: Any, values: Sequence[Any]) -> Any:
    """`column IN values`, as `= ANY(array)` on Postgres: one bound parameter, so the statement
    is not re-rendered for each length of the list."""
    if is_postgres(session):
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(list(values))


def db_now(session: Session, plus_s: float = 0.0) -> Any:
    """Now (plus `plus_s` seconds) on the database's clock, for leases and expiry: hosts'
    clocks may differ, the database's is the one every process shares. SQLite is embedded, so
    its host's clock is the database's."""
    if is_postgres(session):
        now = func.now()  # the transaction's start: the same for every statement in it
        return now + literal_column(f"interval '{float(plus_s)} seconds'") if plus_s else now
    from core.models import utcnow

    return utcnow() + timedelta(seconds=plus_s)


E = TypeVar("E")
AnyResult: TypeAlias = "CursorResult[*tuple[Any, ...]]"


_UNPLANNED: Any = object()


class Prebuilt(Generic[E]):
    """A statement of the step path, built once per kind of database (`build(postgres)`) and
    run with bound parameters: `session.execute(STMT(session), {...})`. Building a SQLAlchemy
    statement costs more than running it from the compiled cache (a fan-in's update: 1.3 ms
    of CPU built each time, 0.4 ms prebuilt), and a step runs a dozen of them. Parameters are
    named `p_...` (an update's own column names are reserved); extra ones are ignored."""

    def __init__(self, build: Callable[[bool], E]) -> None:
        self._build = build
        self._built: dict[bool, E] = {}
        self._direct: dict[bool, Direct | None] = {}

    def __call__(self, session: Session) -> E:
        postgres = is_postgres(session)
        found = self._built.get(postgres)
        if found is None:
            found = self._built[postgres] = self._build(postgres)
        return found

    def execute(self, session: Session, params: Mapping[str, Any]) -> AnyResult | Rows:
        """Run the statement in the transaction of `session`: on Postgres straight on the
        driver (`core.direct`), elsewhere through SQLAlchemy (`core_execute`)."""
        conn = session.connection()
        postgres = conn.dialect.name == "postgresql"
        direct = self._direct.get(postgres, _UNPLANNED)
        if direct is _UNPLANNED:
            direct = self._direct[postgres] = Direct.plan(self(session), conn)  # type: ignore[arg-type]
        if direct is None:
            return core_execute(session, self(session), params)  # type: ignore[arg-type]
        return direct.execute(conn, params)


class PrebuiltInsert:
    """An insert (or upsert) into one table whose columns are the rows' keys, built once per
    kind of database (`build(postgres)`): `STMT.execute(session, rows)`. On Postgres the rows
    go straight to the driver in one pipelined `executemany` (one plan per set of keys, see
    `core.direct`); elsewhere through SQLAlchemy (`core_execute`)."""

    def __init__(self, build: Callable[[bool], Executable]) -> None:
        self._build = build
        self._built: dict[bool, Executable] = {}
        self._direct: dict[tuple[str, ...], Direct | None] = {}

    def execute(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        conn = session.connection()
        postgres = conn.dialect.name == "postgresql"
        statement = self._built.get(postgres)
        if statement is None:
            statement = self._built[postgres] = self._build(postgres)
        if not postgres:
            core_execute(session, statement, list(rows))
            return
        by_keys: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:
            by_keys.setdefault(tuple(row), []).append(row)
        for keys, group in by_keys.items():
            direct = self._direct.get(keys, _UNPLANNED)
            if direct is _UNPLANNED:
                direct = self._direct[keys] = Direct.plan(statement, conn, keys)
            if direct is None:
                core_execute(session, statement, group)
            else:
                direct.execute_many(conn, group)


def core_execute(session: Session, statement: Executable,
                 params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> AnyResult:
    """Run a Core statement (of tables, not mapped classes) on the connection of the session's
    transaction. The session's own `execute` would find no ORM entity in it and do the same,
    after work of its own that costs about a tenth of a step's CPU on the step path."""
    return session.connection().execute(statement, params)


def now_param(postgres: bool, plus: str | None = None) -> Any:
    """Now, in a prebuilt statement, on the database's clock (see `db_now`): `now()` on
    Postgres, the bound `p_now` elsewhere. With `plus`, the bound parameter of seconds to add
    (on SQLite the caller passes `p_now` + those seconds as `p_<plus>_at`)."""
    if postgres:
        now = func.now()
        if plus is None:
            return now
        return now + func.make_interval(0, 0, 0, 0, 0, 0, bindparam(f"p_{plus}", type_=Float))
    return bindparam(f"p_{plus}_at" if plus else "p_now", type_=DateTime(timezone=True))


def clock_param(postgres: bool) -> Any:
    """The moment the statement runs, in a prebuilt statement: `clock_timestamp()` on
    Postgres (`now()` is the transaction's start, the same for all its statements), the bound
    `p_now` elsewhere. For a step's start and finish: a transaction that finishes one step and
    claims the next may have begun before another run's finish it waited for (fan-in)."""
    return func.clock_timestamp() if postgres else bindparam(
        "p_now", type_=DateTime(timezone=True))


def now_params(**plus_s: float) -> dict[str, Any]:
    """The parameters `now_param` needs: `p_now`, and for each `name=seconds`, `p_name`
    (seconds) and `p_name_at` (now plus them)."""
    from core.models import utcnow

    now = utcnow()
    out: dict[str, Any] = {"p_now": now}
    for name, seconds in plus_s.items():
        out[f"p_{name}"] = float(seconds)
        out[f"p_{name}_at"] = now + timedelta(seconds=seconds)
    return out


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()
        _read_factories.clear()
