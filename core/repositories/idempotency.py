"""Idempotency keys: a tenant's `Idempotency-Key`, in flight and then with its response.

A key in flight is held by one request (its `owner` token) under a lease on the database's
clock; the holder renews the lease while it runs, and only the holder may store the response
or give the key up."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from core.db import db_now
from core.models import IdempotencyKey


class KeyStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # claimed; its job is not written yet
    DONE = "done"  # the response is stored


K = IdempotencyKey


def add_in_flight(session: Session, tenant_id: str, key: str, request_hash: str, owner: str,
                  lease_s: float) -> None:
    """Claim the key; IntegrityError when the tenant holds it already."""
    session.add(IdempotencyKey(tenant_id=tenant_id, key=key, request_hash=request_hash,
                               status=KeyStatus.IN_FLIGHT, owner=owner,
                               lease_expires_at=db_now(session, lease_s)))
    session.flush()


def get(session: Session, tenant_id: str, key: str) -> IdempotencyKey | None:
    return session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                       IdempotencyKey.key == key))


def remove(session: Session, row: IdempotencyKey) -> None:
    session.delete(row)
    session.flush()


def remove_if_lapsed(session: Session, tenant_id: str, key: str, lease_s: float) -> bool:
    """Take the key from a holder whose lease ran out (rows claimed before leases existed count
    from their creation); False when it is held and alive, or already gone."""
    res = session.execute(delete(K).where(
        K.tenant_id == tenant_id, K.key == key, K.status == KeyStatus.IN_FLIGHT,
        or_(K.lease_expires_at < db_now(session),
            K.lease_expires_at.is_(None) & (K.created_at < db_now(session, -lease_s)))))
    return bool(res.rowcount)  # type: ignore[attr-defined]


def renew(session: Session, owners: Sequence[str], lease_s: float) -> set[str]:
    """Extend the leases of the keys these owners hold; the owners that still hold one."""
    if not owners:
        return set()
    rows = session.execute(update(K).where(
        K.owner.in_(list(owners)), K.status == KeyStatus.IN_FLIGHT,
    ).values(lease_expires_at=db_now(session, lease_s)).returning(K.owner))
    return {str(r[0]) for r in rows}


def complete(session: Session, tenant_id: str, key: str, owner: str, status_code: int,
             body: dict[str, Any], job_id: str) -> bool:
    """Store the response of the key this owner holds in flight; False when it no longer
    holds it (its lease ran out and another request took the key over)."""
    res = session.execute(update(IdempotencyKey).where(
        IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key,
        IdempotencyKey.owner == owner, IdempotencyKey.status == KeyStatus.IN_FLIGHT,
    ).values(status=KeyStatus.DONE, response_status=status_code, response_body=body,
             job_id=job_id, lease_expires_at=None))
    return res.rowcount == 1  # type: ignore[attr-defined]


def delete_in_flight(session: Session, tenant_id: str, key: str, owner: str) -> None:
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                 IdempotencyKey.key == key,
                                                 IdempotencyKey.owner == owner,
                                                 IdempotencyKey.status == KeyStatus.IN_FLIGHT))


def delete_created_before(session: Session, cutoff: datetime) -> int:
    """Delete the keys created before `cutoff`; how many there were."""
    res = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
