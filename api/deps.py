"""Typed FastAPI dependencies: database sessions and the authenticated principal.

A request holds at most one database connection at a time: the principal is looked up in a
short transaction of its own that ends before the endpoint runs, and the endpoint's read session
(`DbSession`) is closed as soon as the endpoint returns, before the response is sent (an event
stream does not keep it while it streams)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.limits import rate_limiter
from core.db import transaction
from core.db_errors import retry_transient
from core.errors import Forbidden, Unauthorized
from core.keys import Principal, authenticate

_bearer = HTTPBearer(auto_error=False, description="An agentq API key: `Bearer aq_...`")


def _read_session() -> Iterator[Session]:
    """A session for reads; writes go through the orchestrator's unit of work."""
    with transaction(read_only=True) as session:
        yield session


DbSession = Annotated[Session, Depends(_read_session, scope="function")]


def lookup_key(raw: str) -> Principal | None:
    """The principal of an API key, in a short read transaction of its own (retried after a
    transient database error)."""
    def lookup() -> Principal | None:
        with transaction(read_only=True) as session:
            return authenticate(session, raw)

    return retry_transient(lookup)


def _principal(
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    if creds is None or not creds.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = lookup_key(creds.credentials)
    if principal is None:
        raise Unauthorized("unknown or revoked API key")
    rate_limiter.check(principal.tenant_id)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def _admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin key")
    return principal


AdminPrincipal = Annotated[Principal, Depends(_admin)]
