"""Idempotent submission with `Idempotency-Key` (no workers needed)."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.models import Job
from tests.helpers import auth, wait_until

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
    assert isinstance(idempotency.begin(principal.tenant_id, "order-4",
                                        idempotency.fingerprint(body)), idempotency.Claim)
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


def _tenant_id(key: str) -> str:
    from core.keys import authenticate

    with transaction() as s:
        principal = authenticate(s, key)
        assert principal is not None
        return principal.tenant_id


@contextmanager
def tenant_locked(tenant_id: str) -> Iterator[Callable[[], None]]:
    """Hold the tenant's submission lock, so that submissions wait inside their job-writing
    transaction (slow requests, for real) until `release()` is called."""
    from core.db import session_factory
    from core.repositories import jobs

    session = session_factory()()
    jobs.lock_tenant(session, tenant_id)
    done = {"released": False}

    def release() -> None:
        if not done["released"]:
            done["released"] = True
            session.rollback()
            session.close()

    try:
        yield release
    finally:
        release()


def key_row(tenant_id: str, key: str) -> dict[str, Any] | None:
    from sqlalchemy import text

    with transaction() as s:
        row = s.execute(text(
            "SELECT owner, status, lease_expires_at, lease_expires_at < now() AS lapsed, "
            "now() AS now FROM idempotency_keys WHERE tenant_id = :t AND key = :k"),
            {"t": tenant_id, "k": key}).mappings().first()
        return dict(row) if row is not None else None


def _post(base: str, key: str, idem: str, out: dict[str, Any]) -> None:
    r = httpx.post(f"{base}/v1/jobs", json=JOB, timeout=120,
                   headers={**auth(key), "Idempotency-Key": idem})
    out["status"], out["body"] = r.status_code, r.json()


def test_a_slow_first_request_keeps_its_key(api_server: str, tenant_key: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request waits inside its transaction for many of its leases; the second, sent
    meanwhile, is told the first is in flight instead of taking the key over."""
    from core.settings import get_settings

    lease = 1.0
    monkeypatch.setattr(get_settings(), "idempotency_lease_s", lease)
    tenant_id = _tenant_id(tenant_key)
    first: dict[str, Any] = {}
    with tenant_locked(tenant_id) as release:
        thread = threading.Thread(target=_post, args=(api_server, tenant_key, "slow-1", first))
        thread.start()
        claimed = wait_until(lambda: key_row(tenant_id, "slow-1"), 30, what="the claim")
        # Wait on the lease's own renewals until the first lease is long over.
        wait_until(lambda: (r := key_row(tenant_id, "slow-1")) is not None
                   and r["lease_expires_at"] > claimed["lease_expires_at"]
                   + timedelta(seconds=3 * lease) and not r["lapsed"], 30,
                   what="the lease to be renewed past three leases")
        second = httpx.post(f"{api_server}/v1/jobs", json=JOB, timeout=60,
                            headers={**auth(tenant_key), "Idempotency-Key": "slow-1"})
        assert second.status_code == 409, second.text
        assert second.json()["error"]["code"] == "idempotency_in_flight"
        release()
        thread.join(timeout=60)
    assert first["status"] == 202, first
    assert jobs_of(tenant_key) == 1
    again = httpx.post(f"{api_server}/v1/jobs", json=JOB, timeout=60,
                       headers={**auth(tenant_key), "Idempotency-Key": "slow-1"})
    assert again.status_code == 202
    assert again.json()["id"] == first["body"]["id"]


def test_a_request_that_lost_its_key_creates_nothing(
        agentq_env: dict[str, str], api_server: str, tenant_key: str,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The first request's API process freezes inside its job-writing transaction (SIGSTOP)
    until its lease runs out; a second request with the key takes it over. When the first
    process thaws it must not write its job: one key, one job."""
    from bench.common import start_api
    from core.settings import get_settings

    lease = 1.0
    monkeypatch.setattr(get_settings(), "idempotency_lease_s", lease)
    base, proc = start_api({**agentq_env, "AGENTQ_IDEMPOTENCY_LEASE_S": str(lease)},
                           tmp_path / "api.log")
    tenant_id = _tenant_id(tenant_key)
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    try:
        with tenant_locked(tenant_id) as release:
            a = threading.Thread(target=_post, args=(base, tenant_key, "frozen-1", first))
            a.start()
            claimed = wait_until(lambda: key_row(tenant_id, "frozen-1"), 30, what="the claim")
            # Wait until the first process sits in its transaction, queued on the lock.
            wait_until(lambda: _waiting_on_locks() >= 1, 30, what="the first request to wait")
            os.kill(proc.popen.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: (r := key_row(tenant_id, "frozen-1")) is not None
                           and r["lapsed"], 30, what="the frozen request's lease to run out")
                b = threading.Thread(target=_post,
                                     args=(api_server, tenant_key, "frozen-1", second))
                b.start()
                wait_until(lambda: (r := key_row(tenant_id, "frozen-1")) is not None
                           and r["owner"] != claimed["owner"], 30,
                           what="the second request to take the key over")
                release()
            finally:
                os.kill(proc.popen.pid, signal.SIGCONT)
            a.join(timeout=60)
            b.join(timeout=60)
    finally:
        proc.stop()
    assert first["status"] == 409, first
    assert first["body"]["error"]["code"] == "idempotency_in_flight"
    assert second["status"] == 202, second
    assert jobs_of(tenant_key) == 1
    again = httpx.post(f"{api_server}/v1/jobs", json=JOB, timeout=60,
                       headers={**auth(tenant_key), "Idempotency-Key": "frozen-1"})
    assert again.json()["id"] == second["body"]["id"]


def _waiting_on_locks() -> int:
    from sqlalchemy import text

    with transaction() as s:
        return int(s.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")) or 0)
