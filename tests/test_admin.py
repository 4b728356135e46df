"""The operator's view: `/v1/admin/...` JSON and CSV, and the `/admin` page, against the ledger."""

from __future__ import annotations

import csv
import io
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.keys import create_key
from core.models import ModelCall, Step
from core.repositories.reports import percentile
from tests.helpers import auth, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def admin_key(agentq_env: dict[str, str]) -> str:
    with transaction() as s:
        raw, _ = create_key(s, f"ops-{secrets.token_hex(3)}", admin=True)
    return raw


@pytest.fixture(scope="module")
def spend(client: TestClient, agentq_env: dict[str, str], worker: Any) -> dict[str, Any]:
    """Two tenants with finished jobs: a research job and two completions."""
    keys = {}
    for name in ("alpha", "beta"):
        with transaction() as s:
            keys[name], _ = create_key(s, f"{name}-{secrets.token_hex(3)}")
    jobs = [
        client.post("/v1/jobs", headers=auth(keys["alpha"]), json={
            "kind": "research", "input": {"query": "How do tides work?"}}).json()["id"],
        client.post("/v1/jobs", headers=auth(keys["beta"]), json={
            "kind": "completion", "input": {"prompt": "Say hello", "max_tokens": 4}}).json()["id"],
        client.post("/v1/jobs", headers=auth(keys["beta"]), json={
            "kind": "completion", "input": {"prompt": "Say hello again"}}).json()["id"],
    ]
    owners = [keys["alpha"], keys["beta"], keys["beta"]]
    for job_id, key in zip(jobs, owners, strict=True):
        assert wait_for_job(client, key, job_id, timeout=60)["status"] == "completed"
    return {"keys": keys, "jobs": jobs}


def ledger_sums(**where: str) -> dict[str, Any]:
    with transaction() as s:
        cond = [getattr(ModelCall, k) == v for k, v in where.items()]
        prompt, completion, calls, cost, energy = s.execute(select(
            func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
            func.coalesce(func.sum(ModelCall.completion_tokens), 0), func.count(),
            func.coalesce(func.sum(ModelCall.cost_usd), 0),
            func.coalesce(func.sum(ModelCall.energy_wh), 0.0)).where(*cond)).one()
        latencies = sorted(s.scalars(select(ModelCall.latency_ms).where(*cond)))
    return {"prompt_tokens": int(prompt), "completion_tokens": int(completion),
            "total_tokens": int(prompt) + int(completion), "model_calls": int(calls),
            "cost_usd": float(cost or 0), "energy_wh": float(energy or 0),
            "latencies": latencies}


def tenant_of(key: str) -> str:
    from core.keys import authenticate

    with transaction() as s:
        principal = authenticate(s, key)
        assert principal is not None
        return principal.tenant_id


def test_ledger_rows_carry_ttft_cache_hit_and_energy(spend: dict[str, Any]) -> None:
    with transaction() as s:
        rows = list(s.scalars(select(ModelCall).where(ModelCall.job_id.in_(spend["jobs"]))))
    assert rows
    for r in rows:
        assert r.ttft_ms is not None
        assert 0 < r.ttft_ms <= r.latency_ms
        assert r.cache_hit is not None
        assert r.energy_method == "declared_watts"
        assert r.energy_wh is not None
        assert r.energy_wh > 0
        # Never more than the endpoint's whole power for the call's whole duration.
        assert r.energy_wh <= 120 * r.latency_ms / 1000 / 3600 * 1.01
    # The research job's prompts share their long instructions: later calls hit the cache.
    assert any(r.cache_hit for r in rows)


def test_admin_usage_by_tenant_matches_the_ledger(client: TestClient, admin_key: str,
                                                  spend: dict[str, Any]) -> None:
    body = client.get("/v1/admin/usage", headers=auth(admin_key),
                      params={"group_by": "tenant"}).json()
    everything = ledger_sums()
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "model_calls"):
        assert body["totals"][name] == everything[name], name
    assert body["totals"]["cost_usd"] == pytest.approx(everything["cost_usd"], abs=1e-9)
    assert body["totals"]["energy_wh"] == pytest.approx(everything["energy_wh"], rel=1e-9)
    assert body["totals"]["call_latency_ms_p50"] == pytest.approx(
        percentile(everything["latencies"], 0.5))
    assert body["totals"]["call_latency_ms_p95"] == pytest.approx(
        percentile(everything["latencies"], 0.95))
    rows = {r["key"]: r for r in body["data"]}
    for name in ("alpha", "beta"):
        tenant_id = tenant_of(spend["keys"][name])
        mine = ledger_sums(tenant_id=tenant_id)
        assert rows[tenant_id]["total_tokens"] == mine["total_tokens"]
        assert rows[tenant_id]["tenant"].startswith(name)
        assert rows[tenant_id]["call_latency_ms_p95"] == pytest.approx(
            percentile(mine["latencies"], 0.95))
        assert rows[tenant_id]["step_latency_ms_p50"] > 0
        assert rows[tenant_id]["ttft_ms_p50"] > 0
        kwh = mine["energy_wh"] / 1000 / mine["total_tokens"] * 1e6
        assert rows[tenant_id]["kwh_per_million_tokens"] == pytest.approx(kwh, rel=1e-9)
    assert sum(r["total_tokens"] for r in body["data"]) == everything["total_tokens"]
    assert body["energy_methods"].get("declared_watts", 0) > 0


