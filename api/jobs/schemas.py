"""Request and response schemas of the jobs API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled",
                    "budget_exhausted"]
StepStatus = Literal["pending", "queued", "held", "deferred", "running", "completed",
                     "failed", "cancelled"]
ServiceTier = Literal["interactive", "standard", "flex"]

MAX_METADATA_BYTES = 8192


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class Budget(BaseModel):
    @field_validator("step_max_tokens")
    @classmethod
    def _step_budgets(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for role, tokens in (value or {}).items():
            if not 1 <= tokens <= 32_768:
                raise ValueError(f"{role}: must be between 1 and 32768 tokens")
        return value

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"max_total_tokens": 20000}]})

    max_total_tokens: int | None = Field(
        default=None, ge=100, le=10_000_000,
        description="The most tokens (prompt plus completion) the job may spend; never exceeded.",
        examples=[20000])
    max_cost_usd: float | None = Field(
        default=None, gt=0, le=100_000,
        description="The most dollars the job may spend (at the catalogue's prices); never "
                    "exceeded.", examples=[0.5])
    step_max_tokens: dict[str, int] | None = Field(
        default=None, max_length=20,
        description="max_tokens per model call by role (for example `{\"investigator\": "
                    "256}`); roles not named keep the configured defaults.",
        examples=[{"investigator": 256}])
    max_seconds: int | None = Field(
        default=None, ge=1, le=7 * 24 * 3600,
        description="Wall-clock limit from submission (or from the job's last "
                    "continuation); past it the job fails with `deadline_exceeded`.",
        examples=[600])


EventType = Literal["job.created", "job.started", "job.cancelling", "plan.ready",
                    "step.started", "step.waiting", "step.completed", "step.failed",
                    "step.cancelled",
                    "job.usage", "budget.threshold", "job.completed", "job.failed",
                    "job.cancelled", "job.budget_exhausted", "job.continued", "job.promoted",
                    "job.deferred", "batch.completed", "batch.failed", "batch.cancelled",
                    "batch.expired"]


TERMINAL_EVENTS: tuple[EventType, ...] = ("job.completed", "job.failed", "job.cancelled",
                                          "job.budget_exhausted")


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://example.com/hooks/agentq", "events": ["job.completed", "job.failed"]}]})

    url: str = Field(max_length=2048, description="Where to POST the job's events (http or "
                                                  "https, a public address).")
    events: list[EventType] = Field(
        default_factory=lambda: list(TERMINAL_EVENTS), min_length=1, max_length=22,
        description="Which events to send (default: the terminal ones).")


class WebhookOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"url": "https://example.com/hooks/agentq", "events": ["job.completed"],
         "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]})

    url: str
    events: list[str]
    secret: str | None = Field(default=None, description="The signing secret (Standard "
                               "Webhooks); shown only in the response that created the job.")


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "kind": "research",
            "input": {"query": "How do honey bees make honey?"},
            "budget": {"max_total_tokens": 20000},
            "metadata": {"ticket": "R-42"},
        }]},
    )

    kind: str = Field(max_length=40, description="The job kind, for example `research`.",
                      examples=["research"])
    input: dict[str, Any] = Field(description="The kind's input; for research, `{query}`.")
    budget: Budget = Field(default_factory=Budget)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=50,
                                     description="Free-form labels kept with the job.")
    webhook: WebhookSpec | None = Field(default=None, description="Send this job's events, "
                                        "signed, to a URL.")
    service_tier: ServiceTier = Field(
        default="standard",
        description="How soon the job is served: `interactive` goes first at the queue and "
                    "at the model pool, `standard` next, `flex` only on capacity the others "
                    "leave idle (priced at the operator's discount). A tenant may be limited "
                    "to some tiers (403 `tier_not_allowed`).", examples=["interactive"])
    deadline: datetime | None = Field(
        default=None,
        description="Flex jobs only: when the job should be done (an ISO 8601 time with a "
                    "zone, within 7 days). The job is promoted (scheduled as `standard`, still "
                    "priced as flex) when its estimated time to finish no longer fits; a "
                    "`job.promoted` event says when.", examples=["2026-12-01T06:00:00Z"])
    optimize: Literal["cost", "carbon"] | None = Field(
        default=None,
        description="Flex jobs with a deadline: wait for the cheapest (`cost`) or cleanest "
                    "(`carbon`) hour of the operator's grid schedule that still meets the "
                    "deadline. `planned_start` says when; `job.deferred` is sent.")

    @field_validator("input", "metadata")
    @classmethod
    def _no_nul(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _has_nul(value):
            raise ValueError("strings must not contain NUL characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
        return value


class JobContinue(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"budget": {"max_total_tokens": 40000,
                                                    "max_seconds": 600}}]},
    )

    budget: Budget = Field(
        default_factory=Budget,
        description="The job's new limits. Each limit given is the job's new TOTAL over its "
                    "whole life (what it has spent so far counts against it), not an amount "
                    "added, and must be above what the job has spent (else 422); limits left "
                    "out keep their current values; `step_max_tokens` replaces the roles it "
                    "names. `max_seconds` (given, or kept) counts from the continuation.")


class Progress(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"steps_total": 6, "steps_done": 2, "phase": "investigating"}]})

    steps_total: int
    steps_done: int
    phase: str


class UsageOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt_tokens": 410, "completion_tokens": 230, "total_tokens": 640,
         "model_calls": 3, "cost_usd": 0.0000435}]})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model_calls: int
    cost_usd: float | None = Field(default=None, description="Dollars spent, at the prices "
                                   "in force when each call was made.")


class ErrorOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"code": "budget_exhausted", "message": "the next model call needs up to 700 tokens, "
         "more than is left of the job's budget of 2000 tokens"}]})

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error the API returns."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "invalid_input", "message": "input.query: Field required"}}]})

    error: ErrorOut


_JOB_EXAMPLE: dict[str, Any] = {
    "id": "job_5f0c2b6f0e8e4a59a3f1c8d2e7b4a901", "kind": "research", "status": "running",
    "created_at": "2026-11-22T10:00:00Z", "updated_at": "2026-11-22T10:00:05Z",
    "started_at": "2026-11-22T10:00:01Z", "finished_at": None,
    "progress": {"steps_total": 6, "steps_done": 2, "phase": "investigating"},
    "usage": {"prompt_tokens": 410, "completion_tokens": 230, "total_tokens": 640,
              "model_calls": 3},
    "budget": {"max_total_tokens": 20000}, "metadata": {}, "result": None, "error": None,
}


class JobOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    kind: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    usage: UsageOut
    budget: dict[str, Any]
    metadata: dict[str, Any]
    service_tier: ServiceTier = "standard"
    deadline: datetime | None = None
    promoted_at: datetime | None = Field(default=None, description="When a flex job was "
                                         "promoted to meet its deadline.")
    optimize: str | None = None
    planned_start: datetime | None = Field(default=None, description="When a job that waits "
                                           "for a cheaper or cleaner hour is planned to start.")
    webhook: WebhookOut | None = None
    result: dict[str, Any] | None
    error: ErrorOut | None


class JobList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"data": [_JOB_EXAMPLE],
         "next_cursor": "WyIyMDI2LTExLTIyVDEwOjAwOjAwKzAwOjAwIiwgImpvYl8xIl0"}]})

    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at "
                                                "the end.")


_STEP_EXAMPLE: dict[str, Any] = {
    "id": "stp_0b8c6a4e9d2f4f7e8a1b3c5d7e9f1a2b", "key": "investigate-1", "role": "investigator",
    "status": "completed", "depends_on": ["plan"], "attempt": 1, "model": "gemma-3-270m",
    "max_tokens": 128,
    "usage": {"prompt_tokens": 53, "completion_tokens": 13, "total_tokens": 66,
              "model_calls": 1},
    "created_at": "2026-11-22T10:00:02Z", "started_at": "2026-11-22T10:00:02Z",
    "finished_at": "2026-11-22T10:00:04Z", "duration_ms": 2012.5, "error": None,
    "spawned_by": None,
}


class StepOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_STEP_EXAMPLE]})

    id: str
    key: str
    role: str
    status: StepStatus
    depends_on: list[str]
    attempt: int
    model: str | None
    max_tokens: int
    usage: UsageOut
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None
    error: str | None
    spawned_by: str | None = Field(
        default=None, description="For a sub-agent: the key of the step that spawned it (and "
                                  "waits for it).")


class StepList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_STEP_EXAMPLE]}]})

    data: list[StepOut]
