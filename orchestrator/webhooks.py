"""Webhook deliveries: fan-out from the event log, durable, retried on the Standard Webhooks
schedule.

A delivery row (and the outbox message that sends it) is written in the same transaction as the
event it carries, so a process that dies before sending still delivers. Each delivery has a
`webhook-id` that stays the same across its attempts. Only 2xx is success; 410 disables the
endpoint; 429, 502 and 504 honour `Retry-After`; other failures retry on the schedule
(`AGENTQ_WEBHOOK_RETRY_SCHEDULE_S`) with jitter, then give up. Delays live in the database: the
workers' sweeper queues deliveries as they fall due.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import secrets
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.ids import new_id
from core.models import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from core.settings import get_settings
from core.webhook_http import UnsafeWebhookURL, send, sign
from orchestrator.events import TERMINAL_EVENTS
from orchestrator.outbox import enqueue
from orchestrator.uow import unit_of_work

log = logging.getLogger(__name__)

DELIVER_TASK = "webhooks.deliver"
RETRY_AFTER_CODES = {429, 502, 504}
STUCK_DELIVERING_S = 120
STUCK_QUEUED_S = 300


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _wants(events: list[str] | None, type_: str) -> bool:
    return type_ in (events or TERMINAL_EVENTS)


_ENDPOINTS = "agentq.webhooks.endpoints"


def _tenant_endpoints(session: Session, tenant_id: str
                      ) -> list[tuple[str, str, list[str] | None]]:
    """The tenant's enabled endpoints, read once per transaction: a step appends several
    events in one transaction, and each would otherwise query them again."""
    txn = session.get_transaction()
    cached = session.info.get(_ENDPOINTS)
    if cached is None or cached[0] is not txn:
        cached = (txn, {})
        session.info[_ENDPOINTS] = cached
    by_tenant: dict[str, list[tuple[str, str, list[str] | None]]] = cached[1]
    if tenant_id not in by_tenant:
        by_tenant[tenant_id] = [
            (ep.id, ep.url, ep.events) for ep in session.scalars(select(WebhookEndpoint).where(
                WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.disabled_at.is_(None)))]
    return by_tenant[tenant_id]


def fan_out(session: Session, *, job_id: str, tenant_id: str, job_webhook: dict[str, Any] | None,
            seq: int, type_: str, data: dict[str, Any]) -> None:
    """Write the deliveries an event causes (in the event's own transaction)."""
    targets: list[tuple[str | None, str]] = []
    if job_webhook and _wants(job_webhook.get("events"), type_):
        targets.append((None, str(job_webhook["url"])))
    for ep_id, url, events in _tenant_endpoints(session, tenant_id):
        if _wants(events, type_):
            targets.append((ep_id, url))
    if not targets:
        return
    now = utcnow()
    payload = {"type": type_, "timestamp": now.isoformat(),
               "data": {"job_id": job_id, "cursor": seq, **data}}
    for endpoint_id, url in targets:
        delivery = WebhookDelivery(
            id=new_id("whd"), message_id=new_id("msg"), tenant_id=tenant_id, job_id=job_id,
            endpoint_id=endpoint_id, url=url, event_type=type_, event_seq=seq, payload=payload,
            status="pending", attempts=0, next_attempt_at=now, status_changed_at=now)
        session.add(delivery)
        session.flush()
        enqueue(session, DELIVER_TASK, delivery_id=delivery.id)


def _secrets_for(session: Session, delivery: WebhookDelivery) -> list[str] | None:
    if delivery.endpoint_id is None:
        job = session.get(Job, delivery.job_id)
        secret = (job.webhook or {}).get("secret") if job is not None else None
        return [secret] if secret else None
    ep = session.get(WebhookEndpoint, delivery.endpoint_id)
    if ep is None or ep.disabled_at is not None:
        return None
    keys = [ep.secret]
    if ep.previous_secret and ep.previous_secret_expires_at \
            and ep.previous_secret_expires_at > utcnow():
        keys.append(ep.previous_secret)
    return keys


def deliver(delivery_id: str) -> None:
    """Make one attempt at a delivery, if it is due and nobody else is making it."""
    settings = get_settings()
    now = utcnow()
    with unit_of_work() as s:
        res = s.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status.in_(("pending", "queued")),
            or_(WebhookDelivery.next_attempt_at.is_(None),
                WebhookDelivery.next_attempt_at <= now),
        ).values(status="delivering", status_changed_at=now,
                 attempts=WebhookDelivery.attempts + 1))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return
        delivery = s.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        keys = _secrets_for(s, delivery)
        if keys is None:
            delivery.status, delivery.last_error = "failed", "the endpoint is disabled or gone"
            return
        attempt_no = delivery.attempts
        url, message_id = delivery.url, delivery.message_id
        body = json.dumps(delivery.payload, separators=(",", ":"))
    sent_at = utcnow()
    headers = {"webhook-id": message_id,
               "webhook-timestamp": str(int(sent_at.timestamp())),
               "webhook-signature": sign(keys, message_id, sent_at, body)}
    started = time.perf_counter()
    status_code: int | None = None
    retry_after: float | None = None
    excerpt: str | None = None
    error: str | None = None
    permanent = False
    try:
        result = send(url, body, headers, allow_private=settings.webhooks_allow_private_networks,
                      timeout_s=settings.webhook_timeout_s)
        status_code, retry_after, excerpt = (result.status_code, result.retry_after_s,
                                             result.excerpt)
    except UnsafeWebhookURL as exc:
        error, permanent = exc.message, True
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = (time.perf_counter() - started) * 1000
    _record(delivery_id, attempt_no, sent_at, duration_ms, status_code, retry_after, excerpt,
            error, permanent)


