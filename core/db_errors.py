"""Database errors worth running a transaction again for, and how.

- A refused connection (the server restarting, or at `max_connections`) is tried again a few
  times when it is opened, so a short spike costs a brief wait instead of a failed unit of work.
- `retry_transient` (the API's requests) runs a whole unit of work again after an error that
  rolled it back (a deadlock, a serialization failure, a dropped connection), but never after a
  COMMIT whose outcome is unknown, nor after a pool that had no free connection in time.
- `db_retrying` (the workers' writes of finished work: settlements, completions) keeps trying
  through a longer outage: those writes are safe to repeat (fenced, or keyed by request id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, event, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# About 3.5 seconds of tries in all (0.1 s, doubling, up to 2 s apart).
CONNECT_ATTEMPTS = 6
_CONNECT_GAVE_UP = "agentq_connect_gave_up"
_OUTCOME_UNKNOWN = "agentq_commit_outcome_unknown"
# Serialization failure and deadlock: the server rolled the transaction back.
_ROLLED_BACK_STATES = frozenset({"40001", "40P01"})

# What a worker catches to hand a step back instead of failing its job.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


def retry_connect(engine: Engine) -> None:
    """Try a refused connection again a few times; a refusal that outlasts the tries is
    marked, and `retry_transient` does not wait for it again."""
    def _log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("database connection refused (attempt %d): %s", state.attempt_number,
                    str(error).strip().splitlines()[0] if error else "")

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
        except refused as error:
            setattr(error, _CONNECT_GAVE_UP, True)
            raise


def commit(session: Session) -> None:
    """Flush, then COMMIT. A COMMIT that fails without the server saying the transaction was
    rolled back (the connection dropped) may have been applied: the error is marked so that
    `retry_transient` never runs that transaction a second time."""
    session.flush()
    try:
        session.commit()
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) not in _ROLLED_BACK_STATES:
            setattr(error, _OUTCOME_UNKNOWN, True)
        raise


def is_transient(error: BaseException) -> bool:
    """Whether the failed transaction may simply be run again: a connection lost, a deadlock,
    a serialization failure, a lock wait that timed out; never a COMMIT whose outcome is
    unknown, a pool that had no free connection in time, nor a refused connection that was
    already tried again for seconds when it was opened."""
    if not isinstance(error, DBAPIError) or getattr(error, _OUTCOME_UNKNOWN, False) \
            or getattr(error.orig, _CONNECT_GAVE_UP, False):
        return False
    return error.connection_invalidated or isinstance(error, OperationalError)


TRANSACTION_ATTEMPTS = 3


def retry_transient(fn: Callable[[], T], *, attempts: int = TRANSACTION_ATTEMPTS) -> T:
    """Run `fn`, a whole unit of work (or several, each safe to repeat), again after a
    transient database error, with jittered exponential backoff."""
    def _log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("transient database error (attempt %d of %d), retrying: %s",
                    state.attempt_number, attempts,
                    str(error).strip().splitlines()[0] if error else "")

    retrying = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(attempts),
                        wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
                        before_sleep=_log, reraise=True)
    return retrying(fn)


def _worth_waiting(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT_DB_ERRORS)


def db_retrying(max_s: float = 15.0) -> Retrying:
    """Retries of a whole transaction of finished work on any database error that may pass
    (refused or lost connections, no free connection, deadlocks, unknown commits: these
    writes are safe to repeat), for at most `max_s`."""
    def _log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("database error (attempt %d), running the transaction again: %s",
                    state.attempt_number, str(error).strip().splitlines()[0] if error else "")

    return Retrying(retry=retry_if_exception(_worth_waiting), stop=stop_after_delay(max_s),
                    wait=wait_exponential_jitter(multiplier=0.05, max=5.0), before_sleep=_log,
                    reraise=True)
