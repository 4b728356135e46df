"""`/v1/usage` shows a tenant its own spend only: another tenant's calls, tokens and jobs never
appear in it, whatever the time range, also for an admin key (whose tenant is its own)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.helpers import auth


def tenant_with_spend(client: TestClient, calls: int, tokens: int, model: str,
                      admin: bool = False) -> str:
    """A new tenant's key, with a job and `calls` ledger rows of `tokens` prompt tokens."""
    from core.db import transaction
    from core.keys import create_key
    from core.models import Job, Step
    from core.repositories import ledger

    with transaction() as s:
        key, _ = create_key(s, f"usage-{secrets.token_hex(4)}", admin=admin)
    job_id = client.post("/v1/jobs", headers=auth(key), json={
        "kind": "completion", "input": {"prompt": "Say hello"}}).json()["id"]
    with transaction() as s:
        tenant = str(s.scalar(select(Job.tenant_id).where(Job.id == job_id)))
        step = str(s.scalar(select(Step.id).where(Step.job_id == job_id).limit(1)))
        ledger.insert_calls(s, [
            {"request_id": f"{step}:u:{i}", "tenant_id": tenant, "job_id": job_id,
             "step_id": step, "role": "generator", "model": model, "endpoint": "http://u",
             "prompt_tokens": tokens, "completion_tokens": 1, "max_tokens": 8,
             "latency_ms": 1.0, "output_text": "x", "cost_usd": Decimal("0.000001")}
            for i in range(calls)])
    return key


def usage(client: TestClient, key: str, **params: str) -> dict[str, Any]:
    resp = client.get("/v1/usage", headers=auth(key), params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


@pytest.fixture
def own_database(agentq_env: dict[str, str]) -> Iterator[None]:
    """A database of its own: the ledger rows written here would show in other tests' global
    sums."""
    from tests.backends import fresh_postgres

    with fresh_postgres():
        yield


def test_a_tenant_sees_only_its_own_usage(client: TestClient, own_database: None) -> None:
    shared_model = f"shared-{secrets.token_hex(3)}"
    a = tenant_with_spend(client, calls=7, tokens=100, model=shared_model)
    b = tenant_with_spend(client, calls=3, tokens=10, model=shared_model)
    admin = tenant_with_spend(client, calls=2, tokens=1, model=shared_model, admin=True)
    for key, calls, tokens in ((a, 7, 100), (b, 3, 10), (admin, 2, 1)):
        for params in ({}, {"since": "2000-01-01T00:00:00Z"},
                       {"since": "2000-01-01T00:00:00Z", "until": "9000-01-01T00:00:00Z"}):
            body = usage(client, key, **params)
            assert body["model_calls"] == calls, (key, params, body)
            assert body["prompt_tokens"] == calls * tokens
            assert body["completion_tokens"] == calls
            assert [m["model"] for m in body["by_model"]] == [shared_model]
            assert body["by_model"][0]["model_calls"] == calls
            assert sum(body["jobs"].values()) == 1