def _record(delivery_id: str, attempt_no: int, sent_at: Any, duration_ms: float,
            status_code: int | None, retry_after: float | None, excerpt: str | None,
            error: str | None, permanent: bool) -> None:
    settings = get_settings()
    schedule = settings.webhook_retry_schedule_s
    with unit_of_work() as s:
        s.add(WebhookAttempt(delivery_id=delivery_id, attempt=attempt_no, started_at=sent_at,
                             duration_ms=duration_ms, status_code=status_code, error=error,
                             response_excerpt=excerpt))
        delivery = s.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        now = utcnow()
        delivery.last_status_code, delivery.last_error = status_code, error
        delivery.status_changed_at = now
        if status_code is not None and 200 <= status_code < 300:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = \
                "succeeded", now, None
            return
        if status_code == 410:
            delivery.status, delivery.next_attempt_at = "failed", None
            delivery.last_error = "the receiver answered 410 Gone; endpoint disabled"
            if delivery.endpoint_id is not None:
                s.execute(update(WebhookEndpoint).where(
                    WebhookEndpoint.id == delivery.endpoint_id,
                    WebhookEndpoint.disabled_at.is_(None),
                ).values(disabled_at=now, disabled_reason="receiver answered 410 Gone"))
            return
        if permanent or attempt_no > len(schedule):
            delivery.status, delivery.next_attempt_at = "failed", None
            return
        delay = schedule[attempt_no - 1] * random.uniform(0.9, 1.1)
        if status_code in RETRY_AFTER_CODES and retry_after is not None:
            delay = max(delay, min(retry_after, 86400.0))
        delivery.status = "pending"
        delivery.next_attempt_at = now + timedelta(seconds=delay)


def sweep_due(limit: int = 500) -> int:
    """Queue the deliveries that have fallen due; put back the ones a dead run left behind."""
    now = utcnow()
    with unit_of_work() as s:
        s.execute(update(WebhookDelivery).where(
            or_((WebhookDelivery.status == "delivering")
                & (WebhookDelivery.status_changed_at
                   < now - timedelta(seconds=STUCK_DELIVERING_S)),
                (WebhookDelivery.status == "queued")
                & (WebhookDelivery.status_changed_at
                   < now - timedelta(seconds=STUCK_QUEUED_S))),
        ).values(status="pending", status_changed_at=now))
        due = list(s.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .limit(limit)))
        queued = 0
        for delivery_id in due:
            res = s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
            ).values(status="queued", status_changed_at=now))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                enqueue(s, DELIVER_TASK, delivery_id=delivery_id)
                queued += 1
    return queued


def redeliver(session: Session, tenant_id: str, job_id: str, delivery_id: str
              ) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id or delivery.job_id != job_id:
        raise NotFound(f"no webhook delivery {delivery_id[:60]!r} for this job")
    now = utcnow()
    delivery.status, delivery.next_attempt_at, delivery.status_changed_at = "queued", now, now
    session.flush()
    enqueue(session, DELIVER_TASK, delivery_id=delivery.id)
    return delivery


def list_deliveries(session: Session, job_id: str) -> list[tuple[WebhookDelivery,
                                                                 list[WebhookAttempt]]]:
    deliveries = list(session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at,
                                                   WebhookDelivery.id)))
    attempts: dict[str, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        for a in session.scalars(select(WebhookAttempt).where(
                WebhookAttempt.delivery_id.in_(list(attempts))).order_by(WebhookAttempt.id)):
            attempts[a.delivery_id].append(a)
    return [(d, attempts[d.id]) for d in deliveries]


# -- endpoints ----------------------------------------------------------------------------------

def create_endpoint(session: Session, tenant_id: str, url: str, events: list[str],
                    description: str | None) -> WebhookEndpoint:
    ep = WebhookEndpoint(id=new_id("whe"), tenant_id=tenant_id, url=url, events=events,
                         description=description, secret=new_secret())
    session.add(ep)
    session.flush()
    return ep


def get_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    ep = session.get(WebhookEndpoint, endpoint_id) if len(endpoint_id) <= 40 else None
    if ep is None or ep.tenant_id != tenant_id:
        raise NotFound(f"no webhook endpoint {endpoint_id[:60]!r}")
    return ep


def list_endpoints(session: Session, tenant_id: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == tenant_id).order_by(WebhookEndpoint.created_at)))


def rotate_secret(session: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    """A new secret; the old one keeps signing (both signatures are sent) for the grace period."""
    ep = get_endpoint(session, tenant_id, endpoint_id)
    ep.previous_secret = ep.secret
    ep.previous_secret_expires_at = utcnow() + timedelta(
        hours=get_settings().webhook_secret_grace_hours)
    ep.secret = new_secret()
    session.flush()
    return ep


def delete_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> None:
    session.delete(get_endpoint(session, tenant_id, endpoint_id))