@pytest.mark.parametrize("group_by", ["job", "model", "day"])
def test_every_grouping_adds_up_to_the_totals(client: TestClient, admin_key: str,
                                              spend: dict[str, Any], group_by: str) -> None:
    body = client.get("/v1/admin/usage", headers=auth(admin_key),
                      params={"group_by": group_by}).json()
    for name in ("total_tokens", "model_calls", "budget_truncations"):
        assert sum(r[name] for r in body["data"]) == body["totals"][name], name
    assert sum(r["cost_usd"] for r in body["data"]) == pytest.approx(body["totals"]["cost_usd"])
    if group_by == "day":
        today = datetime.now(UTC).date().isoformat()
        assert today in {r["day"] for r in body["data"]}
    if group_by == "job":
        jobs = {r["job_id"]: r for r in body["data"]}
        for job_id in spend["jobs"]:
            assert jobs[job_id]["total_tokens"] == ledger_sums(job_id=job_id)["total_tokens"]
            assert jobs[job_id]["status"] == "completed"


def test_filters_and_date_ranges(client: TestClient, admin_key: str,
                                 spend: dict[str, Any]) -> None:
    future = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    body = client.get("/v1/admin/usage", headers=auth(admin_key),
                      params={"since": future}).json()
    assert body["totals"]["total_tokens"] == 0
    assert body["data"] == []
    tenant_id = tenant_of(spend["keys"]["beta"])
    body = client.get("/v1/admin/usage", headers=auth(admin_key),
                      params={"group_by": "job", "tenant_id": tenant_id}).json()
    assert {r["job_id"] for r in body["data"]} == set(spend["jobs"][1:])
    bad = client.get("/v1/admin/usage", headers=auth(admin_key),
                     params={"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"})
    assert bad.status_code == 422
    assert "until" in bad.json()["error"]["message"]
    assert client.get("/v1/admin/usage", headers=auth(admin_key),
                      params={"group_by": "planet"}).status_code == 422


