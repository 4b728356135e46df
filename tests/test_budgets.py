"""Budgets in tokens and dollars: reservations that can never be overrun, even by many steps
racing across worker processes; thresholds; per-role step budgets; nonsense refused."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.models import Job, JobEvent, ModelCall, Step
from orchestrator.budget import Hold
from tests.helpers import auth, start_worker, wait_for_job, wait_until


def reservation_for(prompt: str, max_tokens: int) -> int:
    return Hold.for_call("r", prompt, max_tokens).tokens


def ledger(job_id: str) -> tuple[int, Decimal, int]:
    with transaction() as s:
        tokens, cost, calls = s.execute(select(
            func.coalesce(func.sum(ModelCall.prompt_tokens + ModelCall.completion_tokens), 0),
            func.coalesce(func.sum(ModelCall.cost_usd), 0), func.count())
            .where(ModelCall.job_id == job_id)).one()
    return int(tokens), Decimal(cost or 0), int(calls)


@pytest.fixture(scope="module")
def second_worker(worker: Any, agentq_env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Any:
    proc = start_worker(agentq_env, tmp_path_factory.mktemp("w2") / "worker2.log")
    yield proc
    proc.stop()


@pytest.mark.parametrize("run", range(3))
def test_fifty_racing_steps_never_overrun_a_budget_that_fits_ten(
        client: TestClient, tenant_key: str, standin: Any, second_worker: Any,
        run: int) -> None:
    standin.state.delay_s = 0.05
    prompts = [f"p{i:02d}" for i in range(50)]
    budget = 10 * reservation_for(prompts[0], 8)
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": prompts, "max_tokens": 8},
        "budget": {"max_total_tokens": budget}})
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["status"] == "budget_exhausted", job
    spent, _, calls = ledger(job["id"])
    assert spent <= budget
    assert calls >= 10
    assert job["usage"]["total_tokens"] == spent
    assert "spent" in job["error"]["message"]
    assert job["result"]["partial"] is True

    def released() -> bool:
        with transaction() as s:
            row = s.get(Job, job["id"])
            return row is not None and row.reserved_tokens == 0

    wait_until(released, 30, what="every reservation to be released")


def test_dollar_budgets_are_never_exceeded(client: TestClient, tenant_key: str,
                                           standin: Any) -> None:
    from core.pricing import price_for

    price = price_for("standin-model")
    per_call = price.cost(reservation_for("p00", 8) - 8, 8)
    cap = float(per_call * 5)
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": [f"p{i:02d}" for i in range(20)],
                                   "max_tokens": 8},
        "budget": {"max_cost_usd": cap}})
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["status"] == "budget_exhausted", job

    # Calls still in flight when the job ended settle afterwards: compare once they have.
    def settled() -> bool:
        with transaction() as s:
            row = s.get(Job, job["id"])
            return row is not None and row.reserved_tokens == 0

    wait_until(settled, 30, what="the calls in flight to settle")
    job = client.get(f"/v1/jobs/{job['id']}", headers=auth(tenant_key)).json()
    _, cost, calls = ledger(job["id"])
    assert Decimal(0) < cost <= Decimal(str(cap))
    assert job["usage"]["cost_usd"] == pytest.approx(float(cost))
    assert calls >= 5


def test_thresholds_append_events_once(client: TestClient, tenant_key: str,
                                       standin: Any) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": [f"p{i:02d}" for i in range(20)],
                                   "max_tokens": 8},
        "budget": {"max_total_tokens": 220}})
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    with transaction() as s:
        events = [e.data for e in s.scalars(select(JobEvent).where(
            JobEvent.job_id == job["id"], JobEvent.type == "budget.threshold")
            .order_by(JobEvent.seq))]
    crossed = [(e["budget"], e["threshold"]) for e in events]
    assert crossed == [("tokens", 0.5), ("tokens", 0.8)]
    assert events[0]["spent"] >= 110
    assert events[1]["spent"] >= 176


def test_step_budgets_per_role(client: TestClient, tenant_key: str, standin: Any) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "Why is the sky blue?", "max_subquestions": 2},
        "budget": {"step_max_tokens": {"investigator": 5, "planner": 90}}})
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["status"] == "completed", job
    with transaction() as s:
        by_role = {r: m for r, m in s.execute(select(Step.role, Step.max_tokens)
                                              .where(Step.job_id == job["id"]))}
        calls = list(s.execute(select(ModelCall.role, ModelCall.max_tokens,
                                      ModelCall.completion_tokens)
                               .where(ModelCall.job_id == job["id"])))
    assert by_role["investigator"] == 5
    assert by_role["planner"] == 90
    assert by_role["synthesiser"] == 256  # the configured default
    assert all(c[1] == 5 and c[2] <= 5 for c in calls if c[0] == "investigator")


@pytest.mark.parametrize(("budget", "field"), [
    ({"max_total_tokens": -1}, "budget.max_total_tokens"),
    ({"max_total_tokens": 0}, "budget.max_total_tokens"),
    ({"max_total_tokens": 10**12}, "budget.max_total_tokens"),
    ({"max_cost_usd": 0}, "budget.max_cost_usd"),
    ({"max_cost_usd": -3.5}, "budget.max_cost_usd"),
    ({"max_cost_usd": 1e9}, "budget.max_cost_usd"),
    ({"max_seconds": 0}, "budget.max_seconds"),
    ({"step_max_tokens": {"investigator": 0}}, "budget.step_max_tokens"),
    ({"step_max_tokens": {"investigator": 10**6}}, "budget.step_max_tokens"),
    ({"step_max_tokens": {"poet": 10}}, "budget.step_max_tokens"),
])
def test_nonsense_budgets_are_422(client: TestClient, tenant_key: str, budget: dict[str, Any],
                                  field: str) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "Why is the sky blue?"}, "budget": budget})
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["error"]["message"]


def test_prices_are_fixed_when_the_call_is_made(tmp_path: Path) -> None:
    from core.pricing import Price

    p = Price(Decimal("0.05"), Decimal("0.025"), Decimal("0.10"))
    assert p.cost(1_000_000, 0) == Decimal("0.05")
    assert p.cost(1_000_000, 1_000_000, cached_tokens=500_000) == Decimal("0.1375")
