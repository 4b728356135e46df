"""Operator reports read from the ledger (`model_calls`) and the step table.

Every figure is computed from ledger rows, so the admin page, its JSON and its CSV agree with
what the jobs were charged. The queries are in `core.repositories.reports` (sums and
percentiles) and `core.repositories.reports_counts`; here they become report rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.repositories import reports as repo
from core.repositories import reports_counts as counts
from core.repositories import steps as step_repo
from core.repositories.reports import NO_SUMS, GroupBy, ReportFilter, Sums


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    return num / den * scale if den else None


def _figures(s: Sums) -> dict[str, Any]:
    total = s.prompt_tokens + s.completion_tokens
    energy_wh, energy_calls = s.energy_wh, s.calls_with_energy
    return {
        "model_calls": s.calls,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": total,
        "cost_usd": float(s.cost_usd),
        "usd_per_million_tokens": _ratio(float(s.cost_usd), total, 1e6),
        "energy_wh": energy_wh if energy_calls else None,
        "calls_with_energy": energy_calls,
        "kwh_per_million_tokens": _ratio(energy_wh / 1000.0, total, 1e6) if energy_calls
        else None,
        "carbon_g": s.carbon_g if s.calls_with_carbon else None,
        # Over every call's tokens, as kWh per million tokens is.
        "gco2_per_million_tokens": _ratio(s.carbon_g, total, 1e6) if s.calls_with_carbon
        else None,
        # Output tokens per second of model-call time: how fast calls generate.
        "output_tokens_per_s": _ratio(s.completion_tokens, s.latency_ms / 1000.0),
        # Prompt tokens served from the prefix cache, over prompt tokens of the calls whose
        # server reported it.
        "prefix_cache_hit_rate": _ratio(s.cached_tokens, s.cached_known_tokens),
        "budget_truncations": s.truncations,
        "escalations": s.escalations,
        # Calls answered from the job's call cache (an identical earlier call): no cost.
        "call_cache_hits": s.call_cache_hits,
    }


def _latency_fields(call_lat: tuple[float, float] | None, ttft: tuple[float, float] | None,
                    step_lat: tuple[float, float] | None) -> dict[str, float | None]:
    return {
        "call_latency_ms_p50": call_lat[0] if call_lat else None,
        "call_latency_ms_p95": call_lat[1] if call_lat else None,
        "ttft_ms_p50": ttft[0] if ttft else None,
        "ttft_ms_p95": ttft[1] if ttft else None,
        "step_latency_ms_p50": step_lat[0] if step_lat else None,
        "step_latency_ms_p95": step_lat[1] if step_lat else None,
    }


def totals(session: Session, f: ReportFilter) -> dict[str, Any]:
    """One row of figures over everything the filter covers."""
    figures = _figures(repo.sums(session, f))
    call_lat = repo.percentiles(session, f, "call_latency_ms")
    ttft = repo.percentiles(session, f, "ttft_ms")
    step_lat = repo.percentiles(session, f, "step_latency_ms")
    return {**figures,
            **_latency_fields(call_lat.get(None), ttft.get(None), step_lat.get(None))}


def grouped(session: Session, f: ReportFilter, group: GroupBy = "tenant", *,
            limit: int | None = None) -> list[dict[str, Any]]:
    """Figures per tenant, job, model or day, largest spend first (days in date order)."""
    by_key = repo.sums_by(session, f, group)
    call_lat = repo.percentiles(session, f, "call_latency_ms", group)
    ttft = repo.percentiles(session, f, "ttft_ms", group)
    step_lat = repo.percentiles(session, f, "step_latency_ms", group)
    out = [{"key": k, **_figures(s),
            **_latency_fields(call_lat.get(k), ttft.get(k), step_lat.get(k))}
           for k, s in by_key.items()]
    if group == "day":
        out.sort(key=lambda r: str(r["key"]))
    else:
        out.sort(key=lambda r: (-r["cost_usd"], -r["total_tokens"], str(r["key"])))
    if limit is not None:
        out = out[:limit]
    _label(session, group, out)
    return out


def _label(session: Session, group: GroupBy, rows: list[dict[str, Any]]) -> None:
    """Add names and context to keyed rows (tenant names; job kind, status and tenant)."""
    keys = [r["key"] for r in rows]
    if group == "tenant" and keys:
        names = counts.tenant_names(session, keys)
        for r in rows:
            r["tenant_id"], r["tenant"] = r["key"], names.get(r["key"], r["key"])
    elif group == "job" and keys:
        info = counts.jobs_by_id(session, keys)
        names = counts.tenant_names(session)
        for r in rows:
            job = info.get(r["key"])
            r["job_id"] = r["key"]
            if job is not None:
                r.update(kind=job.kind, status=job.status, tenant_id=job.tenant_id,
                         tenant=names.get(job.tenant_id, job.tenant_id),
                         created_at=job.created_at.isoformat())
    elif group == "model":
        for r in rows:
            r["model"] = r["key"]
    elif group == "day":
        for r in rows:
            r["day"] = r["key"]


def tenants_overview(session: Session, f: ReportFilter) -> list[dict[str, Any]]:
    """Every tenant (also those with no spend in range) with figures and jobs by status."""
    spend = {r["key"]: r for r in grouped(session, f, "tenant")}
    jobs = counts.job_counts_by_tenant(session, f.since, f.until)
    empty = {**_figures(NO_SUMS), **_latency_fields(None, None, None)}
    out = []
    for tenant in counts.tenants(session):
        row = dict(spend.get(tenant.id) or {**empty})
        row.update(key=tenant.id, tenant_id=tenant.id, tenant=tenant.name,
                   jobs=jobs.get(tenant.id, {}))
        out.append(row)
    out.sort(key=lambda r: (-r["cost_usd"], -r["total_tokens"], r["tenant"]))
    return out


def job_steps(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The job's steps in creation order, each with the figures of its ledger rows."""
    steps = step_repo.list_for_job(session, job_id)
    by_step = {step_id: _figures(s) for step_id, s in repo.sums_by_step(session, job_id).items()}
    empty = _figures(NO_SUMS)
    out = []
    for st in steps:
        seconds = ((st.finished_at - st.started_at).total_seconds()
                   if st.finished_at and st.started_at else None)
        out.append({"step_id": st.id, "key": st.key, "role": st.role, "status": st.status,
                    "attempt": st.attempt, "max_tokens": st.max_tokens, "model": st.model,
                    "step_latency_ms": seconds * 1000 if seconds is not None else None,
                    **by_step.get(st.id, empty)})
    return out


