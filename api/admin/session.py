"""The admin page's session: a cookie signed with itsdangerous that names the admin key by its
id (never the key itself) and expires after `AGENTQ_ADMIN_SESSION_HOURS`. Each request checks
the key again, so revoking it ends its sessions at once.

The signing secret is `AGENTQ_ADMIN_SESSION_SECRET` or, when that is not set, a random secret
the deployment makes once and keeps in the database (shared by every API process). The cookie
is `Secure` whenever the request came over https, as the app sees it after honouring
`X-Forwarded-Proto` from the proxies in `AGENTQ_TRUSTED_PROXIES`.
"""

from __future__ import annotations

import threading

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from core.db import transaction
from core.keys import Principal, principal_of
from core.repositories import app_secrets
from core.settings import get_settings

COOKIE = "agentq_admin"
PATH = "/admin"
_SALT = "agentq.admin-session"
_SECRET_NAME = "admin_session"
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
    token = _serializer().dumps({"key": principal.key_id})
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=PATH,
                        secure=request.url.scheme == "https", max_age=max_age_s())


def end(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH)


def principal(session: Session, token: str) -> Principal | None:
    """The admin a session cookie names, while it is unexpired, untampered and its key is
    neither revoked nor stripped of the admin scope."""
    try:
        data = _serializer().loads(token, max_age=max_age_s())
    except BadSignature:  # also an expired session (SignatureExpired)
        return None
    key_id = data.get("key") if isinstance(data, dict) else None
    if not isinstance(key_id, str):
        return None
    found = principal_of(session, key_id)
    return found if found is not None and found.is_admin else None
