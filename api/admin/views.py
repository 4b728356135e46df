"""The admin page: `/admin`, server-rendered HTML with inline SVG charts.

Sign-in takes an admin key once and starts a signed session (`api.admin.session`: an HttpOnly,
SameSite=Strict cookie scoped to `/admin` that names the key by its id, never holds it, and
expires); a `Bearer` header works too. Everything the page shows comes from
`orchestrator.reports` and `core.repositories.reports`, the same functions behind
`/v1/admin/...`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.admin import session as admin_session
from api.admin.charts import bar_chart, line_chart
from api.admin.endpoints import csv_response
from api.admin.gantt import gantt
from api.admin.session import COOKIE
from api.deps import DbSession
from core.errors import InvalidInput, NotFound
from core.keys import Principal, authenticate, get_tenant
from core.repositories import jobs as job_repo
from core.repositories import steps as step_repo
from core.repositories.reports import GroupBy, ReportFilter, day_range, energy_methods
from core.settings import get_settings
from orchestrator import reports
from orchestrator.grid_report import scheduling
from orchestrator.timeline import job_timeline

DEFAULT_DAYS = 30

router = APIRouter(prefix="/admin", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


class NeedsSignIn(Exception):
    """The page needs an admin key: answered with a redirect to the sign-in form."""


def sign_in_redirect(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    resp = RedirectResponse("/admin/login?" + urlencode({"next": target}), status_code=303)
    if request.cookies.get(COOKIE):
        admin_session.end(resp)
    return resp


def _fmt_int(v: Any) -> str:
    return "–" if v is None else f"{int(v):,}"


def _fmt_usd(v: Any) -> str:
    if v is None:
        return "–"
    return f"${v:,.2f}" if abs(v) >= 100 else f"${v:,.6f}"


def _fmt_num(v: Any, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _fmt_sig(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}"


def _fmt_pct(v: Any) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


templates.env.filters.update(int=_fmt_int, usd=_fmt_usd, num=_fmt_num, sig=_fmt_sig,
                             pct=_fmt_pct)


def admin_principal(request: Request, session: DbSession) -> Principal:
    header = request.headers.get("authorization", "")
    principal: Principal | None = None
    if header.lower().startswith("bearer "):
        principal = authenticate(session, header[7:].strip())
    elif request.cookies.get(COOKIE):
        principal = admin_session.principal(session, request.cookies[COOKIE])
    if principal is None or not principal.is_admin:
        raise NeedsSignIn()
    return principal


def _range(since: date | None, until: date | None) -> tuple[date, date, ReportFilter]:
    today = datetime.now(UTC).date()
    until = until or today
    if until >= date.max:
        raise InvalidInput(f"until: must be before {date.max.isoformat()}")
    since = since or date.fromordinal(max(1, until.toordinal() - (DEFAULT_DAYS - 1)))
    if until < since:
        raise InvalidInput("the end of the date range is before its start")
    return since, until, day_range(since, until)


DateQuery = Annotated[date | None, Query(description="YYYY-MM-DD (UTC)")]


def _render(request: Request, template: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {
        "energy_note": _energy_note(), **context})


def _energy_note() -> str:
    settings = get_settings()
    declared = ", ".join(f"{url} = {watts:g} W"
                         for url, watts in sorted(settings.endpoint_watts.items()))
    return ("A call's energy is its share of its endpoint's busy time (each second with calls "
            "in flight is divided equally among them, over every worker process) multiplied by "
            "the endpoint's power: "
            + (f"declared watts ({declared})" if declared else "no power declared")
            + ("; NVML board power where a local endpoint runs on NVIDIA GPUs"
               if settings.energy_nvml else "")
            + ". Calls with no known power have no energy and are left out of kWh figures.")


def _daily_charts(days: list[dict[str, Any]]) -> dict[str, Any]:
    labels = [str(d["day"]) for d in days]
    return {
        "spend_chart": bar_chart("spend-per-day", "Spend per day (USD)", labels,
                                 [d["cost_usd"] for d in days], fmt=".3g"),
        "tokens_chart": bar_chart("tokens-per-day", "Tokens per day", labels,
                                  [d["total_tokens"] for d in days], fmt=".3g"),
        "latency_chart": line_chart("latency", "Model-call latency per day (ms)", labels, {
            "p50": [d["call_latency_ms_p50"] for d in days],
            "p95": [d["call_latency_ms_p95"] for d in days],
            "TTFT p50": [d["ttft_ms_p50"] for d in days]}),
    }


def _query(since: date, until: date, **extra: str) -> str:
    return urlencode({"since": since.isoformat(), "until": until.isoformat(), **extra})


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/admin") -> HTMLResponse:  # noqa: A002
    return _render(request, "login.html", error=None, next=_safe_next(next))


def _safe_next(target: str) -> str:
    """Only paths of this page are followed after sign-in (no open redirect)."""
    ok = (target.startswith("/admin") and "//" not in target and "\\" not in target
          and target.isprintable())  # no control characters (header injection)
    return target if ok else "/admin"


@router.post("/login", response_model=None)
def login(request: Request, session: DbSession, key: Annotated[str, Form(max_length=200)],
          next: Annotated[str, Form(max_length=2000)] = "/admin",  # noqa: A002
          ) -> Response:
    principal = authenticate(session, key.strip())
    if principal is None or not principal.is_admin:
        error = ("unknown or revoked key" if principal is None
                 else "this key has no admin scope")
        page = _render(request, "login.html", error=error, next=_safe_next(next))
        page.status_code = 401 if principal is None else 403
        return page
    resp = RedirectResponse(_safe_next(next), status_code=303)
    admin_session.start(request, resp, principal)
    return resp


@router.post("/logout")
def logout(request: Request) -> RedirectResponse:
    resp = RedirectResponse("/admin/login", status_code=303)
    admin_session.end(resp, request.cookies.get(COOKIE))
    return resp


@router.get("", response_class=HTMLResponse)
def overview(request: Request, session: DbSession, since: DateQuery = None,
             until: DateQuery = None) -> HTMLResponse:
    admin_principal(request, session)
    since, until, f = _range(since, until)
    days = reports.grouped(session, f, "day")
    return _render(
        request, "overview.html", since=since, until=until, q=_query(since, until),
        totals=reports.totals(session, f), tenants=reports.tenants_overview(session, f),
        models=reports.grouped(session, f, "model"), days=days,
        methods=energy_methods(session, f), sched=scheduling(session, f),
        **_daily_charts(days))


@router.get("/tenants/{tenant_id}", response_class=HTMLResponse)
def tenant_page(request: Request, session: DbSession, tenant_id: str, since: DateQuery = None,
                until: DateQuery = None) -> HTMLResponse:
    admin_principal(request, session)
    tenant = get_tenant(session, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    since, until, base = _range(since, until)
    f = ReportFilter(since=base.since, until=base.until, tenant_id=tenant_id)
    days = reports.grouped(session, f, "day")
    return _render(
        request, "tenant.html", tenant=tenant, since=since, until=until,
        q=_query(since, until), totals=reports.totals(session, f),
        jobs=reports.grouped(session, f, "job", limit=500),
        models=reports.grouped(session, f, "model"), days=days,
        methods=energy_methods(session, f), **_daily_charts(days))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, session: DbSession, job_id: str) -> HTMLResponse:
    admin_principal(request, session)
    job = job_repo.get(session, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    f = ReportFilter(job_id=job_id)
    timeline = job_timeline(session, job)
    return _render(request, "job.html", job=job, tenant=get_tenant(session, job.tenant_id),
                   totals=reports.totals(session, f), steps=reports.job_steps(session, job_id),
                   methods=energy_methods(session, f), timeline=timeline,
                   timeline_chart=gantt(timeline))


@router.get("/jobs/{job_id}/steps/{step_id}", response_class=HTMLResponse)
def step_page(request: Request, session: DbSession, job_id: str, step_id: str) -> HTMLResponse:
    admin_principal(request, session)
    step = step_repo.get(session, step_id)
    if step is None or step.job_id != job_id:
        raise NotFound(f"no step {step_id!r} in job {job_id!r}")
    job = job_repo.get(session, job_id)
    f = ReportFilter(job_id=job_id, step_id=step_id)
    return _render(request, "step.html", job=job, step=step, calls=reports.calls(session, f),
                   figures=reports.totals(session, f),
                   tenant=get_tenant(session, job.tenant_id) if job else None)


@router.get("/export.csv")
def export(request: Request, session: DbSession,
           group_by: Annotated[GroupBy | None, Query()] = None,
           since: DateQuery = None, until: DateQuery = None,
           tenant_id: Annotated[str | None, Query(max_length=40)] = None,
           job_id: Annotated[str | None, Query(max_length=40)] = None) -> Response:
    """CSV of what a table on the page shows: grouped figures, or a job's calls."""
    admin_principal(request, session)
    if job_id is not None:
        calls = reports.calls(session, ReportFilter(job_id=job_id), limit=100_000)
        return csv_response(calls, f"job-{job_id}-calls.csv", reports.CALL_COLUMNS)
    since, until, base = _range(since, until)
    f = ReportFilter(since=base.since, until=base.until, tenant_id=tenant_id)
    rows = (reports.tenants_overview(session, f) if group_by in (None, "tenant")
            and tenant_id is None else reports.grouped(session, f, group_by or "job"))
    name = f"usage-by-{group_by or 'tenant'}-{since}-{until}.csv"
    return csv_response(rows, name)
