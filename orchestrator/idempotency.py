"""Idempotent submission (`Idempotency-Key`), per tenant.

The first request with a key records it as in flight in its own short transaction; the job and the
stored response are then written in one transaction. A later request with the same key and body
gets the stored response; with another body, 422; while the first is still in flight, 409. A key
left in flight by a process that died is taken over after `STALE_IN_FLIGHT_S`. Keys are kept for
`AGENTQ_IDEMPOTENCY_TTL_HOURS` (24 h by default) and then swept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, InvalidInput
from core.models import IdempotencyKey, utcnow
from core.settings import get_settings
from orchestrator.uow import unit_of_work

STALE_IN_FLIGHT_S = 120
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key: must be 1 to {MAX_KEY_LENGTH} printable "
                           "characters")
    return key


def begin(tenant_id: str, key: str, request_hash: str) -> StoredResponse | None:
    """Claim the key for this request, or return the response stored for it."""
    ttl = timedelta(hours=get_settings().idempotency_ttl_hours)
    for _ in range(3):
        try:
            with unit_of_work() as s:
                s.add(IdempotencyKey(tenant_id=tenant_id, key=key, request_hash=request_hash,
                                     status="in_flight"))
            return None
        except IntegrityError:
            pass
        with unit_of_work() as s:
            row = s.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                        IdempotencyKey.key == key))
            if row is None:
                continue
            now = utcnow()
            expired = row.created_at < now - ttl
            stale = row.status == "in_flight" and \
                row.created_at < now - timedelta(seconds=STALE_IN_FLIGHT_S)
            if expired or stale:
                s.delete(row)
                continue
            if row.request_hash != request_hash:
                raise InvalidInput("Idempotency-Key was already used with a different request "
                                   "body; use a new key for a new request",
                                   code="idempotency_key_reused")
            if row.status == "in_flight":
                raise Conflict("a request with this Idempotency-Key is still in flight; retry "
                               "shortly", code="idempotency_in_flight")
            assert row.response_status is not None
            assert row.response_body is not None
            return StoredResponse(row.response_status, dict(row.response_body))
    raise Conflict("could not claim the Idempotency-Key; retry", code="idempotency_in_flight")


def complete(session: Session, tenant_id: str, key: str, status_code: int,
             body: dict[str, Any], job_id: str) -> None:
    """Store the response, in the transaction that created the job."""
    session.execute(update(IdempotencyKey).where(
        IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key,
        IdempotencyKey.status == "in_flight",
    ).values(status="done", response_status=status_code, response_body=body, job_id=job_id))


def abandon(tenant_id: str, key: str) -> None:
    """The request failed before creating anything: the key may be used again."""
    with unit_of_work() as s:
        s.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                               IdempotencyKey.key == key,
                                               IdempotencyKey.status == "in_flight"))


def sweep_expired() -> int:
    cutoff = utcnow() - timedelta(hours=get_settings().idempotency_ttl_hours)
    with unit_of_work() as s:
        res = s.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]
