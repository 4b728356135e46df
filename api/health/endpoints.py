"""Liveness and readiness.

`/readyz` needs no key and says only whether each dependency answers; what went wrong (the
driver's error text, each pool endpoint's URL and models) is shown to admin keys only, and
logged. Pool endpoints are asked at most once per `AGENTQ_READYZ_POOL_CACHE_S` per process,
however often the probe is called.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import lookup_key
from core.db import transaction
from core.queue import is_amqp, ping_broker
from core.settings import get_settings
from inference.pool import get_pool

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


class _PoolProbe:
    """The pool endpoints' answers, asked at most once per cache period; concurrent callers
    wait for the one probe in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._endpoints: list[dict[str, Any]] = []

    def endpoints(self) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at >= get_settings().readyz_pool_cache_s:
                self._endpoints = get_pool().check()
                self._at = time.monotonic()
            return self._endpoints

    def forget(self) -> None:
        with self._lock:
            self._at = float("-inf")


pool_probe = _PoolProbe()


def _is_admin(request: Request) -> bool:
    """Whether the request carries an admin key (optional here, so not in the OpenAPI
    document's security requirements)."""
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        return False
    try:
        principal = lookup_key(header[7:].strip())
    except Exception:  # noqa: BLE001 - the database is down: the public answer, then
        return False
    return principal is not None and principal.is_admin


@router.get("/readyz", responses={503: {"description": "a dependency does not answer"}})
def readyz(request: Request) -> JSONResponse:
    """The database, Redis, the broker (where it is RabbitMQ) and at least one pool endpoint
    answer. With an admin key, also what failed and each pool endpoint's answer."""
    checks: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    try:
        # A transaction of its own, ended before the slower checks below.
        with transaction(read_only=True) as session:
            session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported as not ready
        checks["database"] = {"ok": False, "reason": "unreachable"}
        errors["database"] = str(exc)[:300]
    try:
        client = redis.Redis.from_url(get_settings().redis_url, socket_timeout=2,
                                      socket_connect_timeout=2)
        client.ping()
        client.close()
        checks["redis"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported as not ready
        checks["redis"] = {"ok": False, "reason": "unreachable"}
        errors["redis"] = str(exc)[:300]
    if is_amqp(get_settings().broker_url):
        try:
            ping_broker()
            checks["broker"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - reported as not ready
            checks["broker"] = {"ok": False, "reason": "unreachable"}
            errors["broker"] = str(exc)[:300]
    endpoints = pool_probe.endpoints()
    pool_ok = any(e["ok"] for e in endpoints)
    checks["pool"] = {"ok": pool_ok} if pool_ok else {"ok": False,
                                                       "reason": "no endpoint answers"}
    for name, error in errors.items():
        log.warning("readiness: %s: %s", name, error)
    if _is_admin(request):
        for name, error in errors.items():
            checks[name]["error"] = error
        checks["pool"]["endpoints"] = endpoints
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)
