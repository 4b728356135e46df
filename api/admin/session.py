"""The admin page's session: a cookie signed with itsdangerous that names the admin key by its
id (never the key itself) and a session id of its own, and expires after
`AGENTQ_ADMIN_SESSION_HOURS`. Each request checks the key again, so revoking it ends its
sessions at once; signing out ends that session on the server too (its id is kept in Redis as
ended until it would have expired), so a copy of the cookie is worth nothing afterwards. While
Redis cannot be asked, sessions are refused (the page asks to sign in again).

The signing secret is `AGENTQ_ADMIN_SESSION_SECRET` or, when that is not set, a random secret
the deployment makes once and keeps in the database (shared by every API process). The cookie
is `Secure` whenever the request came over https, as the app sees it after honouring
`X-Forwarded-Proto` from the proxies in `AGENTQ_TRUSTED_PROXIES`.
"""

from __future__ import annotations

import logging
import secrets
import threading

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from core.db import transaction
from core.keys import Principal, principal_of
from core.redis import get_redis
from core.repositories import app_secrets
from core.settings import get_settings

log = logging.getLogger(__name__)

COOKIE = "agentq_admin"
PATH = "/admin"
_SALT = "agentq.admin-session"
_SECRET_NAME = "admin_session"
_ENDED = "agentq:admin-session-ended:"
_lock = threading.Lock()
_generated: list[str] = []


def _secret() -> str:
    configured = get_settings().admin_session_secret
    if configured is not None:
        return configured.get_secret_value()
    with _lock:
        if not _generated:
            with transaction() as s:
                _generated.append(app_secrets.get_or_create(s, _SECRET_NAME))
        return _generated[0]


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(_secret(), salt=_SALT)


def max_age_s() -> int:
    return max(1, int(get_settings().admin_session_hours * 3600))


def start(request: Request, response: Response, principal: Principal) -> None:
    """Sign the admin in: a session cookie for this key."""
    token = _serializer().dumps({"key": principal.key_id, "sid": secrets.token_urlsafe(16)})
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=PATH,
                        secure=request.url.scheme == "https", max_age=max_age_s())


def end(response: Response, token: str | None = None) -> None:
    """Sign out: the cookie is dropped and, given the session's token, the session ended on
    the server."""
    response.delete_cookie(COOKIE, path=PATH)
    data = _load(token) if token else None
    if data is not None:
        try:
            get_redis().set(_ENDED + data[1], "1", ex=max_age_s())
        except RedisError as exc:  # the cookie is gone from this browser; copies expire
            log.warning("could not record the end of an admin session: %s", exc)


def _load(token: str) -> tuple[str, str] | None:
    """The key id and session id of an unexpired, untampered token."""
    try:
        data = _serializer().loads(token, max_age=max_age_s())
    except BadSignature:  # also an expired session (SignatureExpired)
        return None
    if not isinstance(data, dict):
        return None
    key_id, sid = data.get("key"), data.get("sid")
    return (key_id, sid) if isinstance(key_id, str) and isinstance(sid, str) else None


def principal(session: Session, token: str) -> Principal | None:
    """The admin a session cookie names, while it is unexpired, untampered, not signed out,
    and its key is neither revoked nor stripped of the admin scope."""
    data = _load(token)
    if data is None:
        return None
    try:
        if get_redis().exists(_ENDED + data[1]):
            return None
    except RedisError as exc:
        log.warning("could not check an admin session (refused): %s", exc)
        return None
    found = principal_of(session, data[0])
    return found if found is not None and found.is_admin else None
