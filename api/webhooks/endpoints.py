"""Webhook endpoints (`/v1/webhook-endpoints`) and a job's deliveries."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import CurrentPrincipal, DbSession
from api.jobs.schemas import ErrorResponse
from api.responses import ERRORS, link
from api.webhooks.schemas import (
    AttemptOut,
    DeliveryList,
    DeliveryOut,
    EndpointCreate,
    EndpointList,
    EndpointOut,
)
from core.db import transaction
from core.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from core.repositories import webhooks as webhook_repo
from core.settings import get_settings
from core.webhook_http import check_url
from orchestrator import jobs as job_service
from orchestrator.webhooks import lease_s, rotate_grace

router = APIRouter(tags=["webhooks"], responses=ERRORS)


def _endpoint_out(ep: WebhookEndpoint, show_secret: bool = False) -> EndpointOut:
    return EndpointOut(id=ep.id, url=ep.url, events=list(ep.events),
                       description=ep.description, created_at=ep.created_at,
                       disabled_at=ep.disabled_at, disabled_reason=ep.disabled_reason,
                       secret=ep.secret if show_secret else None)


@router.post("/v1/webhook-endpoints", status_code=201, response_model=EndpointOut,
             responses={201: {"links": {
                 "RotateSecret": link("/v1/webhook-endpoints/{endpoint_id}/rotate-secret",
                                      "post", "A new signing secret",
                                      endpoint_id="$response.body#/id"),
                 "DeleteEndpoint": link("/v1/webhook-endpoints/{endpoint_id}", "delete",
                                        "Remove the endpoint",
                                        endpoint_id="$response.body#/id")}},
                        409: {"model": ErrorResponse,
                              "description": "The tenant has as many endpoints as it may"}})
def create_endpoint(body: EndpointCreate, principal: CurrentPrincipal) -> EndpointOut:
    """Register a receiver for all of the tenant's jobs' chosen events. The signing secret
    (`whsec_...`) is in this response only. A tenant may register
    `AGENTQ_WEBHOOK_MAX_ENDPOINTS_PER_TENANT` endpoints (16); past that, 409."""
    settings = get_settings()
    check_url(body.url, allow_private=settings.webhooks_allow_private_networks)
    with transaction() as s:
        ep = webhook_repo.create_endpoint(s, principal.tenant_id, body.url,
                                          list(body.events), body.description,
                                          settings.webhook_max_endpoints_per_tenant)
        return _endpoint_out(ep, show_secret=True)


@router.get("/v1/webhook-endpoints", response_model=EndpointList)
def list_endpoints(session: DbSession, principal: CurrentPrincipal) -> EndpointList:
    return EndpointList(data=[_endpoint_out(e) for e in
                              webhook_repo.list_endpoints(session, principal.tenant_id)])


@router.post("/v1/webhook-endpoints/{endpoint_id}/rotate-secret", response_model=EndpointOut)
def rotate_secret(endpoint_id: str, principal: CurrentPrincipal) -> EndpointOut:
    """A new signing secret, shown once. For a grace period
    (`AGENTQ_WEBHOOK_SECRET_GRACE_HOURS`) deliveries carry signatures with both secrets."""
    with transaction() as s:
        return _endpoint_out(webhook_repo.rotate_secret(s, principal.tenant_id, endpoint_id,
                                                         rotate_grace()),
                             show_secret=True)


@router.delete("/v1/webhook-endpoints/{endpoint_id}", status_code=204)
def delete_endpoint(endpoint_id: str, principal: CurrentPrincipal) -> Response:
    with transaction() as s:
        webhook_repo.delete_endpoint(s, principal.tenant_id, endpoint_id)
    return Response(status_code=204)


def _delivery_out(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
    return DeliveryOut(
        id=d.id, webhook_id=d.message_id, endpoint_id=d.endpoint_id, url=d.url,
        event_type=d.event_type, event_cursor=d.event_seq, status=d.status,
        attempts=[AttemptOut(attempt=a.attempt, started_at=a.started_at,
                             duration_ms=a.duration_ms, status_code=a.status_code,
                             error=a.error, response_excerpt=a.response_excerpt)
                  for a in attempts],
        next_attempt_at=d.next_attempt_at, created_at=d.created_at,
        delivered_at=d.delivered_at)


@router.get("/v1/jobs/{job_id}/webhook-deliveries", response_model=DeliveryList)
def list_deliveries(job_id: str, session: DbSession, principal: CurrentPrincipal
                    ) -> DeliveryList:
    """Every webhook delivery of the job, with each attempt."""
    job = job_service.get_job(session, principal.tenant_id, job_id)
    return DeliveryList(data=[_delivery_out(d, a) for d, a in
                              webhook_repo.list_deliveries(session, job.id)])


@router.post("/v1/jobs/{job_id}/webhook-deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=DeliveryOut,
             responses={409: {"model": ErrorResponse,
                              "description": "An attempt at this delivery is being made"}})
def redeliver(job_id: str, delivery_id: str, principal: CurrentPrincipal) -> DeliveryOut:
    """Send a delivery again now (same `webhook-id`); 409 while an attempt at it is being
    made."""
    with transaction() as s:
        job = job_service.get_job(s, principal.tenant_id, job_id)
        d = webhook_repo.redeliver(s, principal.tenant_id, job.id, delivery_id, lease_s())
        return _delivery_out(d, [])
