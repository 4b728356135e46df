"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from core.db import transaction
from core.settings import get_settings
from inference.pool import get_pool

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency does not answer"}})
def readyz() -> JSONResponse:
    """The database, Redis and at least one pool endpoint answer."""
    checks: dict[str, Any] = {}
    try:
        # A transaction of its own, ended before the slower checks below.
        with transaction(read_only=True) as session:
            session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": str(exc)[:300]}
    try:
        client = redis.Redis.from_url(get_settings().redis_url, socket_timeout=2,
                                      socket_connect_timeout=2)
        client.ping()
        client.close()
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "error": str(exc)[:300]}
    endpoints = get_pool().check()
    checks["pool"] = {"ok": any(e["ok"] for e in endpoints), "endpoints": endpoints}
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)
