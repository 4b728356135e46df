"""Webhook delivery: one attempt at a time, retried on the Standard Webhooks schedule.

A delivery row (and the outbox message that sends it) is written in the same transaction as the
event it carries (`core.repositories.webhooks.fan_out`), so a process that dies before sending
still delivers. Each delivery has a `webhook-id` that stays the same across its attempts. Only
2xx is success; 410 disables the endpoint; 429, 502 and 504 honour `Retry-After`; other failures
(an attempt cut off at its deadline among them) retry on the schedule
(`AGENTQ_WEBHOOK_RETRY_SCHEDULE_S`) with jitter, then give up. Delays live in the database: the
workers' sweeper queues deliveries as they fall due.

Attempts run on the worker's webhook threads (`orchestrator.webhook_pool`), never in the
steps' slots. An attempt claims its delivery (`delivering`, the next attempt number) and holds
it for a lease longer than any attempt can last (`AGENTQ_WEBHOOK_TIMEOUT_S` plus a margin); only
a claim whose lease ran out is given to another attempt, redelivery waits for it too, and an
attempt records its outcome only while its claim stands.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy.orm import Session

from core.db import transaction
from core.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, utcnow
from core.repositories import webhooks as repo
from core.settings import get_settings
from core.webhook_http import LookupFailed, UnsafeWebhookURL, send, sign
from orchestrator.webhook_pool import get_pool

log = logging.getLogger(__name__)

RETRY_AFTER_CODES = {429, 502, 504}
# How long past its deadline an attempt's claim still stands (its two short transactions).
LEASE_MARGIN_S = 30.0
STUCK_QUEUED_S = 300


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    retry_after: float | None
    excerpt: str | None
    error: str | None
    permanent: bool


def lease_s() -> float:
    """How long an attempt holds its delivery: longer than the attempt can last."""
    return get_settings().webhook_timeout_s + LEASE_MARGIN_S


def hand_off(delivery_id: str) -> None:
    """Give a due delivery to this process's webhook threads; when they (or the tenant's share
    of them) are all busy, put it back to be queued again a little later. Never waits."""
    now = utcnow()
    with transaction() as s:
        tenant_id = repo.due_tenant(s, delivery_id, now)
    if tenant_id is None:
        return
    if get_pool().try_run(tenant_id, lambda: deliver(delivery_id)):
        return
    pause = get_settings().webhook_timeout_s * random.uniform(0.5, 1.0)
    with transaction() as s:
        repo.defer(s, delivery_id, now, now + timedelta(seconds=pause))


def deliver(delivery_id: str) -> None:
    """Make one attempt at a delivery, if it is due and nobody else is making one."""
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
    timeout_s = settings.webhook_timeout_s
    try:
        result = send(claimed.url, body, headers,
                      allow_private=settings.webhooks_allow_private_networks,
                      timeout_s=timeout_s,
                      max_response_bytes=settings.webhook_max_response_bytes)
        outcome = Outcome(result.status_code, result.retry_after_s, result.excerpt,
                          f"the response did not end within the attempt's {timeout_s:g} s"
                          if result.timed_out else None, False)
    except LookupFailed as exc:
        outcome = Outcome(None, None, None, exc.message, False)
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
        delivery = repo.attempt_in_hand(s, delivery_id, attempt_no)
        if delivery is None:
            log.warning("webhook delivery %s: attempt %d ended after its claim was lost; its "
                        "outcome is logged, not applied", delivery_id, attempt_no)
            return
        _apply(s, delivery, attempt_no, o, schedule)


def _apply(s: Session, delivery: WebhookDelivery, attempt_no: int, o: Outcome,
           schedule: list[float]) -> None:
    """Move the delivery on after an attempt: succeeded, failed for good, or a retry later."""
    now = utcnow()
    delivery.last_status_code, delivery.last_error = o.status_code, o.error
    delivery.status_changed_at = now
    if o.error is None and o.status_code is not None and 200 <= o.status_code < 300:
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
    """Queue the deliveries that have fallen due (of each tenant's, per sweep, at most as many
    as one worker makes at once); put back the ones a dead run left behind."""
    with transaction() as s:
        return repo.queue_due(s, utcnow(), lease_s(), STUCK_QUEUED_S, limit,
                              get_settings().webhook_concurrency)


def rotate_grace() -> timedelta:
    return timedelta(hours=get_settings().webhook_secret_grace_hours)
