"""`/metrics` reads the ledger's running totals, not the ledger: what a scrape asks the database
does not change as the ledger grows, and the totals stay exactly the ledger's sums, also with
many transactions writing at once."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, func, select

from tests.backends import BACKENDS, backend
from tests.helpers import auth

JOB = {"kind": "completion", "input": {"prompt": "Say hello"}}


@pytest.fixture(scope="module", params=BACKENDS)
def db(request: pytest.FixtureRequest, agentq_env: dict[str, str],
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # A database of its own: the rows written here would show in other tests' global sums.
    with backend(request.param, tmp_path_factory.mktemp(f"totals-{request.param}"),
                 fresh=True):
        yield str(request.param)


@pytest.fixture
def http(db: str) -> Iterator[TestClient]:
    from api.app import app

    with TestClient(app) as c:
        yield c


def new_jobs(http: TestClient, n: int) -> list[tuple[str, str, str]]:
    """(tenant, job, step) of `n` new jobs (nothing runs them)."""
    from core.db import transaction
    from core.keys import create_key
    from core.models import Job, Step

    with transaction() as s:
        key, _ = create_key(s, f"totals-{secrets.token_hex(4)}")
    out = []
    for _ in range(n):
        job_id = http.post("/v1/jobs", json=JOB, headers=auth(key)).json()["id"]
        with transaction() as s:
            tenant = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
            step = s.scalar(select(Step.id).where(Step.job_id == job_id).limit(1))
        out.append((str(tenant), job_id, str(step)))
    return out


def calls(owner: tuple[str, str, str], n: int, model: str) -> list[dict[str, Any]]:
    tenant, job, step = owner
    return [{"request_id": f"{step}:t:{secrets.token_hex(6)}", "tenant_id": tenant,
             "job_id": job, "step_id": step, "role": "generator", "model": model,
             "endpoint": "http://totals.test", "prompt_tokens": 10 + i % 7,
             "cached_tokens": i % 3, "completion_tokens": 1 + i % 5, "max_tokens": 64,
             "latency_ms": 5.0, "output_text": "x", "cost_usd": Decimal("0.0000012"),
             "energy_wh": 0.001} for i in range(n)]


def scrape(http: TestClient) -> tuple[dict[tuple[str, str, str], float], list[str]]:
    """The samples of a scrape by (name, model, type), and every statement it sent."""
    from core.db import get_engine

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # Not the app's background threads (the outbox relay marking rows sent, whose
        # transaction may begin while the scrape runs).
        if not threading.current_thread().name.startswith("agentq-"):
            statements.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", seen)
    try:
        resp = http.get("/metrics")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert resp.status_code == 200, resp.text
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, s.labels.get("model", ""), s.labels.get("type", ""))] = s.value
    return samples, statements


def ledger_sums(model: str) -> tuple[int, int, int, int]:
    from core.db import transaction
    from core.models import ModelCall

    with transaction() as s:
        row = s.execute(select(func.count(), func.sum(ModelCall.prompt_tokens),
                               func.sum(ModelCall.completion_tokens),
                               func.sum(ModelCall.cached_tokens))
                        .where(ModelCall.model == model)).one()
    return int(row[0]), int(row[1] or 0), int(row[2] or 0), int(row[3] or 0)


def test_a_scrape_costs_the_same_however_long_the_ledger(http: TestClient) -> None:
    from core.db import transaction
    from core.repositories import ledger

    model = f"model-{secrets.token_hex(3)}"
    owner = new_jobs(http, 1)[0]
    with transaction() as s:
        ledger.insert_calls(s, calls(owner, 10, model))
    small, asked_small = scrape(http)
    assert small[("agentq_model_calls_total", model, "")] == 10
    for _ in range(5):  # 5,000 more rows
        with transaction() as s:
            ledger.insert_calls(s, calls(owner, 1000, model))
    large, asked_large = scrape(http)
    assert not [q for q in asked_large if "model_calls" in q], asked_large
    # The same statements, whatever the ledger holds.
    assert sorted(set(asked_large)) == sorted(set(asked_small))
    n, prompt, completion, cached = ledger_sums(model)
    assert n == 5010
    assert large[("agentq_model_calls_total", model, "")] == n
    assert large[("agentq_tokens_total", model, "prompt")] == prompt
    assert large[("agentq_tokens_total", model, "completion")] == completion
    assert large[("agentq_tokens_total", model, "cached_prompt")] == cached
    assert large[("agentq_cost_usd_total", model, "")] == pytest.approx(5010 * 0.0000012)
    assert large[("agentq_energy_wh_total", model, "")] == pytest.approx(5010 * 0.001)


def test_totals_stay_exact_with_many_writers_at_once(http: TestClient, db: str) -> None:
    from core.db import transaction
    from core.repositories import ledger

    models = [f"model-{secrets.token_hex(3)}" for _ in range(2)]
    owners = new_jobs(http, 6)
    barrier = threading.Barrier(len(owners))
    errors: list[BaseException] = []

    def write(owner: tuple[str, str, str]) -> None:
        try:
            barrier.wait()
            for i in range(20):  # each transaction writes rows of both models
                with transaction() as s:
                    ledger.insert_calls(s, calls(owner, 3, models[i % 2])
                                        + calls(owner, 2, models[(i + 1) % 2]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    samples, _ = scrape(http)
    for model in models:
        n, prompt, completion, _cached = ledger_sums(model)
        assert n == 6 * 20 * 5 // 2
        assert samples[("agentq_model_calls_total", model, "")] == n
        assert samples[("agentq_tokens_total", model, "prompt")] == prompt
        assert samples[("agentq_tokens_total", model, "completion")] == completion
