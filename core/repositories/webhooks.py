"""Webhook endpoints and deliveries: every query on them."""

from __future__ import annotations

import base64
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound
from core.ids import new_id
from core.models import (
    DeliveryStatus,
    Job,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    jobs_table,
    tenants_table,
    utcnow,
)
from core.repositories import outbox

DELIVER_TASK = "webhooks.deliver"
TERMINAL_EVENTS = frozenset({"job.completed", "job.failed", "job.cancelled",
                             "job.budget_exhausted"})

@dataclass(frozen=True)
class Hooks:
    """Who hears a job's events: its tenant (and the version of the tenant's endpoints, read
    from the job row in the update that takes the events' cursors) and its own webhook."""

    tenant_id: str
    webhook: dict[str, Any] | None
    version: int


# Read with a job row: (tenant id, job webhook, tenant's endpoints version).
HOOK_COLUMNS = (jobs_table.c.tenant_id, jobs_table.c.webhook,
                select(tenants_table.c.webhooks_version)
                .where(tenants_table.c.id == jobs_table.c.tenant_id).scalar_subquery())


def hooks_of(row: Sequence[Any]) -> Hooks:
    """`Hooks` from the three `HOOK_COLUMNS` values at the end of a returned row."""
    tenant_id, webhook, version = row[-3:]
    return Hooks(str(tenant_id), webhook, int(version or 0))


Endpoint = tuple[str, str, list[str] | None]
_endpoints: dict[str, tuple[int, list[Endpoint]]] = {}
_endpoints_lock = threading.Lock()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _wants(events: list[str] | None, type_: str) -> bool:
    return type_ in (events or TERMINAL_EVENTS)


def _tenant_endpoints(session: Session, tenant_id: str, version: int) -> list[Endpoint]:
    """The tenant's enabled endpoints, kept in memory while their version stands."""
    with _endpoints_lock:
        cached = _endpoints.get(tenant_id)
    if cached is not None and cached[0] == version:
        return cached[1]
    found: list[Endpoint] = [(r[0], r[1], r[2]) for r in session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.events).where(
            WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.disabled_at.is_(None)))]
    with _endpoints_lock:
        _endpoints[tenant_id] = (version, found)
        while len(_endpoints) > 10_000:
            _endpoints.pop(next(iter(_endpoints)))
    return found


def changed(session: Session, tenant_id: str) -> None:
    """The tenant's endpoints changed: every process reads them again (the version moves in
    the same transaction as the change)."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(
        webhooks_version=Tenant.webhooks_version + 1).execution_options(
        synchronize_session=False))


def fan_out(session: Session, *, job_id: str, hooks: Hooks, seq: int, type_: str,
            data: dict[str, Any]) -> None:
    """Write the deliveries an event causes (in the event's own transaction)."""
    targets: list[tuple[str | None, str]] = []
    job_webhook, tenant_id = hooks.webhook, hooks.tenant_id
    if job_webhook and _wants(job_webhook.get("events"), type_):
        targets.append((None, str(job_webhook["url"])))
    for ep_id, url, events in _tenant_endpoints(session, tenant_id, hooks.version):
        if _wants(events, type_):
            targets.append((ep_id, url))
    if not targets:
        return
    now = utcnow()
    payload = {"type": type_, "timestamp": now.isoformat(),
               "data": {"job_id": job_id, "cursor": seq, **data}}
    ids = []
    for endpoint_id, url in targets:
        delivery = WebhookDelivery(
            id=new_id("whd"), message_id=new_id("msg"), tenant_id=tenant_id, job_id=job_id,
            endpoint_id=endpoint_id, url=url, event_type=type_, event_seq=seq, payload=payload,
            status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=now,
            status_changed_at=now)
        session.add(delivery)
        ids.append(delivery.id)
    session.flush()
    outbox.enqueue_many(session, DELIVER_TASK, [{"delivery_id": i} for i in ids])


@dataclass(frozen=True)
class Claimed:
    """A delivery taken for one attempt: what sending it needs."""

    attempt: int
    url: str
    message_id: str
    payload: dict[str, Any]
    keys: list[str] | None  # signing secrets; None: the endpoint is disabled or gone


def claim_delivery(session: Session, delivery_id: str, now: datetime) -> Claimed | None:
    """Take a due delivery for one attempt, unless someone else has it."""
    res = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.QUEUED)),
        or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
    ).values(status=DeliveryStatus.DELIVERING, status_changed_at=now,
             attempts=WebhookDelivery.attempts + 1))
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    delivery = session.get(WebhookDelivery, delivery_id)
    assert delivery is not None
    return Claimed(delivery.attempts, delivery.url, delivery.message_id,
                   dict(delivery.payload), _secrets_for(session, delivery))


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


def due_tenant(session: Session, delivery_id: str, now: datetime) -> str | None:
    """The tenant of a delivery that could be claimed now; None when there is nothing to do."""
    found = session.scalar(select(WebhookDelivery.tenant_id).where(
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.QUEUED)),
        or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now)))
    return str(found) if found is not None else None


def defer(session: Session, delivery_id: str, now: datetime, until: datetime) -> None:
    """Put a due delivery back to wait until `until` (no attempt is counted); the sweeper
    queues it again then."""
    session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id,
        WebhookDelivery.status.in_((DeliveryStatus.PENDING, DeliveryStatus.QUEUED)),
        or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
    ).values(status=DeliveryStatus.PENDING, next_attempt_at=until, status_changed_at=now))


