"""The append-only event log of a job. Each event takes the job's next cursor value with an
atomic update on the job row, which also orders concurrent appends to the same job.

After the transaction commits, a notification (just the job id) is published on Redis so that
open event streams wake up and read what is new; a stream never polls the database on a timer
shorter than its fallback interval."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import Job, JobEvent
from core.redis import EVENTS_CHANNEL_PREFIX, get_redis

log = logging.getLogger(__name__)


def append_event(session: Session, job_id: str, type_: str, data: dict[str, Any] | None = None
                 ) -> int:
    seq, tenant_id, job_webhook = session.execute(
        update(Job).where(Job.id == job_id).values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq, Job.tenant_id, Job.webhook)
    ).one()
    session.add(JobEvent(job_id=job_id, seq=seq, type=type_, data=data or {}))
    # Deliveries are written with the event: a crash after commit still delivers.
    from orchestrator.webhooks import fan_out

    fan_out(session, job_id=job_id, tenant_id=tenant_id, job_webhook=job_webhook, seq=seq,
            type_=type_, data=data or {})
    session.info.setdefault(_TOUCHED, set()).add(job_id)
    return int(seq)


TERMINAL_EVENTS = frozenset({"job.completed", "job.failed", "job.cancelled",
                             "job.budget_exhausted"})
_TOUCHED = "agentq.events.touched"


def take_touched(session: Session) -> set[str]:
    touched: set[str] = session.info.pop(_TOUCHED, set())
    return touched


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
