"""Schema-driven fuzzing of the API with schemathesis: no 5xx, and every response matches the
app's own OpenAPI document. Every operation is fuzzed with a tenant key and with an admin key,
on Postgres and on SQLite; a stateful run follows the OpenAPI links from what a call created
(a job, a corpus, a document, a webhook endpoint) to the calls that use it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from schemathesis import checks

from api.app import app
from tests.backends import BACKENDS, backend

schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
    path_regex=r".*/events/stream$")  # an open stream has no end to check

# Every check but the two about acceptance: a schema-valid request may still be refused
# for reasons a schema cannot state (a webhook host that does not resolve, an
# Idempotency-Key reused with another body), and lenient parsing accepts a few inputs the
# schema does not list (a Unix time for a date-time, an unknown query parameter).
EXCLUDED = [checks.positive_data_acceptance, checks.negative_data_rejection]
EXAMPLES = 12  # per operation, key and database: over 1,000 cases in all
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.filter_too_much,
              HealthCheck.function_scoped_fixture]

# Bodies for the document upload that schemathesis does not make: text declared in charsets,
# some of them codecs of bytes rather than of text.
CHARSETS = ["utf-8", "latin-1", "utf-16", "rot13", "zlib", "hex", "base64", "bz2", "uu",
            "idna", "punycode", "undefined", "unicode_escape", "utf-7", "x-no-such", ""]

CASES = {"count": 0}


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_keys(request: pytest.FixtureRequest, agentq_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from core.db import transaction
    from core.keys import create_key

    with backend(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}")):
        with transaction() as s:
            tenant, _ = create_key(s, f"fuzz-{secrets.token_hex(4)}")
            admin, _ = create_key(s, f"fuzz-admin-{secrets.token_hex(4)}", admin=True)
        yield {"tenant": tenant, "admin": admin}
    print(f"\nfuzzing cases run so far: {CASES['count']} ({CASES.get('stateless', 0)} "
          "of them one operation at a time)")


@pytest.fixture(params=["tenant", "admin"])
def fuzz_key(request: pytest.FixtureRequest, fuzz_keys: dict[str, str]) -> str:
    return fuzz_keys[str(request.param)]


@pytest.fixture(autouse=True)
def _no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from limits import parse

    from api.limits import rate_limiter

    rate_limiter._get()
    monkeypatch.setattr(rate_limiter, "_item", parse("100000/second"))


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESSED, database=None)
def test_api_never_fails_and_keeps_its_schema(case: schemathesis.Case, fuzz_key: str) -> None:
    CASES["count"] += 1
    CASES["stateless"] = CASES.get("stateless", 0) + 1
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzz_key}"},
                           excluded_checks=EXCLUDED)


def test_links_between_operations_hold(fuzz_key: str) -> None:
    """Create, then read, list, search, cancel, rotate and delete what was created, following
    the links in the OpenAPI document (a tenant key meets 403 on the admin routes)."""
    failures: list[str] = []

    class Links(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            CASES["count"] += 1
            return {"headers": {"Authorization": f"Bearer {fuzz_key}"}}

        def validate_response(self, response: Any, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            try:
                case.validate_response(response, excluded_checks=EXCLUDED,
                                       headers=kwargs.get("headers"))
            except Exception as exc:
                failures.append(f"{case.method} {case.formatted_path}: {exc}")
                raise

    # Generation only: a scenario replayed against a database that has moved on (what it
    # created exists now, an upload is a duplicate) takes other branches, so shrinking and
    # replays mean nothing here; every failure met is recorded as it happens.
    try:
        Links.run(settings=settings(max_examples=40, stateful_step_count=6, deadline=None,
                                    suppress_health_check=SUPPRESSED, database=None,
                                    phases=[Phase.generate]))
    except Flaky:
        if not failures:  # the database moved on under a replay; nothing failed
            return
    assert not failures, failures[0]


@pytest.mark.parametrize("media", ["text/plain", "text/markdown", "text/html"])
def test_uploads_in_any_declared_charset_never_fail(fuzz_keys: dict[str, str],
                                                    media: str) -> None:
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {fuzz_keys['tenant']}"}
    with TestClient(app, raise_server_exceptions=False) as http:
        corpus = http.post("/v1/corpora", json={"name": "charsets"}, headers=headers)
        assert corpus.status_code == 201, corpus.text
        corpus_id = corpus.json()["id"]

        @settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESSED,
                  database=None)
        @given(st.sampled_from(CHARSETS), st.binary(max_size=200))
        def upload(charset: str, data: bytes) -> None:
            CASES["count"] += 1
            declared = f"{media}; charset={charset}" if charset else media
            resp = http.post(f"/v1/corpora/{corpus_id}/documents", content=data,
                             headers={**headers, "Content-Type": declared})
            assert resp.status_code in (201, 409, 415, 422), (declared, data, resp.text)

        upload()


PAGES = ["/admin", "/admin/tenants/{id}", "/admin/jobs/{id}", "/admin/jobs/{id}/steps/{id}",
         "/admin/export.csv", "/admin/login"]


def test_admin_pages_never_fail(fuzz_keys: dict[str, str]) -> None:
    """The admin page is not in the OpenAPI document: its routes, with any dates, ids and
    sign-in form, answer without a server error."""
    from fastapi.testclient import TestClient

    text = st.text(max_size=30)
    dates = st.one_of(st.dates().map(str), text)
    admin = {"Authorization": f"Bearer {fuzz_keys['admin']}"}
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as http:

        @settings(max_examples=150, deadline=None, suppress_health_check=SUPPRESSED,
                  database=None)
        @given(st.sampled_from(PAGES), text, dates, dates,
               st.sampled_from([None, "day", "tenant", "job", "model", "x"]), st.booleans())
        def visit(page: str, some_id: str, since: str, until: str, group_by: str | None,
                  signed_in: bool) -> None:
            CASES["count"] += 1
            params = {"since": since, "until": until, "group_by": group_by, "job_id": some_id,
                      "next": some_id}
            url = page.replace("{id}", quote(some_id, safe="") or "x")
            resp = http.get(url, params={k: v for k, v in params.items() if v is not None},
                            headers=admin if signed_in else {})
            assert resp.status_code < 500, (url, params, resp.text[:300])
            if page == "/admin/login":
                resp = http.post(url, data={"key": some_id, "next": "/admin" + some_id})
                assert resp.status_code < 500, (some_id, resp.text[:300])

        visit()
