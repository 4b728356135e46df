"""Limits: per-tenant rate limits, the cap on jobs in flight, body size (also chunked), and
maximum lengths."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from limits import parse

from api.limits import rate_limiter
from core.settings import get_settings
from tests.helpers import auth

JOB = {"kind": "completion", "input": {"prompt": "hello"}}


def other_key(name: str) -> str:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, name)
    return raw


def test_rate_limit_answers_429_with_retry_after(client: TestClient, tenant_key: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rate_limiter._get()
    monkeypatch.setattr(rate_limiter, "_item", parse("5/minute"))
    codes = [client.get("/v1/jobs", headers=auth(tenant_key)).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    resp = client.get("/v1/jobs", headers=auth(tenant_key))
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    # another tenant has its own allowance
    assert client.get("/v1/jobs", headers=auth(other_key("rate-other"))).status_code == 200


def test_jobs_in_flight_are_capped_per_tenant(client: TestClient, tenant_key: str,
                                              standin: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    standin.state.delay_s = 10  # whether or not a worker runs, the first two stay in flight
    monkeypatch.setattr(get_settings(), "max_jobs_in_flight", 2)
    h = auth(tenant_key)
    ids = [client.post("/v1/jobs", json=JOB, headers=h).json()["id"] for _ in range(2)]
    third = client.post("/v1/jobs", json=JOB, headers=h)
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "too_many_jobs_in_flight"
    assert "retry-after" in third.headers
    assert client.post("/v1/jobs", json=JOB, headers=auth(other_key("cap-other"))
                       ).status_code == 202
    for i in ids:
        client.post(f"/v1/jobs/{i}/cancel", headers=h)


@pytest.fixture
def small_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_body_bytes", 2000)


@pytest.mark.usefixtures("small_bodies")
def test_bodies_over_the_limit_are_413(client: TestClient, tenant_key: str) -> None:
    big = {"kind": "completion", "input": {"prompt": "x" * 3000}}
    resp = client.post("/v1/jobs", json=big, headers=auth(tenant_key))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


@pytest.mark.usefixtures("small_bodies")
def test_chunked_bodies_over_the_limit_are_413(api_server: str, tenant_key: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"kind": "completion", "input": {"prompt": "'
        for _ in range(30):
            yield b"y" * 100
        yield b'"}}'

    resp = httpx.post(f"{api_server}/v1/jobs", content=chunks(), timeout=30,
                      headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    small = httpx.post(f"{api_server}/v1/jobs", timeout=30,
                       content=iter([b'{"kind": "completion", ', b'"input": {"prompt": "ok"}}']),
                       headers={**auth(tenant_key), "Content-Type": "application/json"})
    assert small.status_code == 202, small.text


@pytest.mark.parametrize("body", [
    {"kind": "research", "input": {"query": "q" * 2001}},
    {"kind": "completion", "input": {"prompt": "p" * 32001}},
    {"kind": "completion", "input": {"prompt": "p", "stop": ["a"] * 5}},
    {"kind": "completion", "input": {"prompt": "p"}, "metadata": {str(i): i for i in range(51)}},
    {"kind": "completion", "input": {"prompt": "p"}, "metadata": {"k": "v" * 9000}},
    {"kind": "k" * 41, "input": {}},
    {"kind": "completion", "input": {"prompt": "p"}, "webhook": {"url": "u" * 2049}},
])
def test_strings_and_lists_have_maximum_lengths(client: TestClient, tenant_key: str,
                                                body: dict[str, Any]) -> None:
    resp = client.post("/v1/jobs", json=body, headers=auth(tenant_key))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["message"]
