"""Input the database or the serialisers cannot take is a 422 that says what is wrong, on
Postgres and on SQLite alike: integers past a 64-bit column, times that overflow in UTC,
tampered pagination cursors, JSON nested too deeply or holding what no column stores, NUL
characters in URLs, ids of the wrong shape."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.backends import BACKENDS, backend
from tests.helpers import auth

BIG = 2**64
JOB = {"kind": "research", "input": {"query": "How do tides work?"}}


def _cursor(created: Any, row_id: Any = "job_1") -> str:
    return base64.urlsafe_b64encode(json.dumps([created, row_id]).encode()).decode()


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.fixture(scope="module", params=BACKENDS)
def keys(request: pytest.FixtureRequest, agentq_env: dict[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tenant key, an admin key and a job of the tenant, on each database."""
    from core.db import transaction
    from core.keys import create_key

    with backend(request.param, tmp_path_factory.mktemp(request.param)):
        with transaction() as s:
            tenant, _ = create_key(s, f"bad-inputs-{secrets.token_hex(4)}")
            admin, _ = create_key(s, f"bad-inputs-admin-{secrets.token_hex(4)}", admin=True)
        with TestClient(app()) as c:
            job = c.post("/v1/jobs", json=JOB, headers=auth(tenant))
            assert job.status_code == 202, job.text
            yield {"tenant": tenant, "admin": admin, "job": job.json()["id"]}


def app() -> Any:
    from api.app import app as the_app

    return the_app


@pytest.fixture
def http(keys: dict[str, str]) -> Iterator[TestClient]:
    # Server errors come back as responses (500), so that the assertions name the input.
    with TestClient(app(), raise_server_exceptions=False) as c:
        yield c


QUERY_CASES = [
    # (path template, key, what the message says)
    ("/v1/jobs/{job}/events?after=" + str(BIG), "tenant", "less than or equal to"),
    ("/v1/jobs/{job}/events?after=" + str(2**63), "tenant", "less than or equal to"),
    ("/v1/jobs/{job}/events/stream?after=" + str(BIG), "tenant", "less than or equal to"),
    ("/v1/usage?since=9999-12-31T23:59:59-23:59", "tenant", "in UTC this time falls outside"),
    ("/v1/usage?since=0001-01-01T00:00:00%2B14:00", "tenant", "in UTC this time falls outside"),
    ("/v1/usage?until=9999-12-31T23:59:59-00:01", "tenant", "in UTC this time falls outside"),
    ("/v1/admin/usage?since=9999-12-31T23:59:59-23:59", "admin", "falls outside"),
    ("/v1/admin/tenants?until=0001-01-01T00:00:00%2B14:00", "admin", "falls outside"),
    ("/v1/corpora?cursor=" + _cursor("9999-12-31T23:59:59-23:59", "cor_1"), "tenant",
     "not a cursor this API returned"),
    ("/v1/corpora?cursor=" + _cursor("0001-01-01T00:00:00+14:00", "cor_1"), "tenant",
     "not a cursor"),
    ("/v1/corpora?cursor=" + _cursor(["x"], 7), "tenant", "not a cursor"),
    ("/v1/corpora?cursor=" + base64.urlsafe_b64encode(b"[1, 2, 3]").decode(), "tenant",
     "not a cursor"),
    ("/v1/corpora?cursor=%25%25%25", "tenant", "not a cursor"),
    ("/v1/jobs?cursor=" + _cursor("9999-12-31T23:59:59-23:59"), "tenant", "not a cursor"),
    ("/v1/jobs?cursor=" + _cursor("2026-01-01T00:00:00", "job_1"), "tenant", "not a cursor"),
    ("/v1/jobs?cursor=" + _cursor("2026-01-01T00:00:00+00:00", "no such id!"), "tenant",
     "not a cursor"),
    ("/v1/admin/usage?tenant_id=a%00b", "admin", "NUL"),
    ("/v1/admin/usage?model=%00", "admin", "NUL"),
    ("/v1/corpora/abc/search?q=%00", "tenant", "NUL"),
    ("/admin/export.csv?job_id=%00", "admin", "NUL"),
    ("/admin?until=9999-12-31", "admin", "until: must be before"),
]


@pytest.mark.parametrize(("template", "who", "says"), QUERY_CASES)
def test_bad_query_or_path_is_422(http: TestClient, keys: dict[str, str], template: str,
                                  who: str, says: str) -> None:
    resp = http.get(template.format(job=keys["job"]), headers=auth(keys[who]))
    assert resp.status_code == 422, (template, resp.status_code, resp.text)
    assert says in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize("path", ["/v1/admin/jobs/%00", "/admin/jobs/%00", "/admin/tenants/a%00",
                                  "/admin/jobs/j/steps/%00", "/v1/webhook-endpoints/%00",
                                  "/v1/corpora/c/documents/%00"])
