"""Operator routes under `/v1/admin`: they need a key with the admin scope.

Every report answers JSON by default and CSV with `?format=csv`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminPrincipal, DbSession
from api.jobs.schemas import ErrorResponse
from api.params import UtcDateTime
from api.responses import ERRORS, Responses
from core.errors import InvalidInput, NotFound
from core.repositories import jobs as job_repo
from core.repositories.reports import GroupBy, ReportFilter, energy_methods
from orchestrator import reports
from orchestrator.grid_report import scheduling

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses={
    **ERRORS, 403: {"model": ErrorResponse, "description": "The key has no admin scope"}})

Format = Literal["json", "csv"]
Since = Annotated[UtcDateTime | None, Query(description="Calls made at or after this time")]
Until = Annotated[UtcDateTime | None, Query(description="Calls made before this time")]
FormatQuery = Annotated[Format, Query(description="`json` (default) or `csv`")]


FIGURES_EXAMPLE: dict[str, Any] = {
    "model_calls": 12, "prompt_tokens": 900, "cached_tokens": 300, "completion_tokens": 300,
    "total_tokens": 1200, "cost_usd": 0.0001, "usd_per_million_tokens": 0.083,
    "energy_wh": 0.05, "calls_with_energy": 12, "kwh_per_million_tokens": 0.042,
    "carbon_g": 0.0125, "gco2_per_million_tokens": 10.4,
    "output_tokens_per_s": 21.5, "prefix_cache_hit_rate": 0.33, "budget_truncations": 1,
    "escalations": 0, "call_cache_hits": 0}
LATENCY_EXAMPLE: dict[str, Any] = {
    "call_latency_ms_p50": 900.0, "call_latency_ms_p95": 2100.0, "ttft_ms_p50": 120.0,
    "ttft_ms_p95": 400.0, "step_latency_ms_p50": 1000.0, "step_latency_ms_p95": 2500.0}


class Figures(BaseModel):
    """Ledger figures over a set of model calls."""

    model_config = ConfigDict(json_schema_extra={"examples": [FIGURES_EXAMPLE]})

    model_calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    usd_per_million_tokens: float | None
    energy_wh: float | None
    calls_with_energy: int
    kwh_per_million_tokens: float | None
    carbon_g: float | None = Field(default=None, description="Grams of CO2 of the calls with "
                                   "energy and the grid's carbon intensity recorded")
    gco2_per_million_tokens: float | None = None
    output_tokens_per_s: float | None
    prefix_cache_hit_rate: float | None
    budget_truncations: int
    escalations: int
    call_cache_hits: int


class LatencyFigures(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [LATENCY_EXAMPLE]})

    call_latency_ms_p50: float | None
    call_latency_ms_p95: float | None
    ttft_ms_p50: float | None
    ttft_ms_p95: float | None
    step_latency_ms_p50: float | None
    step_latency_ms_p95: float | None


class Totals(Figures, LatencyFigures):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {**FIGURES_EXAMPLE, **LATENCY_EXAMPLE}]})


class UsageRow(Totals):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {**FIGURES_EXAMPLE, **LATENCY_EXAMPLE, "key": "gemma-3-270m", "model": "gemma-3-270m"}]})

    key: str
    tenant_id: str | None = None
    tenant: str | None = None
    job_id: str | None = None
    kind: str | None = None
    status: str | None = None
    created_at: str | None = None
    model: str | None = None
    day: str | None = None


class UsageReport(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "group_by": "model", "since": None, "until": None, "energy_methods": {"unknown": 3},
        "totals": {}, "data": []}]})

    group_by: GroupBy
    since: datetime | None
    until: datetime | None
    energy_methods: dict[str, int]
    totals: Totals
    data: list[UsageRow]


class TenantUsage(Totals):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {**FIGURES_EXAMPLE, **LATENCY_EXAMPLE, "id": "ten_1", "name": "acme",
         "jobs": {"completed": 3}}]})

    id: str
    name: str
    jobs: dict[str, int]


class TenantUsageList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[TenantUsage]


class StepUsage(Figures):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {**FIGURES_EXAMPLE, "step_id": "stp_1", "key": "plan", "role": "planner",
         "status": "completed", "attempt": 1, "max_tokens": 160, "model": "gemma-3-270m",
         "step_latency_ms": 1200.0}]})

    step_id: str
    key: str
    role: str
    status: str
    attempt: int
    max_tokens: int
    model: str | None
    step_latency_ms: float | None


CALL_EXAMPLE: dict[str, Any] = {
    "request_id": "stp_1:0", "created_at": "2026-11-22T05:00:00+00:00", "tenant_id": "ten_1",
    "job_id": "job_1", "step_id": "stp_1", "role": "planner", "turn": None,
    "tool_calls": [], "model": "gemma-3-270m",
    "endpoint": "http://127.0.0.1:8100", "prompt_tokens": 80, "cached_tokens": 64,
    "completion_tokens": 30, "total_tokens": 110, "max_tokens": 160, "finish_reason": "stop",
    "latency_ms": 900.0, "ttft_ms": 120.0, "attempts": 1, "cache_hit": True,
    "escalated_from": None, "cached_from": None, "cost_usd": 0.000005, "energy_wh": 0.004,
    "energy_method": "declared_watts"}


class CallRow(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CALL_EXAMPLE]})

    request_id: str
    created_at: str
    tenant_id: str
    job_id: str
    step_id: str
    role: str
    turn: int | None = Field(description="The call's turn in its step's agent loop, from 1; "
                                         "null for a call outside a loop.")
    tool_calls: list[str] = Field(description="The names of the tools the model called.")
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int | None
    completion_tokens: int
    total_tokens: int
    max_tokens: int
    finish_reason: str | None
    latency_ms: float
    ttft_ms: float | None
    attempts: int
    cache_hit: bool | None
    escalated_from: str | None
    cached_from: str | None
    cost_usd: float | None
    energy_wh: float | None
    energy_method: str | None


class JobDrillDown(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": "job_1", "tenant_id": "ten_1", "kind": "research", "status": "completed",
         "totals": {**FIGURES_EXAMPLE, **LATENCY_EXAMPLE}, "steps": [], "calls": [CALL_EXAMPLE]}]})

    job_id: str
    tenant_id: str
    kind: str
    status: str
    totals: Totals
    steps: list[StepUsage]
    calls: list[CallRow]


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as CSV with a header line; nested values (jobs by status) are left out."""
    cols = list(columns or (rows[0].keys() if rows else []))
    cols = [c for c in cols if not rows or not isinstance(rows[0].get(c), dict)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in cols})
    return buf.getvalue()


