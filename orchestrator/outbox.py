"""The transactional outbox: Celery messages written in the same transaction as the state change
that causes them, published after commit, and republished by a sweeper if a crash left them unsent.

Tasks are idempotent (a guarded status update decides who runs a step), so publishing the same
row twice is harmless; losing one is what the outbox prevents.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db import session_scope
from core.models import OutboxMessage, utcnow
from core.queue import get_celery

log = logging.getLogger(__name__)

_PENDING = "agentq.outbox.pending"


def enqueue(session: Session, task: str, **payload: Any) -> None:
    """Add a message to publish once `session` commits."""
    row = OutboxMessage(task=task, payload=payload)
    session.add(row)
    session.flush()
    session.info.setdefault(_PENDING, []).append((row.id, task, payload))


def take_pending(session: Session) -> list[tuple[int, str, dict[str, Any]]]:
    """The messages this session wrote; the caller publishes them after commit."""
    pending: list[tuple[int, str, dict[str, Any]]] = session.info.pop(_PENDING, [])
    return pending


def discard_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def publish(messages: list[tuple[int, str, dict[str, Any]]]) -> int:
    """Send messages to the queue, then mark them sent. Failures are left to the sweeper."""
    if not messages:
        return 0
    app = get_celery()
    sent: list[int] = []
    for row_id, task, payload in messages:
        try:
            app.send_task(task, kwargs=payload)
        except Exception as exc:  # broker down: the sweeper republishes later
            log.warning("could not publish %s (outbox %s): %s", task, row_id, exc)
            continue
        sent.append(row_id)
    if sent:
        try:
            with session_scope() as s:
                s.execute(update(OutboxMessage).where(OutboxMessage.id.in_(sent))
                          .values(sent_at=utcnow(), attempts=OutboxMessage.attempts + 1))
        except Exception as exc:  # will be republished; tasks are idempotent
            log.warning("could not mark outbox rows sent: %s", exc)
    return len(sent)


def sweep(older_than_s: float, limit: int = 500) -> int:
    """Republish messages left unsent for longer than `older_than_s` seconds."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with session_scope() as s:
        rows = s.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.created_at < cutoff)
            .order_by(OutboxMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        messages = [(r.id, r.task, dict(r.payload)) for r in rows]
    if messages:
        log.info("outbox sweeper republishing %d message(s)", len(messages))
    return publish(messages)