def test_a_nul_in_a_path_names_nothing(http: TestClient, keys: dict[str, str], path: str) -> None:
    for method in ("GET", "DELETE", "POST"):
        resp = http.request(method, path, headers=auth(keys["admin"]))
        assert resp.status_code == 404, (method, resp.text)
        assert "NUL" in resp.json()["error"]["message"]


def test_a_year_one_range_on_the_admin_page_is_served(http: TestClient,
                                                       keys: dict[str, str]) -> None:
    resp = http.get("/admin?until=0001-01-01", headers=auth(keys["admin"]))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(("header", "ok"), [("7", True), (str(2**63 - 1), True),
                                            (str(2**63), False), ("²", False), ("-1", False),
                                            ("1e3", False)])
def test_last_event_id_is_bounded(http: TestClient, keys: dict[str, str], header: str,
                                  ok: bool) -> None:
    from api.events.endpoints import event_cursor
    from core.errors import InvalidInput

    if ok:
        assert event_cursor(header) == int(header)
        return
    with pytest.raises(InvalidInput, match="Last-Event-ID"):
        event_cursor(header)
    resp = http.get(f"/v1/jobs/{keys['job']}/events/stream",
                    headers=[(b"Authorization", f"Bearer {keys['tenant']}".encode()),
                             (b"Last-Event-ID", header.encode("latin-1"))])
    assert resp.status_code == 422, resp.text


RAW_BODIES = [
    # (raw JSON for POST /v1/jobs, what the message says)
    (json.dumps({**JOB, "metadata": _nested(300)}), "nested too deeply"),
    (json.dumps({**JOB, "input": {"query": "Why?", "x": _nested(40)}}), "nested too deeply"),
    ('{"kind":"research","input":{"query":"Why?"},"metadata":{"a":' + "[" * 100_000
     + "]" * 100_000 + "}}", "nested too deeply"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"a":NaN}}', "finite"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"a":-Infinity}}',
     "finite"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"a":1e400}}', "finite"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"a":"\\ud800"}}',
     "valid Unicode"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"\\udfff":1}}',
     "valid Unicode"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"a":"x\\u0000"}}', "NUL"),
    ('{"kind":"research","input":{"query":"Why tides?"},"metadata":{"a":' + "9" * 5000 + "}}",
     "too many digits"),
]


@pytest.mark.parametrize(("raw", "says"), RAW_BODIES)
def test_bad_json_bodies_are_422(http: TestClient, keys: dict[str, str], raw: str,
                                 says: str) -> None:
    resp = http.post("/v1/jobs", content=raw.encode(),
                     headers={**auth(keys["tenant"]), "Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert says in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize("path", ["/v1/corpora", "/v1/webhook-endpoints"])
def test_the_json_guard_covers_every_body(http: TestClient, keys: dict[str, str],
                                          path: str) -> None:
    raw = '{"name":"n","url":"https://example.com/h","description":"\\u0000"}'
    resp = http.post(path, content=raw.encode(),
                     headers={**auth(keys["tenant"]), "Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["message"] == \
        "body.description: strings must not contain NUL characters"


def test_a_fine_deep_body_still_passes(http: TestClient, keys: dict[str, str]) -> None:
    body = {**JOB, "metadata": _nested(20)}
    resp = http.post("/v1/jobs", json=body, headers=auth(keys["tenant"]))
    assert resp.status_code == 202, resp.text
    assert resp.json()["metadata"] == _nested(20)


@pytest.mark.parametrize("charset", ["rot13", "zlib", "hex", "base64", "no-such-codec"])
def test_upload_with_a_charset_that_is_no_text_encoding_is_422(
        http: TestClient, keys: dict[str, str], charset: str) -> None:
    h = auth(keys["tenant"])
    corpus = http.post("/v1/corpora", json={"name": f"cs-{charset}"}, headers=h).json()["id"]
    resp = http.post(f"/v1/corpora/{corpus}/documents", content=b"hello there",
                     headers={**h, "Content-Type": f"text/plain; charset={charset}"})
    assert resp.status_code == 422, resp.text
    assert charset in resp.json()["error"]["message"]


def test_a_csv_export_named_after_any_id_is_served(http: TestClient,
                                                   keys: dict[str, str]) -> None:
    resp = http.get("/admin/export.csv", params={"job_id": "job_☃\U000404c1"},
                    headers=auth(keys["admin"]))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-disposition"] == 'attachment; filename="job-job___-calls.csv"'


def test_sign_in_never_redirects_to_a_header_injection(http: TestClient,
                                                       keys: dict[str, str]) -> None:
    resp = http.post("/admin/login", data={"key": keys["admin"],
                                           "next": "/admin\r\nSet-Cookie: x=1"},
                     follow_redirects=False)
    assert resp.status_code == 303
    assert resp.headers["location"] == "/admin"
