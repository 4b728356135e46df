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

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import transaction
from core.errors import Conflict, InvalidInput
from core.models import utcnow
from core.repositories import idempotency as keys
from core.repositories.idempotency import KeyStatus
from core.settings import get_settings

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
            with transaction() as s:
                keys.add_in_flight(s, tenant_id, key, request_hash)
            return None
        except IntegrityError:
            pass
        with transaction() as s:
            row = keys.get(s, tenant_id, key)
            if row is None:
                continue
            now = utcnow()
            expired = row.created_at < now - ttl
            stale = row.status == KeyStatus.IN_FLIGHT and \
                row.created_at < now - timedelta(seconds=STALE_IN_FLIGHT_S)
            if expired or stale:
                keys.remove(s, row)
                continue
            if row.request_hash != request_hash:
                raise InvalidInput("Idempotency-Key was already used with a different request "
                                   "body; use a new key for a new request",
                                   code="idempotency_key_reused")
            if row.status == KeyStatus.IN_FLIGHT:
                raise Conflict("a request with this Idempotency-Key is still in flight; retry "
                               "shortly", code="idempotency_in_flight")
            assert row.response_status is not None
            assert row.response_body is not None
            return StoredResponse(row.response_status, dict(row.response_body))
    raise Conflict("could not claim the Idempotency-Key; retry", code="idempotency_in_flight")


def complete(session: Session, tenant_id: str, key: str, status_code: int,
             body: dict[str, Any], job_id: str) -> None:
    """Store the response, in the transaction that created the job."""
    keys.complete(session, tenant_id, key, status_code, body, job_id)


def abandon(tenant_id: str, key: str) -> None:
    """The request failed before creating anything: the key may be used again."""
    with transaction() as s:
        keys.delete_in_flight(s, tenant_id, key)


def sweep_expired() -> int:
    cutoff = utcnow() - timedelta(hours=get_settings().idempotency_ttl_hours)
    with transaction() as s:
        return keys.delete_created_before(s, cutoff)
