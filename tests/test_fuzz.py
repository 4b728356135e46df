"""Schema-driven fuzzing of the API with schemathesis: no 5xx, and every response matches the
app's own OpenAPI document."""

from __future__ import annotations

import secrets

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from api.app import app

schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
    path_regex=r".*/events/stream$")  # an open stream has no end to check


@pytest.fixture(scope="module")
def fuzz_key(agentq_env: dict[str, str]) -> str:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, f"fuzz-{secrets.token_hex(4)}")
    return raw


@pytest.fixture(autouse=True)
def _no_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from limits import parse

    from api.limits import rate_limiter

    rate_limiter._get()
    monkeypatch.setattr(rate_limiter, "_item", parse("100000/second"))


@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_never_fails_and_keeps_its_schema(case: schemathesis.Case, fuzz_key: str) -> None:
    # Every check but the two about acceptance: a schema-valid request may still be refused
    # for reasons a schema cannot state (a webhook host that does not resolve, an
    # Idempotency-Key reused with another body), and lenient parsing accepts a few inputs the
    # schema does not list (a Unix time for a date-time, an unknown query parameter).
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzz_key}"},
                           excluded_checks=[checks.positive_data_acceptance,
                                            checks.negative_data_rejection])
