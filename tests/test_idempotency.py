"""Idempotent submission with `Idempotency-Key` (no workers needed)."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.models import Job
from tests.helpers import auth

JOB = {"kind": "research", "input": {"query": "How do tides work?"},
       "budget": {"max_total_tokens": 5000}}


def jobs_of(tenant_key: str) -> int:
    from core.keys import authenticate

    with transaction() as s:
        principal = authenticate(s, tenant_key)
        assert principal is not None
        return int(s.scalar(select(func.count()).select_from(Job)
                            .where(Job.tenant_id == principal.tenant_id)) or 0)


def test_same_key_same_body_returns_the_first_response(client: TestClient,
                                                       tenant_key: str) -> None:
    h = {**auth(tenant_key), "Idempotency-Key": "order-1"}
    first = client.post("/v1/jobs", json=JOB, headers=h)
    assert first.status_code == 202
    again = client.post("/v1/jobs", json=JOB, headers=h)
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert jobs_of(tenant_key) == 1


def test_same_key_other_body_is_422(client: TestClient, tenant_key: str) -> None:
    h = {**auth(tenant_key), "Idempotency-Key": "order-2"}
    assert client.post("/v1/jobs", json=JOB, headers=h).status_code == 202
    other = client.post("/v1/jobs", json={**JOB, "input": {"query": "Something else?"}},
                        headers=h)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_keys_are_per_tenant(client: TestClient, tenant_key: str) -> None:
    from core.keys import create_key

    with transaction() as s:
        other, _ = create_key(s, "idem-other-tenant")
    a = client.post("/v1/jobs", json=JOB, headers={**auth(tenant_key), "Idempotency-Key": "k"})
    b = client.post("/v1/jobs", json=JOB, headers={**auth(other), "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_a_request_that_failed_validation_does_not_burn_the_key(
        client: TestClient, tenant_key: str) -> None:
    h = {**auth(tenant_key), "Idempotency-Key": "order-3"}
    bad = client.post("/v1/jobs", json={**JOB, "kind": "nope"}, headers=h)
    assert bad.status_code == 422
    assert client.post("/v1/jobs", json=JOB, headers=h).status_code == 202


def test_bad_keys_are_422(client: TestClient, tenant_key: str) -> None:
    resp = client.post("/v1/jobs", json=JOB,
                       headers={**auth(tenant_key), "Idempotency-Key": "x" * 300})
    assert resp.status_code == 422


def test_in_flight_key_is_409(client: TestClient, tenant_key: str) -> None:
    from core.keys import authenticate
    from orchestrator import idempotency

    with transaction() as s:
        principal = authenticate(s, tenant_key)
        assert principal is not None
    # another request holds the key: recorded, its job not written yet
    from api.jobs.schemas import JobCreate

    body = JobCreate.model_validate(JOB).model_dump(mode="json")
    assert idempotency.begin(principal.tenant_id, "order-4",
                             idempotency.fingerprint(body)) is None
    resp = client.post("/v1/jobs", json=JOB, headers={**auth(tenant_key),
                                                      "Idempotency-Key": "order-4"})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "idempotency_in_flight"


def test_fifty_concurrent_identical_requests_create_one_job(api_server: str,
                                                            tenant_key: str) -> None:
    h = {**auth(tenant_key), "Idempotency-Key": "burst-1"}
    barrier = threading.Barrier(50)
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=api_server, timeout=60) as http:
            barrier.wait()
            r = http.post("/v1/jobs", json=JOB, headers=h)
        with lock:
            results.append((r.status_code, r.json().get("id")))

    threads = [threading.Thread(target=post) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = Counter(code for code, _ in results)
    assert len(results) == 50
    assert set(codes) <= {202, 409}, codes
    assert jobs_of(tenant_key) == 1
    ids = {job_id for code, job_id in results if code == 202}
    assert len(ids) == 1
    # once the first has finished, every retry gets the same job
    again = httpx.post(f"{api_server}/v1/jobs", json=JOB, headers=h, timeout=30)
    assert again.status_code == 202
    assert again.json()["id"] in ids
