"""Tenants and API keys. Keys are random, shown once, and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "aq_"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant_name: str
    key_id: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, *, admin: bool = False) -> tuple[str, ApiKey]:
    """Create a key for the tenant (creating the tenant if needed); returns the raw key once."""
    tenant = get_or_create_tenant(session, tenant_name)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        key_hash=hash_key(raw),
        prefix=raw[:10],
        scopes="jobs,admin" if admin else "jobs",
    )
    session.add(key)
    session.flush()
    return raw, key


def authenticate(session: Session, raw: str) -> Principal | None:
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_key(raw), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    key, tenant = row
    return Principal(tenant.id, tenant.name, key.id, frozenset(key.scope_set))


def principal_of(session: Session, key_id: str) -> Principal | None:
    """The principal of a key by its id, while the key is not revoked."""
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    key, tenant = row
    return Principal(tenant.id, tenant.name, key.id, frozenset(key.scope_set))


def revoke_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True


def get_tenant(session: Session, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)