CALL_COLUMNS = ("request_id", "created_at", "tenant_id", "job_id", "step_id", "role", "turn",
                "model",
                "endpoint", "prompt_tokens", "cached_tokens", "completion_tokens",
                "total_tokens", "max_tokens", "finish_reason", "latency_ms", "ttft_ms",
                "attempts", "cache_hit", "escalated_from", "cached_from", "cost_usd",
                "energy_wh", "energy_method")


def calls(session: Session, f: ReportFilter, limit: int = 1000) -> list[dict[str, Any]]:
    """Ledger rows, oldest first."""
    out = []
    for c in repo.calls(session, f, limit):
        out.append({
            "request_id": c.request_id, "created_at": c.created_at.isoformat(),
            "tenant_id": c.tenant_id, "job_id": c.job_id, "step_id": c.step_id, "role": c.role,
            "turn": c.turn,
            "tool_calls": [t.get("name", "") for t in c.tool_calls or []],
            "model": c.model, "endpoint": c.endpoint, "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens, "max_tokens": c.max_tokens,
            "finish_reason": c.finish_reason, "latency_ms": c.latency_ms, "ttft_ms": c.ttft_ms,
            "attempts": c.attempts, "cache_hit": c.cache_hit, "escalated_from": c.escalated_from,
            "cached_from": c.cached_from,
            "cost_usd": float(c.cost_usd) if c.cost_usd is not None else None,
            "energy_wh": c.energy_wh, "energy_method": c.energy_method,
        })
    return out
