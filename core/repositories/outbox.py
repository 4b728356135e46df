"""The transactional outbox: Celery messages written in the same transaction as the state change
that causes them, published right after that transaction commits, and republished by a sweeper
if a crash left them unsent.

Tasks are idempotent (a guarded status update decides who runs a step), so publishing a row
twice is harmless; losing one is what the outbox prevents. Rows that were sent are marked in
batches by a background thread, not one transaction per message.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from core import tracing
from core.db import after_commit, pending, transaction
from core.models import OutboxMessage, utcnow
from core.queue import get_celery, publish_options
from core.settings import get_settings

log = logging.getLogger(__name__)

# (row id, task, payload, priority, headers): the headers carry the W3C traceparent of the span
# that wrote the message, when tracing is on (a republished message carries none).
Message = tuple[int, str, dict[str, Any], int | None, dict[str, str] | None]
# Broker priorities, 0 first. Steps go at their job's tier's priority
# (`core.queue.STEP_PRIORITIES`, via `orchestrator.scheduling`); messages without one
# (deliveries, steps queued before tiers) go first. Redis: a list per priority, read in that
# order; RabbitMQ: a queue per band of priorities (`core.queue.publish_options`).
CONTINUE = 0
_KEY = "outbox"
_INSERT = insert(OutboxMessage).returning(OutboxMessage.id, sort_by_parameter_order=True)


def enqueue(session: Session, task: str, **payload: Any) -> None:
    """Add a message to publish once the transaction of `session` commits."""
    enqueue_many(session, task, [payload])


def enqueue_many(session: Session, task: str, payloads: Iterable[Mapping[str, Any]],
                 priority: int = CONTINUE) -> None:
    payloads_ = [dict(p) for p in payloads]
    rows = [{"task": task, "payload": p, "created_at": utcnow(), "attempts": 0,
             "priority": priority} for p in payloads_]
    if not rows:
        return
    ids = session.scalars(_INSERT, rows).all()
    messages: list[Message] = pending(session, _KEY)
    headers = tracing.message_headers()
    messages.extend((row_id, task, dict(p), priority, headers)
                    for row_id, p in zip(ids, payloads_, strict=True))
    after_commit(session, _KEY, lambda: _publish_pending(messages))


def _publish_pending(messages: list[Message]) -> None:
    publish(messages)


def publish(messages: list[Message]) -> int:
    """Send messages to the queue; what was sent is marked in the background. Failures are
    left to the sweeper. A row counts as sent only once the broker has the message: Redis
    answered the push, or RabbitMQ confirmed the publish (publisher confirms)."""
    if not messages:
        return 0
    app = get_celery()
    broker = get_settings().broker_url
    sent: list[int] = []
    for row_id, task, payload, priority, headers in messages:
        try:
            app.send_task(task, kwargs=payload, headers=headers,
                          **publish_options(task, priority or CONTINUE, broker))
        except Exception as exc:  # noqa: BLE001 - broker down: the sweeper republishes later
            log.warning("could not publish %s (outbox %s): %s", task, row_id, exc)
            continue
        sent.append(row_id)
    if sent:
        _marker.mark(sent)
    return len(sent)


class _SentMarker:
    """Marks published rows sent, many per statement. A row whose mark is lost (the process
    ended first) is published once more by the sweeper, which is harmless."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def mark(self, ids: list[int]) -> None:
        self._queue.put(ids)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="agentq-outbox-marker",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            ids = list(self._queue.get())
            while not self._queue.empty() and len(ids) < 2000:
                ids.extend(self._queue.get_nowait())
            try:
                with transaction() as s:
                    s.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids))
                              .values(sent_at=utcnow(), attempts=OutboxMessage.attempts + 1))
            except Exception as exc:  # noqa: BLE001 - they will be republished; harmless
                log.warning("could not mark %d outbox row(s) sent: %s", len(ids), exc)


_marker = _SentMarker()


def take_unsent(older_than_s: float, limit: int = 500) -> list[Message]:
    """Rows left unsent for longer than `older_than_s`; rows other sweepers hold are skipped."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with transaction() as s:
        rows = s.execute(
            select(OutboxMessage.id, OutboxMessage.task, OutboxMessage.payload,
                   OutboxMessage.priority)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.created_at < cutoff)
            .order_by(OutboxMessage.id).limit(limit).with_for_update(skip_locked=True)).all()
        if rows:
            # Pushed forward so that another sweeper does not take them again at once.
            s.execute(update(OutboxMessage).where(OutboxMessage.id.in_([r[0] for r in rows]))
                      .values(created_at=utcnow()))
    return [(r[0], r[1], dict(r[2]), r[3], None) for r in rows]


def sweep(older_than_s: float, limit: int = 500) -> int:
    """Republish messages left unsent for longer than `older_than_s` seconds."""
    messages = take_unsent(older_than_s, limit)
    if messages:
        log.info("outbox sweeper republishing %d message(s)", len(messages))
    return publish(messages)


def purge_sent(older_than_s: float, limit: int = 5000) -> int:
    """Delete rows sent long ago: the outbox is a queue, not an archive."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with transaction() as s:
        ids = list(s.scalars(select(OutboxMessage.id).where(
            OutboxMessage.sent_at.is_not(None), OutboxMessage.sent_at < cutoff).limit(limit)))
        if ids:
            s.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))
    return len(ids)
