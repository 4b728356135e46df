"""Idempotency keys: a tenant's `Idempotency-Key`, in flight and then with its response."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.models import IdempotencyKey


class KeyStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # claimed; its job is not written yet
    DONE = "done"  # the response is stored


def add_in_flight(session: Session, tenant_id: str, key: str, request_hash: str) -> None:
    """Claim the key; IntegrityError when the tenant holds it already."""
    session.add(IdempotencyKey(tenant_id=tenant_id, key=key, request_hash=request_hash,
                               status=KeyStatus.IN_FLIGHT))
    session.flush()


def get(session: Session, tenant_id: str, key: str) -> IdempotencyKey | None:
    return session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                       IdempotencyKey.key == key))


def remove(session: Session, row: IdempotencyKey) -> None:
    session.delete(row)
    session.flush()


def complete(session: Session, tenant_id: str, key: str, status_code: int,
             body: dict[str, Any], job_id: str) -> None:
    """Store the response of the key still in flight."""
    session.execute(update(IdempotencyKey).where(
        IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key,
        IdempotencyKey.status == KeyStatus.IN_FLIGHT,
    ).values(status=KeyStatus.DONE, response_status=status_code, response_body=body,
             job_id=job_id))


def delete_in_flight(session: Session, tenant_id: str, key: str) -> None:
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                 IdempotencyKey.key == key,
                                                 IdempotencyKey.status == KeyStatus.IN_FLIGHT))


def delete_created_before(session: Session, cutoff: datetime) -> int:
    """Delete the keys created before `cutoff`; how many there were."""
    res = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
