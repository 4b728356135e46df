"""The step path's prebuilt statements sent straight to the driver, on Postgres.

A step runs about a dozen statements, each small. SQLAlchemy's execution of a cached, compiled
statement (an execution context, parameter processing, a result object) cost about as much CPU
as the driver's own work, about a sixth of a step's CPU in all (`python -m bench.step_cost`).
A `Direct` plan does what that execution does for these statements, once: the statement is
compiled for the connection's dialect, and each run only builds its parameters (the bound
values, the Python-side `onupdate`/`default` values SQLAlchemy would compute, the types' bind
processors) and sends the compiled SQL on the DBAPI connection of the session's transaction.

Kept as SQLAlchemy does it:
- the transaction: the statement runs on the session's connection, inside its transaction;
- errors: a driver error goes through the connection's own handling (wrapped as SQLAlchemy's
  exception types, a lost connection invalidated), so retries see what they always saw;
- `before_cursor_execute` listeners still hear each statement (tests and benchmarks count
  them);
- inserts of rows given as dictionaries (`core.db.PrebuiltInsert`) are compiled for the rows'
  keys, as SQLAlchemy compiles them, and sent in one `executemany` (psycopg pipelines it);
- rows are the driver's tuples, read by position (every caller does), with the columns' result
  processors applied where a type has one (timestamps made UTC). A statement with parameters
  expanded at execution (`IN` lists) is not planned: it runs through SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy.engine import Connection
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler


class Rows:
    """A statement's rows, read the ways the step path reads them."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)

    def first(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> tuple[Any, ...]:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def all(self) -> list[tuple[Any, ...]]:
        return self._rows


class Direct:
    """One statement compiled for one dialect, run on the driver (see the module)."""

    def __init__(self, compiled: SQLCompiler) -> None:
        self._compiled = compiled
        # The columns' result processors (a timestamp made UTC), found at the first run: some
        # depend on the type the driver reports. None: no column has one.
        self._results: list[Any] | None = None
        self._results_known = False
        self._sql = compiled.string
        self._processors: dict[str, Callable[[Any], Any]] = dict(
            compiled._bind_processors)  # type: ignore[arg-type]
        defaults: list[tuple[str, Any]] = []
        for columns, attr in ((compiled.insert_prefetch, "default"),
                              (compiled.update_prefetch, "onupdate")):
            for column in columns:
                default = getattr(column, attr)
                if default is None:
                    continue
                defaults.append((column.key, default))
        self._defaults = defaults

    @staticmethod
    def plan(statement: Executable, conn: Connection,
             column_keys: Sequence[str] | None = None) -> Direct | None:
        """The plan for `statement` on `conn`'s dialect; None where it must run through
        SQLAlchemy (not Postgres with psycopg, or parameters expanded at execution).
        `column_keys`: an insert's columns given by the rows (compiled for those keys, as
        SQLAlchemy compiles an insert for its parameters)."""
        if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
            return None
        compiled = statement.compile(  # type: ignore[attr-defined]
            dialect=conn.dialect, column_keys=list(column_keys) if column_keys else None)
        if not isinstance(compiled, SQLCompiler) or compiled.post_compile_params \
                or compiled.literal_execute_params:
            return None
        return Direct(compiled)

    def _send(self, conn: Connection, values: Any, many: bool
              ) -> tuple[list[tuple[Any, ...]], Any]:
        """Send the statement on the connection of the session's transaction (listeners told,
        driver errors handled by the connection); its rows and their description."""
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if conn._has_events or conn.engine._has_events:
                conn.dispatch.before_cursor_execute(conn, cursor, self._sql, values, None,
                                                    many)
            if many:
                cursor.executemany(self._sql, values)
                return [], None
            cursor.execute(self._sql, values)
            description = cursor.description
            return (cursor.fetchall() if description is not None else []), description
        except psycopg.Error as exc:
            conn._handle_dbapi_exception(exc, self._sql, values, cursor, None)
            raise  # not reached: the connection raises its own error
        finally:
            cursor.close()

    def _values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = self._compiled.construct_params(
            dict(params), _check=False)  # type: ignore[assignment]
        for key, default in self._defaults:
            if default.is_callable:
                values[key] = default.arg(None)
            elif default.is_scalar:
                values[key] = default.arg
        for name, process in self._processors.items():
            if name in values:  # None too, as SQLAlchemy does (JSON's None is JSON null)
                values[name] = process(values[name])
        return values

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement (one returning nothing) once per row, in one `executemany`: the
        driver pipelines them, one round trip for all."""
        self._send(conn, [self._values(row) for row in rows], many=True)

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Rows:
        rows, description = self._send(conn, self._values(params), many=False)
        if not self._results_known and description is not None:
            found = [c.type._cached_result_processor(conn.dialect, d.type_code)
                     for c, d in zip(self._compiled._result_columns, description, strict=True)]
            self._results = found if any(found) else None
            self._results_known = True
        if self._results is not None:
            processors = self._results
            rows = [tuple(v if p is None or v is None else p(v)
                          for p, v in zip(processors, row, strict=True)) for row in rows]
        return Rows(rows)
