"""`/v1/usage`: the tenant's own spend, from the ledger."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from api.deps import CurrentPrincipal, DbSession
from api.params import UtcDateTime
from api.responses import ERRORS
from orchestrator.usage import tenant_usage

router = APIRouter(tags=["usage"], responses=ERRORS)


class ModelUsage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "gemma-3-270m", "model_calls": 12, "prompt_tokens": 900,
         "completion_tokens": 300, "total_tokens": 1200}]})

    model: str
    model_calls: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt_tokens": 900, "completion_tokens": 300, "total_tokens": 1200,
         "model_calls": 12, "by_model": [], "jobs": {"completed": 3}}]})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model_calls: int
    by_model: list[ModelUsage]
    jobs: dict[str, int]


@router.get("/v1/usage", response_model=UsageReport)
def usage(
    session: DbSession,
    principal: CurrentPrincipal,
    since: Annotated[UtcDateTime | None, Query(description="From this time (ISO 8601)")] = None,
    until: Annotated[UtcDateTime | None, Query(description="Before this time (ISO 8601)")] = None,
) -> Any:
    """Tokens and model calls spent by this tenant's jobs, by model, and its jobs by status."""
    return tenant_usage(session, principal.tenant_id, since, until)