def csv_response(rows: Sequence[dict[str, Any]], filename: str,
                 columns: Sequence[str] | None = None) -> Response:
    # Only characters any header can carry: the name may hold an id the request gave.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    return Response(to_csv(rows, columns), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{safe}"'})


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and until <= since:
        raise InvalidInput("'until' must be later than 'since'")


# With `?format=csv` every report answers CSV.
CSV: Responses = {200: {"content": {"text/csv": {"schema": {"type": "string"}}}}}


@router.get("/tenants", response_model=TenantUsageList, responses=CSV)
def list_tenants(session: DbSession, _: AdminPrincipal, since: Since = None, until: Until = None,
                 format: FormatQuery = "json") -> Any:
    """Every tenant with its spend, latency figures and jobs by status."""
    _check_range(since, until)
    rows = reports.tenants_overview(session, ReportFilter(since=since, until=until))
    for r in rows:
        r["id"], r["name"] = r["tenant_id"], r["tenant"]
    if format == "csv":
        return csv_response(rows, "tenants.csv")
    return {"data": rows}


@router.get("/usage", response_model=UsageReport, responses=CSV)
def usage_report(
    session: DbSession,
    _: AdminPrincipal,
    group_by: Annotated[GroupBy, Query(description="tenant, job, model or day")] = "tenant",
    since: Since = None,
    until: Until = None,
    tenant_id: Annotated[str | None, Query(max_length=40)] = None,
    job_id: Annotated[str | None, Query(max_length=40)] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    format: FormatQuery = "json",
) -> Any:
    """Tokens, cost, energy, latency percentiles, cache hit rate, truncations and escalations,
    grouped by tenant, job, model or day, from the ledger."""
    _check_range(since, until)
    f = ReportFilter(since=since, until=until, tenant_id=tenant_id, job_id=job_id, model=model)
    rows = reports.grouped(session, f, group_by, limit=limit)
    if format == "csv":
        return csv_response(rows, f"usage-by-{group_by}.csv")
    return {"group_by": group_by, "since": since, "until": until,
            "energy_methods": energy_methods(session, f),
            "totals": reports.totals(session, f), "data": rows}


@router.get("/jobs/{job_id}", response_model=JobDrillDown, responses=CSV)
def job_drill_down(session: DbSession, _: AdminPrincipal, job_id: str,
                   format: FormatQuery = "json") -> Any:
    """One job of any tenant: its figures, its steps and every model call (CSV: the calls)."""
    job = job_repo.get(session, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    f = ReportFilter(job_id=job_id)
    calls = reports.calls(session, f, limit=100_000)
    if format == "csv":
        return csv_response(calls, f"job-{job_id}-calls.csv", reports.CALL_COLUMNS)
    return {"job_id": job.id, "tenant_id": job.tenant_id, "kind": job.kind,
            "status": job.status, "totals": reports.totals(session, f),
            "steps": reports.job_steps(session, job_id), "calls": calls}


class SchedulingReport(BaseModel):
    """Deadlines (jobs submitted in the range) and what flex jobs that waited for a window
    saved against running each call at its job's submission hour (same calls, same schedule:
    a counterfactual)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "deadline_jobs": 40, "deadline_misses": 0, "jobs_promoted": 3, "window_jobs": 12,
        "window_calls": 480, "window_energy_wh": 2.4, "window_power_usd": 0.00023,
        "window_power_usd_at_submission": 0.00036, "window_carbon_g": 0.56,
        "window_carbon_g_at_submission": 0.84, "window_power_saving": 0.36,
        "window_carbon_saving": 0.33}]})

    deadline_jobs: int
    deadline_misses: int
    jobs_promoted: int
    window_jobs: int
    window_calls: int
    window_energy_wh: float
    window_power_usd: float
    window_power_usd_at_submission: float
    window_carbon_g: float
    window_carbon_g_at_submission: float
    window_power_saving: float | None
    window_carbon_saving: float | None


@router.get("/scheduling", response_model=SchedulingReport)
def scheduling_report(session: DbSession, _: AdminPrincipal, since: Since = None,
                      until: Until = None, tenant_id: Annotated[str | None, Query(
                          max_length=40)] = None) -> Any:
    """Deadline misses and promotions, and the saving of flex jobs' windows."""
    _check_range(since, until)
    return scheduling(session, ReportFilter(since=since, until=until, tenant_id=tenant_id))
