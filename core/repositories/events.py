"""The append-only event log of a job. Each event takes the job's next cursor value from the
job row, which also orders concurrent appends to the same job. The deliveries an event causes
are written with it, and after commit the job's event streams are woken (a notification on
Redis carrying only the job id)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from core.db import PrebuiltInsert, after_commit, pending
from core.models import JobEvent, job_events_table, jobs_table, utcnow
from core.redis import EVENTS_CHANNEL_PREFIX, get_redis
from core.repositories import webhooks

log = logging.getLogger(__name__)
_INSERT = PrebuiltInsert(lambda _: insert(job_events_table))
J = jobs_table.c

TERMINAL_EVENTS = webhooks.TERMINAL_EVENTS
Event = tuple[str, dict[str, Any]]
_KEY = "events.touched"


def append(session: Session, job_id: str, type_: str, data: dict[str, Any] | None = None
           ) -> int:
    """Append one event; returns its cursor."""
    return append_many(session, job_id, [(type_, data or {})])


def append_many(session: Session, job_id: str, events: Sequence[Event]) -> int:
    """Append events in order; returns the cursor of the last."""
    row = session.execute(
        update(jobs_table).where(J.id == job_id).values(event_seq=J.event_seq + len(events))
        .returning(J.event_seq, *webhooks.HOOK_COLUMNS)
        .execution_options(synchronize_session=False)).one()
    last = int(row[0])
    write(session, job_id, webhooks.hooks_of(row), last - len(events) + 1, events)
    return last


def write(session: Session, job_id: str, hooks: webhooks.Hooks, first_seq: int,
          events: Sequence[Event]) -> None:
    """Insert events whose cursors (`first_seq`, ...) the caller took from the job row in its
    own update (`event_seq = event_seq + len(events)`)."""
    if not events:
        return
    now = utcnow()
    _INSERT.execute(session, [
        {"job_id": job_id, "seq": first_seq + i, "type": t, "data": d, "created_at": now}
        for i, (t, d) in enumerate(events)])
    for i, (type_, data) in enumerate(events):
        webhooks.fan_out(session, job_id=job_id, hooks=hooks, seq=first_seq + i, type_=type_,
                         data=data)
    touched: list[str] = pending(session, _KEY)
    touched.append(job_id)
    after_commit(session, _KEY, lambda: notify(set(touched)))


def notify(job_ids: set[str]) -> None:
    """Wake the event streams of these jobs (best effort: streams also poll, slowly)."""
    if not job_ids:
        return
    try:
        pipe = get_redis().pipeline(transaction=False)
        for job_id in job_ids:
            pipe.publish(EVENTS_CHANNEL_PREFIX + job_id, "1")
        pipe.execute()
    except RedisError as exc:
        log.warning("could not publish event notifications: %s", exc)


def list_events(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                       JobEvent.seq > after)
                                .order_by(JobEvent.seq).limit(limit)))


def last_at(session: Session, job_id: str, type_: str) -> datetime | None:
    """When the job's last event of this type was appended; None when it has none."""
    return session.scalar(select(func.max(JobEvent.created_at)).where(
        JobEvent.job_id == job_id, JobEvent.type == type_))
