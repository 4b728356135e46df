"""The per-job call cache (an identical deterministic call is never paid twice) and cascades
(a small model's answer that fails validation is asked of a larger one, and recorded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from bench.standin import StandinServer
from core.db import transaction
from core.models import ModelCall
from tests.helpers import auth, start_worker, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


def test_identical_calls_in_a_job_are_paid_once(client: TestClient, tenant_key: str,
                                                standin: Any) -> None:
    standin.state.delay_s = 0.3
    prompts = ["What is the same question?"] * 5 + ["A different one?"]
    before = standin.state.requests_total
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": prompts, "max_tokens": 6}})
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["status"] == "completed"
    with transaction() as s:
        rows = list(s.scalars(select(ModelCall).where(ModelCall.job_id == job["id"])))
    made = [r for r in rows if r.cached_from is None]
    cached = [r for r in rows if r.cached_from is not None]
    assert len(made) == 2
    assert len(cached) == 4
    assert standin.state.requests_total - before == 2  # the server saw each call once
    for r in cached:
        assert r.prompt_tokens == r.completion_tokens == 0
        assert r.cost_usd == 0
        assert r.cached_from in {m.request_id for m in made}
    texts = [c["text"] for c in job["result"]["completions"]]
    assert len(set(texts[:5])) == 1
    assert job["usage"]["total_tokens"] == sum(m.prompt_tokens + m.completion_tokens
                                               for m in made)
    assert job["usage"]["model_calls"] == 6
    from orchestrator.reports import ReportFilter, totals

    with transaction() as s:
        figures = totals(s, ReportFilter(job_id=job["id"]))
    assert figures["call_cache_hits"] == 4
    assert figures["model_calls"] == 6


@pytest.fixture
def small_model() -> Iterator[StandinServer]:
    """A 'small' model that cannot write a usable plan."""
    server = StandinServer(model="small-model", plan_text="I do not know how to plan").start()
    yield server
    server.stop()


@pytest.fixture
def cascade_worker(agentq_env: dict[str, str], standin: Any, small_model: StandinServer,
                   tmp_path: Path, quiet_workers: None) -> Iterator[Any]:
    catalogue = [
        {"name": "small-model", "endpoints": [small_model.url], "size": "small",
         "prices": {"input": 0.01, "output": 0.02}},
        {"name": "standin-model", "endpoints": [standin.url], "size": "large",
         "prices": {"input": 1.0, "output": 2.0}},
    ]
    env = {**agentq_env, "AGENTQ_MODELS": json.dumps(catalogue)}
    proc = start_worker(env, tmp_path / "cascade.log")
    yield proc
    proc.stop()


def test_a_plan_that_fails_validation_escalates_to_the_larger_model(
        client: TestClient, tenant_key: str, small_model: StandinServer,
        cascade_worker: Any) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "How do tides work?", "max_subquestions": 3}})
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["status"] == "completed", job
    assert job["result"]["plan_fallback"] is False  # the larger model's plan was used
    with transaction() as s:
        rows = list(s.scalars(select(ModelCall).where(ModelCall.job_id == job["id"],
                                                      ModelCall.role == "planner")
                              .order_by(ModelCall.request_id)))
        others = list(s.scalars(select(ModelCall).where(ModelCall.job_id == job["id"],
                                                        ModelCall.role != "planner")))
    assert [r.model for r in rows] == ["small-model", "standin-model"]
    assert rows[0].escalated_from is None
    assert rows[1].escalated_from == "small-model"
    # Priced by the catalogue: each model at its own price.
    assert rows[0].cost_usd is not None
    assert rows[1].cost_usd is not None
    assert rows[1].cost_usd > rows[0].cost_usd
    # Steps with no validator stay on the small model.
    assert {r.model for r in others} == {"small-model"}
    assert small_model.state.requests_total >= 1 + len(others)