def test_csv_export_has_the_same_figures(client: TestClient, admin_key: str,
                                         spend: dict[str, Any]) -> None:
    resp = client.get("/v1/admin/usage", headers=auth(admin_key),
                      params={"group_by": "model", "format": "csv"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert sum(int(r["total_tokens"]) for r in rows) == ledger_sums()["total_tokens"]
    assert "call_latency_ms_p95" in rows[0]
    calls = client.get(f"/v1/admin/jobs/{spend['jobs'][0]}", headers=auth(admin_key),
                       params={"format": "csv"})
    call_rows = list(csv.DictReader(io.StringIO(calls.text)))
    assert len(call_rows) == ledger_sums(job_id=spend["jobs"][0])["model_calls"]
    assert {"request_id", "ttft_ms", "energy_wh", "energy_method"} <= set(call_rows[0])


def test_job_drill_down_adds_up(client: TestClient, admin_key: str,
                                spend: dict[str, Any]) -> None:
    job_id = spend["jobs"][0]
    body = client.get(f"/v1/admin/jobs/{job_id}", headers=auth(admin_key)).json()
    assert body["totals"]["total_tokens"] == ledger_sums(job_id=job_id)["total_tokens"]
    assert sum(s["total_tokens"] for s in body["steps"]) == body["totals"]["total_tokens"]
    assert len(body["calls"]) == body["totals"]["model_calls"]
    with transaction() as s:
        roles = set(s.scalars(select(Step.role).where(Step.job_id == job_id)))
    assert {s["role"] for s in body["steps"]} == roles
    assert client.get("/v1/admin/jobs/job_nope", headers=auth(admin_key)).status_code == 404


def test_admin_routes_need_the_admin_scope(client: TestClient, tenant_key: str) -> None:
    assert client.get("/v1/admin/usage").status_code == 401
    assert client.get("/v1/admin/usage", headers=auth(tenant_key)).status_code == 403


@pytest.fixture
def page_client(agentq_env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import app

    with TestClient(app, follow_redirects=False) as c:
        yield c


def test_admin_page_signs_in_and_shows_the_ledger(page_client: TestClient, admin_key: str,
                                                  tenant_key: str,
                                                  spend: dict[str, Any]) -> None:
    first = page_client.get("/admin")
    assert first.status_code == 303
    assert first.headers["location"].startswith("/admin/login")
    refused = page_client.post("/admin/login", data={"key": tenant_key})
    assert refused.status_code == 403
    assert "admin scope" in refused.text
    ok = page_client.post("/admin/login", data={"key": admin_key, "next": "https://evil/"})
    assert ok.status_code == 303
    assert ok.headers["location"] == "/admin"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    page = page_client.get("/admin")
    assert page.status_code == 200
    shown = re.search(r'data-figure="total_tokens" data-value="(\d+)"', page.text)
    assert shown is not None
    assert int(shown.group(1)) == ledger_sums()["total_tokens"]
    assert 'data-chart="spend-per-day"' in page.text
    assert "Energy method" in page.text
    assert "http://" not in page.text.split("<main>")[0]  # nothing loaded from elsewhere
    job_id = spend["jobs"][0]
    job_page = page_client.get(f"/admin/jobs/{job_id}")
    assert job_page.status_code == 200
    step_id = re.search(r'data-step-id="([^"]+)"', job_page.text)
    assert step_id is not None
    step_page = page_client.get(f"/admin/jobs/{job_id}/steps/{step_id.group(1)}")
    assert step_page.status_code == 200
    assert "data-call-id" in step_page.text
    export = page_client.get("/admin/export.csv", params={"group_by": "day"})
    assert export.status_code == 200
    assert export.text.startswith("key,")
    assert page_client.get("/admin", params={"since": "2026-13-01"}).status_code == 422
    assert page_client.post("/admin/logout").status_code == 303


def scrape(client: TestClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                       float]:
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all((k, val) in lab for k, val in labels.items()))


def test_prometheus_metrics_agree_with_the_ledger(client: TestClient, spend: dict[str, Any]
                                                  ) -> None:
    from core.models import Job

    samples = scrape(client)
    sums = ledger_sums()
    assert total(samples, "agentq_tokens_total", type="prompt") == sums["prompt_tokens"]
    assert total(samples, "agentq_tokens_total", type="completion") == sums["completion_tokens"]
    assert total(samples, "agentq_model_calls_total") == sums["model_calls"]
    assert total(samples, "agentq_cost_usd_total") == pytest.approx(sums["cost_usd"])
    with transaction() as s:
        completed = s.scalar(select(func.count()).select_from(Job)
                             .where(Job.status == "completed"))
    assert total(samples, "agentq_jobs", status="completed") == completed
    assert total(samples, "agentq_database_up") == 1
    assert total(samples, "agentq_redis_up") == 1
    assert ("agentq_queue_depth", (("queue", "agentq"),)) in samples
    # Read from the endpoint's own counters: the stand-in reports prefix-cache hits.
    assert total(samples, "agentq_endpoint_up") == 1
    rate = total(samples, "agentq_endpoint_prefix_cache_hit_rate")
    assert 0 < rate < 1


def test_metrics_show_calls_in_flight_across_worker_processes(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """The worker process publishes its in-flight calls; the API's /metrics adds them up."""
    from tests.helpers import wait_until

    # Every answer is held (up to 60 s) until the test lets them go below.
    with standin.state.lock:
        standin.state.hold_timeout_s = 60
        standin.state.hold_until_running = 10**6
    prompts = [f"q{i}" for i in range(8)]
    job = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": prompts, "max_tokens": 4}}).json()
    try:
        wait_until(lambda: total(scrape(client), "agentq_pool_in_flight") >= 4, 45,
                   what="in-flight calls to show in /metrics")
    except AssertionError as exc:
        job_now = client.get(f"/v1/jobs/{job['id']}", headers=auth(tenant_key)).json()
        samples = {k: v for k, v in scrape(client).items() if "pool" in k[0]}
        raise AssertionError(f"{exc}: {samples}; job {job_now['status']} "
                             f"{job_now['progress']}; stand-in running "
                             f"{standin.state.running}") from None
    finally:
        standin.state.hold_until_running = 0
    assert wait_for_job(client, tenant_key, job["id"])["status"] == "completed"
    wait_until(lambda: total(scrape(client), "agentq_pool_in_flight") == 0, 20,
               what="in-flight calls to drain")


def test_metrics_can_require_a_token(client: TestClient) -> None:
    from core.settings import get_settings

    settings = get_settings()
    settings.metrics_token = "scrape-secret"
    try:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert scrape(client, Authorization="Bearer scrape-secret")
    finally:
        settings.metrics_token = None
