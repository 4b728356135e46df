"""Webhook delivery: one attempt at a time, retried on the Standard Webhooks schedule.

A delivery row (and the outbox message that sends it) is written in the same transaction as the
event it carries (`core.repositories.webhooks.fan_out`), so a process that dies before sending
still delivers. Each delivery has a `webhook-id` that stays the same across its attempts. Only
2xx is success; 410 disables the endpoint; 429, 502 and 504 honour `Retry-After`; other failures
retry on the schedule (`AGENTQ_WEBHOOK_RETRY_SCHEDULE_S`) with jitter, then give up. Delays live
in the database: the workers' sweeper queues deliveries as they fall due.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx

from core.db import transaction
from core.models import DeliveryStatus, WebhookAttempt, utcnow
from core.repositories import webhooks as repo
from core.settings import get_settings
from core.webhook_http import UnsafeWebhookURL, send, sign

RETRY_AFTER_CODES = {429, 502, 504}
STUCK_DELIVERING_S = 120
STUCK_QUEUED_S = 300


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    retry_after: float | None
    excerpt: str | None
    error: str | None
    permanent: bool


def deliver(delivery_id: str) -> None:
    """Make one attempt at a delivery, if it is due and nobody else is making it."""
    settings = get_settings()
    with transaction() as s:
        claimed = repo.claim_delivery(s, delivery_id, utcnow())
        if claimed is None:
            return
        if claimed.keys is None:
            d = repo.get_delivery(s, delivery_id)
            d.status, d.last_error = DeliveryStatus.FAILED, "the endpoint is disabled or gone"
            return
    body = json.dumps(claimed.payload, separators=(",", ":"))
    sent_at = utcnow()
    headers = {"webhook-id": claimed.message_id,
               "webhook-timestamp": str(int(sent_at.timestamp())),
               "webhook-signature": sign(claimed.keys, claimed.message_id, sent_at, body)}
    started = time.perf_counter()
    outcome = Outcome(None, None, None, None, False)
    try:
        result = send(claimed.url, body, headers,
                      allow_private=settings.webhooks_allow_private_networks,
                      timeout_s=settings.webhook_timeout_s)
        outcome = Outcome(result.status_code, result.retry_after_s, result.excerpt, None, False)
    except UnsafeWebhookURL as exc:
        outcome = Outcome(None, None, None, exc.message, True)
    except httpx.HTTPError as exc:
        outcome = Outcome(None, None, None, f"{type(exc).__name__}: {exc}"[:500], False)
    _record(delivery_id, claimed.attempt, sent_at, (time.perf_counter() - started) * 1000,
            outcome)


def _record(delivery_id: str, attempt_no: int, sent_at: datetime, duration_ms: float,
            o: Outcome) -> None:
    schedule = get_settings().webhook_retry_schedule_s
    with transaction() as s:
        repo.add_attempt(s, WebhookAttempt(
            delivery_id=delivery_id, attempt=attempt_no, started_at=sent_at,
            duration_ms=duration_ms, status_code=o.status_code, error=o.error,
            response_excerpt=o.excerpt))
        delivery = repo.get_delivery(s, delivery_id)
        now = utcnow()
        delivery.last_status_code, delivery.last_error = o.status_code, o.error
        delivery.status_changed_at = now
        if o.status_code is not None and 200 <= o.status_code < 300:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = \
                DeliveryStatus.SUCCEEDED, now, None
            return
        if o.status_code == 410:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
            delivery.last_error = "the receiver answered 410 Gone; endpoint disabled"
            if delivery.endpoint_id is not None:
                repo.disable_endpoint(s, delivery.endpoint_id, now, "receiver answered 410 Gone")
            return
        if o.permanent or attempt_no > len(schedule):
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
            return
        delay = schedule[attempt_no - 1] * random.uniform(0.9, 1.1)
        if o.status_code in RETRY_AFTER_CODES and o.retry_after is not None:
            delay = max(delay, min(o.retry_after, 86400.0))
        delivery.status = DeliveryStatus.PENDING
        delivery.next_attempt_at = now + timedelta(seconds=delay)


def sweep_due(limit: int = 500) -> int:
    """Queue the deliveries that have fallen due; put back the ones a dead run left behind."""
    with transaction() as s:
        return repo.queue_due(s, utcnow(), STUCK_DELIVERING_S, STUCK_QUEUED_S, limit)


def rotate_grace() -> timedelta:
    return timedelta(hours=get_settings().webhook_secret_grace_hours)
