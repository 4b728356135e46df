"""The admin page's session cookie: signed, naming the key by id (never holding it), expiring,
ended by revoking the key, and `Secure` when a trusted proxy says the request came over
https."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import wait_until


@pytest.fixture
def admin(agentq_env: dict[str, str]) -> tuple[str, str]:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, key = create_key(s, f"session-admin-{secrets.token_hex(3)}", admin=True)
        return raw, key.id


@pytest.fixture
def pages(agentq_env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import app

    with TestClient(app, follow_redirects=False) as c:
        yield c


def sign_in(http: Any, key: str, **headers: str) -> httpx.Response:
    resp: httpx.Response = http.post("/admin/login", data={"key": key}, headers=headers)
    assert resp.status_code == 303, resp.text
    return resp


def signed_in(http: TestClient, cookie: str) -> bool:
    http.cookies.clear()
    http.cookies.set("agentq_admin", cookie)
    resp = http.get("/admin/export.csv")
    return resp.status_code == 200


def test_the_cookie_holds_no_key_and_cannot_be_forged(pages: TestClient,
                                                      admin: tuple[str, str]) -> None:
    raw, key_id = admin
    resp = sign_in(pages, raw)
    cookie = resp.cookies["agentq_admin"]
    assert raw not in cookie
    assert raw[3:20] not in cookie
    assert signed_in(pages, cookie)
    # What the cookie used to hold (the raw key) signs nobody in; nor does a tampered session.
    assert not signed_in(pages, raw)
    assert not signed_in(pages, cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    from itsdangerous import URLSafeTimedSerializer

    forged = URLSafeTimedSerializer("guessed", salt="agentq.admin-session").dumps({"key": key_id})
    assert not signed_in(pages, forged)


def test_revoking_the_key_ends_its_sessions(pages: TestClient, admin: tuple[str, str]) -> None:
    from core.db import transaction
    from core.keys import revoke_key

    raw, key_id = admin
    cookie = sign_in(pages, raw).cookies["agentq_admin"]
    assert signed_in(pages, cookie)
    with transaction() as s:
        assert revoke_key(s, key_id)
    assert not signed_in(pages, cookie)


def test_signing_out_ends_the_session_on_the_server(pages: TestClient,
                                                    admin: tuple[str, str]) -> None:
    """A copy of the cookie taken before signing out is refused afterwards; another session of
    the same key goes on."""
    copied = sign_in(pages, admin[0]).cookies["agentq_admin"]
    other = sign_in(pages, admin[0]).cookies["agentq_admin"]
    assert copied != other
    assert signed_in(pages, copied)
    pages.cookies.clear()
    pages.cookies.set("agentq_admin", copied)
    assert pages.post("/admin/logout").status_code == 303
    assert not signed_in(pages, copied)
    assert signed_in(pages, other)


def test_a_session_expires(pages: TestClient, admin: tuple[str, str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    cookie = sign_in(pages, admin[0]).cookies["agentq_admin"]
    assert signed_in(pages, cookie)
    monkeypatch.setattr(get_settings(), "admin_session_hours", 1 / 3600)  # one second
    wait_until(lambda: not signed_in(pages, cookie), 10, interval=0.2,
               what="the session to expire")


def test_the_cookie_is_secure_behind_a_trusted_tls_proxy(api_server: str,
                                                          admin: tuple[str, str]) -> None:
    # The server sees 127.0.0.1, the default trusted proxy.
    with httpx.Client(base_url=api_server, follow_redirects=False, timeout=30) as http:
        proxied = sign_in(http, admin[0], **{"X-Forwarded-Proto": "https"})
        assert "secure" in proxied.headers["set-cookie"].lower()
        direct = sign_in(http, admin[0])
        assert "secure" not in direct.headers["set-cookie"].lower()


@pytest.mark.parametrize(("trusted", "secure"), [("10.9.9.9", False), ("testclient", True),
                                                 ("*", True)])
def test_only_trusted_proxies_are_believed(agentq_env: dict[str, str], admin: tuple[str, str],
                                           monkeypatch: pytest.MonkeyPatch, trusted: str,
                                           secure: bool) -> None:
    from api.app import create_app
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "trusted_proxies", trusted)
    with TestClient(create_app(), follow_redirects=False) as http:
        resp = sign_in(http, admin[0], **{"X-Forwarded-Proto": "https"})
    assert ("secure" in resp.headers["set-cookie"].lower()) is secure
