"""The REST API: authentication, validation, tenant scoping, listing and cancellation
(without workers, so jobs stay where the API put them)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import auth

# Jobs must stay where the API put them: no worker may pick them up meanwhile.
pytestmark = pytest.mark.usefixtures("quiet_workers")

JOB = {"kind": "research", "input": {"query": "How do honey bees make honey?"},
       "budget": {"max_total_tokens": 5000}, "metadata": {"ticket": "T-1"}}


def test_every_v1_route_needs_a_key(client: TestClient) -> None:
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                         ("GET", "/v1/jobs/x/steps"), ("POST", "/v1/jobs/x/cancel")]:
        resp = client.request(method, path, json=JOB)
        assert resp.status_code == 401, (method, path)
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
    resp = client.get("/v1/jobs", headers=auth("aq_not-a-real-key"))
    assert resp.status_code == 401
    assert "unknown" in resp.json()["error"]["message"]


def test_revoked_key_is_refused(client: TestClient, agentq_env: dict[str, str]) -> None:
    from core.db import transaction
    from core.keys import create_key, revoke_key

    with transaction() as s:
        raw, key = create_key(s, "revoked-tenant")
        key_id = key.id
    assert client.get("/v1/jobs", headers=auth(raw)).status_code == 200
    with transaction() as s:
        assert revoke_key(s, key_id)
    assert client.get("/v1/jobs", headers=auth(raw)).status_code == 401


def test_keys_are_stored_only_as_hashes(client: TestClient, tenant_key: str) -> None:
    from sqlalchemy import select

    from core.db import transaction
    from core.models import ApiKey

    with transaction() as s:
        stored = list(s.scalars(select(ApiKey.key_hash)))
    assert tenant_key not in stored
    assert all(len(h) == 64 for h in stored)


def test_submit_answers_202_with_location(client: TestClient, tenant_key: str) -> None:
    resp = client.post("/v1/jobs", json=JOB, headers=auth(tenant_key))
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued"
    assert body["kind"] == "research"
    assert resp.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["metadata"] == {"ticket": "T-1"}
    assert body["budget"] == {"max_total_tokens": 5000}
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                             "model_calls": 0, "cost_usd": 0.0}
    got = client.get(resp.headers["location"], headers=auth(tenant_key))
    assert got.status_code == 200
    assert got.json()["id"] == body["id"]


def test_submit_writes_an_outbox_row_and_an_event(client: TestClient, tenant_key: str) -> None:
    from sqlalchemy import select

    from core.db import transaction
    from core.models import JobEvent, OutboxMessage, Step

    job_id = client.post("/v1/jobs", json=JOB, headers=auth(tenant_key)).json()["id"]
    with transaction() as s:
        events = list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)))
        step = s.scalars(select(Step).where(Step.job_id == job_id)).one()
        rows = [r for r in s.scalars(select(OutboxMessage)) if r.payload.get("step_id") == step.id]
    assert events == ["job.created"]
    assert step.role == "planner"
    assert step.status == "queued"
    assert len(rows) == 1
    assert rows[0].task == "steps.run"


def _error(resp: Any) -> str:
    assert resp.status_code == 422, resp.text
    return str(resp.json()["error"]["message"])


def test_validation_errors_name_the_field(client: TestClient, tenant_key: str) -> None:
    h = auth(tenant_key)
    assert "input.query" in _error(client.post("/v1/jobs", json={**JOB, "input": {}}, headers=h))
    assert "input.query" in _error(
        client.post("/v1/jobs", json={**JOB, "input": {"query": "x"}}, headers=h))
    assert "kind" in _error(client.post("/v1/jobs", json={**JOB, "kind": "poetry"}, headers=h))
    assert "budget.max_total_tokens" in _error(
        client.post("/v1/jobs", json={**JOB, "budget": {"max_total_tokens": -5}}, headers=h))
    assert "budget.max_total_tokens" in _error(
        client.post("/v1/jobs", json={**JOB, "budget": {"max_total_tokens": 10**12}}, headers=h))
    assert "input" in _error(client.post("/v1/jobs", json={"kind": "research"}, headers=h))
    assert "input.unknown" in _error(
        client.post("/v1/jobs", json={**JOB, "input": {"query": "abc?", "unknown": 1}},
                    headers=h))
    assert "NUL" in _error(client.post(
        "/v1/jobs", json={**JOB, "input": {"query": "bad\u0000query"}}, headers=h))
    assert "NUL" in _error(client.post(
        "/v1/jobs", json={**JOB, "metadata": {"k\u0000": "v"}}, headers=h))
    resp = client.post("/v1/jobs", content=b"{not json", headers={**h, "content-type":
                                                                  "application/json"})
    assert resp.status_code == 422


def test_odd_job_ids_are_404(client: TestClient, tenant_key: str) -> None:
    for job_id in ["job%00x", "x" * 300, "job_%E2%98%83"]:
        resp = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key))
        assert resp.status_code == 404, job_id
        resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
        assert resp.status_code == 404, job_id


def test_a_job_without_a_budget_gets_the_default(client: TestClient, tenant_key: str) -> None:
    body = {"kind": "research", "input": {"query": "Why is the sky blue?"}}
    resp = client.post("/v1/jobs", json=body, headers=auth(tenant_key))
    assert resp.status_code == 202
    assert resp.json()["budget"] == {"max_total_tokens": 20000}


def test_other_tenants_jobs_are_404(client: TestClient, tenant_key: str) -> None:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        other, _ = create_key(s, "someone-else")
    job_id = client.post("/v1/jobs", json=JOB, headers=auth(tenant_key)).json()["id"]
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/steps"),
                         ("POST", f"/v1/jobs/{job_id}/cancel")]:
        resp = client.request(method, path, headers=auth(other))
        assert resp.status_code == 404, (method, path)
        assert resp.json()["error"]["code"] == "not_found"
    assert job_id not in [j["id"] for j in
                          client.get("/v1/jobs", headers=auth(other)).json()["data"]]
    # and the job was not cancelled by the other tenant
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()["status"] == "queued"


def test_list_is_newest_first_with_cursor_and_status_filter(
        client: TestClient, tenant_key: str) -> None:
    h = auth(tenant_key)
    ids = [client.post("/v1/jobs", json=JOB, headers=h).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=h)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params, headers=h).json()
        assert len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=h).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    queued = client.get("/v1/jobs", params={"status": "queued"}, headers=h).json()["data"]
    assert [j["id"] for j in queued] == list(reversed(ids[1:]))
    assert client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=h).status_code == 422
    import base64
    import json

    for fields in (["0001-01-01T00:00:00+14:00", "job_x"], ["2026-01-01T00:00:00", "job_x"],
                   [1, 2], ["2026-01-01T00:00:00+00:00", "job x\u0000"]):
        odd = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()
        assert client.get("/v1/jobs", params={"cursor": odd}, headers=h).status_code == 422
    assert client.get("/v1/jobs", params={"status": "nope"}, headers=h).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}, headers=h).status_code == 422


def test_cancel_a_queued_job_cancels_its_unstarted_steps(
        client: TestClient, tenant_key: str) -> None:
    h = auth(tenant_key)
    job_id = client.post("/v1/jobs", json=JOB, headers=h).json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert resp.status_code == 202
    assert resp.json()["status"] == "cancelled"
    steps = client.get(f"/v1/jobs/{job_id}/steps", headers=h).json()["data"]
    assert [s["status"] for s in steps] == ["cancelled"]
    # cancelling again is harmless
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h).json()["status"] == "cancelled"


def test_health_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"]["ok"]
    assert checks["redis"]["ok"]
    assert checks["pool"]["ok"]
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/steps",
            "/v1/jobs/{job_id}/cancel", "/healthz", "/readyz"} <= set(spec["paths"])
    for name, schema in spec["components"]["schemas"].items():
        assert "examples" in schema, f"schema {name} has no example"
    post = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert post["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")


def test_keys_never_reach_the_logs(client: TestClient, tenant_key: str,
                                   caplog: Any) -> None:
    import logging

    with caplog.at_level(logging.DEBUG):
        client.get("/v1/jobs", headers=auth(tenant_key))
        client.get("/v1/jobs", headers=auth("aq_wrong-key-123"))
        client.post("/v1/jobs", json={"kind": "nope", "input": {}}, headers=auth(tenant_key))
    assert tenant_key not in caplog.text
    assert "aq_wrong-key-123" not in caplog.text


def test_admin_routes_need_an_admin_key(client: TestClient, tenant_key: str) -> None:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        admin, _ = create_key(s, "operators", admin=True)
    assert client.get("/v1/admin/tenants").status_code == 401
    denied = client.get("/v1/admin/tenants", headers=auth(tenant_key))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "forbidden"
    ok = client.get("/v1/admin/tenants", headers=auth(admin))
    assert ok.status_code == 200
    names = [t["name"] for t in ok.json()["data"]]
    assert "operators" in names
