"""Schemas of webhook endpoints and deliveries."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from api.jobs.schemas import TERMINAL_EVENTS, EventType


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://example.com/hooks/agentq", "events": ["job.completed", "job.failed"],
         "description": "production receiver"}]})

    url: str = Field(max_length=2048)
    events: list[EventType] = Field(default_factory=lambda: list(TERMINAL_EVENTS),
                                    min_length=1, max_length=22)
    description: str | None = Field(default=None, max_length=500)


class EndpointOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "whe_3c1d2e4f5a6b7c8d9e0f1a2b3c4d5e6f", "url": "https://example.com/hooks/agentq",
        "events": ["job.completed"], "description": None, "created_at": "2026-11-22T10:00:00Z",
        "disabled_at": None, "disabled_reason": None,
        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]})

    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None
    secret: str | None = Field(default=None, description="The signing secret; shown only when "
                               "the endpoint is created or its secret rotated.")


class EndpointList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[EndpointOut]


class AttemptOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "attempt": 1, "started_at": "2026-11-22T10:00:05Z", "duration_ms": 41.2,
        "status_code": 500, "error": None, "response_excerpt": "oops"}]})

    attempt: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_excerpt: str | None


class DeliveryOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "whd_0f1e2d3c4b5a69788796a5b4c3d2e1f0", "webhook_id": "msg_9a8b7c6d5e4f",
        "endpoint_id": None, "url": "https://example.com/hooks/agentq",
        "event_type": "job.completed", "event_cursor": 17, "status": "succeeded",
        "attempts": [], "next_attempt_at": None, "created_at": "2026-11-22T10:00:05Z",
        "delivered_at": "2026-11-22T10:00:06Z"}]})

    id: str
    webhook_id: str = Field(description="The `webhook-id` header; the same on every attempt.")
    endpoint_id: str | None
    url: str
    event_type: str
    event_cursor: int
    status: str = Field(description="pending, queued, delivering, succeeded or failed")
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[DeliveryOut]
