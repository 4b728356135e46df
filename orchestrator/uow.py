"""The unit of work for orchestration: one transaction; after it commits, its outbox messages are
published and the event streams of the jobs it touched are woken."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from core.db import commit, session_factory
from orchestrator.events import notify, take_touched
from orchestrator.outbox import discard_pending, publish, take_pending


@contextmanager
def unit_of_work() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
        commit(session)
    except BaseException:
        session.rollback()
        discard_pending(session)
        take_touched(session)
        session.close()
        raise
    messages = take_pending(session)
    touched = take_touched(session)
    session.close()
    publish(messages)
    notify(touched)