def attempt_in_hand(session: Session, delivery_id: str, attempt: int
                    ) -> WebhookDelivery | None:
    """The delivery, locked, if attempt `attempt` still holds it (it is `delivering` and no
    later attempt has claimed it); None when the attempt's claim was lost."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None or delivery.status != DeliveryStatus.DELIVERING \
            or delivery.attempts != attempt:
        return None
    return delivery


def get_delivery(session: Session, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no webhook delivery {delivery_id[:60]!r}")
    return delivery


def add_attempt(session: Session, attempt: WebhookAttempt) -> None:
    session.add(attempt)


def disable_endpoint(session: Session, endpoint_id: str, now: datetime, reason: str) -> None:
    tenant_id = session.scalar(update(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None),
    ).values(disabled_at=now, disabled_reason=reason).returning(WebhookEndpoint.tenant_id))
    if tenant_id is not None:
        changed(session, tenant_id)


def queue_due(session: Session, now: datetime, stuck_delivering_s: float, stuck_queued_s: float,
              limit: int, per_tenant: int) -> int:
    """Queue the deliveries that have fallen due, at most `per_tenant` of each tenant's (the
    oldest due first), so that a tenant with a long backlog of failing deliveries is offered
    as much per sweep as any other; put back the ones a dead run left behind (`delivering` for
    longer than an attempt's lease, `stuck_delivering_s`, which outlasts any attempt: so an
    attempt is never started while another may still be running)."""
    session.execute(update(WebhookDelivery).where(
        or_((WebhookDelivery.status == DeliveryStatus.DELIVERING)
            & (WebhookDelivery.status_changed_at < now - timedelta(seconds=stuck_delivering_s)),
            (WebhookDelivery.status == DeliveryStatus.QUEUED)
            & (WebhookDelivery.status_changed_at < now - timedelta(seconds=stuck_queued_s))),
    ).values(status=DeliveryStatus.PENDING, status_changed_at=now))
    ranked = select(WebhookDelivery.id, func.row_number().over(
        partition_by=WebhookDelivery.tenant_id,
        order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id)).label("rank")).where(
        WebhookDelivery.status == DeliveryStatus.PENDING,
        WebhookDelivery.next_attempt_at <= now).subquery()
    due = list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.id.in_(select(ranked.c.id).where(ranked.c.rank <= per_tenant)))
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)
        .with_for_update(skip_locked=True)))
    if not due:
        return 0
    queued = list(session.scalars(update(WebhookDelivery).where(
        WebhookDelivery.id.in_(due), WebhookDelivery.status == DeliveryStatus.PENDING,
    ).values(status=DeliveryStatus.QUEUED, status_changed_at=now)
        .returning(WebhookDelivery.id)))
    outbox.enqueue_many(session, DELIVER_TASK, [{"delivery_id": d} for d in queued])
    return len(queued)


class AttemptInProgress(Conflict):
    code = "delivery_attempt_in_progress"


def redeliver(session: Session, tenant_id: str, job_id: str, delivery_id: str,
              lease_s: float) -> WebhookDelivery:
    """Queue a delivery again now, unless an attempt at it is being made (within its lease)."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True) \
        if len(delivery_id) <= 40 else None
    if delivery is None or delivery.tenant_id != tenant_id or delivery.job_id != job_id:
        raise NotFound(f"no webhook delivery {delivery_id[:60]!r} for this job")
    now = utcnow()
    if delivery.status == DeliveryStatus.DELIVERING \
            and delivery.status_changed_at > now - timedelta(seconds=lease_s):
        raise AttemptInProgress("an attempt at this delivery is being made now; redeliver it "
                                f"once that attempt ends (within {lease_s:g} s)")
    delivery.status, delivery.next_attempt_at, delivery.status_changed_at = \
        DeliveryStatus.QUEUED, now, now
    session.flush()
    outbox.enqueue(session, DELIVER_TASK, delivery_id=delivery.id)
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

class TooManyEndpoints(Conflict):
    code = "too_many_webhook_endpoints"


def create_endpoint(session: Session, tenant_id: str, url: str, events: list[str],
                    description: str | None, max_endpoints: int) -> WebhookEndpoint:
    """Register an endpoint, unless the tenant already has `max_endpoints` (counted with the
    tenant's row locked, so concurrent registrations cannot pass the limit together)."""
    changed(session, tenant_id)  # takes the tenant row's lock first
    have = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == tenant_id)) or 0
    if have >= max_endpoints:
        raise TooManyEndpoints(f"this tenant already has {have} webhook endpoints (the limit "
                               f"is {max_endpoints}); delete one before registering another")
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


def rotate_secret(session: Session, tenant_id: str, endpoint_id: str,
                  grace: timedelta) -> WebhookEndpoint:
    """A new secret; the old one keeps signing (both signatures are sent) for `grace`."""
    ep = get_endpoint(session, tenant_id, endpoint_id)
    ep.previous_secret = ep.secret
    ep.previous_secret_expires_at = utcnow() + grace
    ep.secret = new_secret()
    session.flush()
    changed(session, tenant_id)
    return ep


def delete_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> None:
    session.delete(get_endpoint(session, tenant_id, endpoint_id))
    session.flush()
    changed(session, tenant_id)
