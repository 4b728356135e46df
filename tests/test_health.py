"""`/readyz`: without an admin key it says only whether each dependency answers (no driver
errors, no internal URLs); an admin key sees the details; the pool is probed at most once per
cache period however often the probe is called."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import auth


@pytest.fixture(scope="module")
def admin_key(agentq_env: dict[str, str]) -> str:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, f"ready-admin-{secrets.token_hex(3)}", admin=True)
    return raw


@pytest.fixture
def fresh_probe() -> None:
    from api.health.endpoints import pool_probe

    pool_probe.forget()


def _models_asked(standin: Any) -> int:
    return int(httpx.get(f"{standin.url}/_stats", timeout=10).json()["models_requests_total"])


def test_redis_down_is_reported_without_its_error_text(
        client: TestClient, admin_key: str, tenant_key: str, standin: Any,
        monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    from core.settings import get_settings

    # A real refused connection: nothing listens on port 1.
    monkeypatch.setattr(get_settings(), "redis_url", "redis://127.0.0.1:1/0")
    for headers in ({}, auth(tenant_key), {"Authorization": "Bearer nonsense"}):
        public = client.get("/readyz", headers=headers)
        assert public.status_code == 503
        assert public.json() == {"status": "not_ready", "checks": {
            "database": {"ok": True}, "redis": {"ok": False, "reason": "unreachable"},
            "pool": {"ok": True}}}
        assert "127.0.0.1" not in public.text
    detailed = client.get("/readyz", headers=auth(admin_key))
    assert detailed.status_code == 503
    checks = detailed.json()["checks"]
    assert "127.0.0.1:1" in checks["redis"]["error"]
    assert [e["endpoint"] for e in checks["pool"]["endpoints"]] == [standin.url]


def test_database_down_is_reported_without_its_error_text(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        fresh_probe: None) -> None:
    from core.settings import get_settings

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(get_settings(), "database_url", f"sqlite:///{blocker}/agentq.db")
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["database"] == {"ok": False, "reason": "unreachable"}
    assert "not-a-folder" not in resp.text


def test_the_pool_is_probed_once_per_cache_period(client: TestClient, standin: Any,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   fresh_probe: None) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "readyz_pool_cache_s", 3600.0)
    before = _models_asked(standin)
    for _ in range(25):
        assert client.get("/readyz").status_code == 200
    assert _models_asked(standin) - before == 1
    monkeypatch.setattr(get_settings(), "readyz_pool_cache_s", 0.0)
    for _ in range(3):
        assert client.get("/readyz").status_code == 200
    assert _models_asked(standin) - before == 4
