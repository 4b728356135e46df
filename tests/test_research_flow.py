"""Research jobs through real Celery worker processes against the stand-in model server."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.models import Job, JobEvent, ModelCall, Step
from tests.helpers import auth, wait_for_job, wait_until

pytestmark = pytest.mark.usefixtures("worker")


def submit(client: TestClient, key: str, query: str = "How do honey bees make honey?",
           **extra: Any) -> str:
    body = {"kind": "research", "input": {"query": query, **extra.pop("input", {})}, **extra}
    resp = client.post("/v1/jobs", json=body, headers=auth(key))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def ledger(job_id: str) -> dict[str, int]:
    with transaction() as s:
        prompt, completion, calls = s.execute(
            select(func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
                   func.coalesce(func.sum(ModelCall.completion_tokens), 0),
                   func.count()).where(ModelCall.job_id == job_id)).one()
    return {"prompt": int(prompt), "completion": int(completion), "calls": int(calls)}


def test_research_job_runs_to_completed(client: TestClient, tenant_key: str,
                                        standin: Any) -> None:
    before = dict(standin.state.__dict__)
    job_id = submit(client, tenant_key, budget={"max_total_tokens": 20000})
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job.get("error")
    # plan + 3 investigators (the stand-in's plan) + synthesise
    assert job["progress"] == {"steps_total": 5, "steps_done": 5, "phase": "completed"}
    result = job["result"]
    assert [s["question"] for s in result["sections"]] == json.loads(standin.state.plan_text)
    assert all(s["answer"].startswith("Stand-in answer") for s in result["sections"])
    assert result["answer"].startswith("Stand-in answer")
    assert result["plan_fallback"] is False

    # usage in the status equals the ledger, which equals what the server counted
    usage = job["usage"]
    led = ledger(job_id)
    assert usage["model_calls"] == led["calls"] == 5
    assert usage["prompt_tokens"] == led["prompt"]
    assert usage["completion_tokens"] == led["completion"]
    assert usage["total_tokens"] == led["prompt"] + led["completion"]
    st = standin.state
    assert st.prompt_tokens_total - before["prompt_tokens_total"] >= led["prompt"]
    assert st.requests_total - before["requests_total"] >= 5

    steps = client.get(f"/v1/jobs/{job_id}/steps", headers=auth(tenant_key)).json()["data"]
    assert [s["role"] for s in steps].count("investigator") == 3
    assert {s["status"] for s in steps} == {"completed"}
    assert all(s["model"] == "standin-model" and s["usage"]["model_calls"] == 1 for s in steps)
    assert all(s["duration_ms"] is not None and s["duration_ms"] >= 0 for s in steps)
    synth = next(s for s in steps if s["role"] == "synthesiser")
    assert len(synth["depends_on"]) == 3
    # the synthesiser started only after every investigator had finished (fan-in)
    inv_end = max(s["finished_at"] for s in steps if s["role"] == "investigator")
    assert synth["started_at"] >= inv_end

    with transaction() as s:
        types = list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)
                               .order_by(JobEvent.seq)))
        seqs = list(s.scalars(select(JobEvent.seq).where(JobEvent.job_id == job_id)
                              .order_by(JobEvent.seq)))
    assert types[0] == "job.created"
    assert types[1] == "job.started"
    assert types[-1] == "job.completed"
    assert types.count("step.completed") == 5
    assert seqs == list(range(1, len(seqs) + 1))


def test_a_dependant_starts_in_the_transaction_that_finishes_its_last_dependency(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """The completion that makes steps ready claims them in the same transaction (one to run
    next in the same thread, the others on the worker's free slots: `tests/test_slots.py`
    bounds them). The fan-in step is claimed by the completion that counted it ready. On
    Postgres an event row's `xmin` names the transaction that wrote it: a dependant's
    `step.started` and its last dependency's `step.completed` share one."""
    from sqlalchemy import literal_column

    from core.db import is_postgres

    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job.get("error")
    with transaction() as s:
        if not is_postgres(s):
            pytest.skip("xmin is Postgres's")
        rows = {r.key: r for r in s.execute(
            select(Step.key, Step.role, Step.depends_on, Step.started_at, Step.finished_at,
                   Step.attempt).where(Step.job_id == job_id))}
        written = s.execute(select(literal_column("xmin::text"), JobEvent.type, JobEvent.data)
                            .where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
    txn = {(t, (d or {}).get("step")): x for x, t, d in written}
    same_txn = {k for k, r in rows.items() if r.depends_on and txn[("step.started", k)] in {
        txn[("step.completed", d)] for d in r.depends_on}}
    investigators = {k for k, r in rows.items() if r.role == "investigator"}
    synthesis = {k for k, r in rows.items() if r.role == "synthesiser"}
    assert len(investigators) == 3
    assert len(synthesis) == 1
    # The investigators taken with the plan's completion (the worker has 64 slots); the
    # synthesis with the last investigator's completion.
    assert same_txn & investigators == investigators, written
    assert same_txn >= synthesis, written
    assert all(r.attempt == 1 for r in rows.values())
    # Each step started once, and after every dependency had finished.
    assert [t for _, t, _ in written].count("step.started") == 5
    for r in rows.values():
        assert all(r.started_at >= rows[d].finished_at for d in r.depends_on), rows


def test_invalid_plan_falls_back_to_a_deterministic_one(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.plan_text = '["Only one question?"]'
    job_id = submit(client, tenant_key, input={"max_subquestions": 2})
    job = wait_for_job(client, tenant_key, job_id)
    assert job["status"] == "completed", job.get("error")
    assert job["result"]["plan_fallback"] is True
    assert len(job["result"]["sections"]) == 2


def test_cancel_stops_steps_that_had_not_started(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.delay_s = 1.0
    h = auth(tenant_key)
    job_id = submit(client, tenant_key)
    wait_for_job(client, tenant_key, job_id, statuses={"running"}, timeout=30)
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=h).json()["progress"]["phase"]
               == "investigating", 30, what="investigators to start")
    resp = client.post(f"/v1/jobs/{job_id}/cancel", headers=h)
    assert resp.status_code == 202
    assert resp.json()["status"] in {"cancelling", "cancelled"}
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "cancelled"
    steps = {s["key"]: s for s in
             client.get(f"/v1/jobs/{job_id}/steps", headers=h).json()["data"]}
    assert steps["synthesise"]["status"] == "cancelled"
    assert steps["synthesise"]["started_at"] is None
    with transaction() as s:
        synth_calls = s.scalar(select(func.count()).select_from(ModelCall)
                               .where(ModelCall.step_id == steps["synthesise"]["id"]))
        open_steps = s.scalar(select(func.count()).select_from(Step).where(
            Step.job_id == job_id, Step.status.in_(("pending", "queued", "running"))))
    assert synth_calls == 0
    assert open_steps == 0
    time.sleep(1.5)  # nothing runs after the job ended
    assert ledger(job_id)["calls"] == job["usage"]["model_calls"]


def test_budget_is_never_exceeded(client: TestClient, tenant_key: str, standin: Any) -> None:
    job_id = submit(client, tenant_key, budget={"max_total_tokens": 800},
                    input={"max_subquestions": 3})
    job = wait_for_job(client, tenant_key, job_id)
    assert job["status"] == "budget_exhausted", job
    assert job["error"]["code"] == "budget_exhausted"
    assert job["result"]["partial"] is True
    assert job["usage"]["total_tokens"] <= 800
    led = ledger(job_id)
    assert led["prompt"] + led["completion"] <= 800

    def settled() -> bool:
        with transaction() as s:
            job_row = s.get(Job, job_id)
            assert job_row is not None
            return job_row.reserved_tokens == 0

    # calls still in flight when the budget ran out settle or release their reservations
    wait_until(settled, 30, what="every reservation to be settled or released")
    led = ledger(job_id)
    assert led["prompt"] + led["completion"] <= 800


def test_model_server_failure_fails_the_job_with_a_clear_error(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.fail_status = 400
    standin.state.fail_next = 1
    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "inference_error"
    assert "planner" in job["error"]["message"]
    assert "400" in job["error"]["message"]
    steps = client.get(f"/v1/jobs/{job_id}/steps", headers=auth(tenant_key)).json()["data"]
    assert steps[0]["status"] == "failed"


def test_transient_failures_are_retried(client: TestClient, tenant_key: str,
                                        standin: Any) -> None:
    standin.state.fail_status = 503
    standin.state.fail_next = 2
    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job.get("error")
    with transaction() as s:
        attempts = max(s.scalars(select(ModelCall.attempts).where(ModelCall.job_id == job_id)))
    assert attempts >= 2


def test_duplicate_messages_run_a_step_once(client: TestClient, tenant_key: str,
                                            standin: Any) -> None:
    from core.queue import get_celery

    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id)
    assert job["status"] == "completed"
    calls_before = ledger(job_id)["calls"]
    requests_before = standin.state.requests_total
    with transaction() as s:
        step_ids = list(s.scalars(select(Step.id).where(Step.job_id == job_id)))
    app = get_celery()
    for step_id in step_ids:
        for _ in range(3):
            app.send_task("steps.run", kwargs={"step_id": step_id})
    # a marker job behind the duplicates shows they have been consumed
    marker = submit(client, tenant_key)
    assert wait_for_job(client, tenant_key, marker)["status"] == "completed"
    assert ledger(job_id)["calls"] == calls_before
    assert standin.state.requests_total - requests_before == ledger(marker)["calls"]


def test_one_worker_keeps_many_model_calls_in_flight(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """The worker's threads pool keeps at least 32 steps (so model calls) in flight at once,
    so that the model server can batch them. The stand-in holds every answer until 32 calls
    are running together (or 60 s pass), so how fast the jobs arrive does not matter."""
    with standin.state.lock:
        standin.state.max_running = 0
        standin.state.hold_timeout_s = 60
        standin.state.hold_until_running = 32
    ids = [client.post("/v1/jobs", json={"kind": "completion", "input": {
        "prompt": f"Prompt number {i}", "max_tokens": 8}}, headers=auth(tenant_key)).json()["id"]
        for i in range(48)]
    for job_id in ids:
        job = wait_for_job(client, tenant_key, job_id, timeout=60)
        assert job["status"] == "completed"
        assert job["result"]["text"].startswith(" Stand-in answer")
    assert standin.state.max_running >= 32


def test_a_step_whose_run_vanished_is_requeued_without_rebilling(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """A run that died after its model call (but before saving the step) leaves the step
    `running` with tokens reserved; once its lease expires the worker's sweeper queues it
    again, the reservation is released, and the finished call is replayed from the ledger."""
    from datetime import timedelta
    from decimal import Decimal

    from sqlalchemy import insert, update

    from agents.registry import get_kind
    from core.db import session_factory
    from core.keys import authenticate
    from core.models import Reservation, utcnow
    from core.repositories.ledger import Budget
    from inference.pool import Pool
    from orchestrator.budget import Run
    from orchestrator.jobs import create_job
    from orchestrator.metering import MeteredContext
    from orchestrator.runner import _claim

    # Create the job without publishing its first step (a plain session, committed by hand,
    # not the unit of work), and claim that step here, as a worker would, before the sweeper
    # publishes it.
    with session_factory()() as s:
        principal = authenticate(s, tenant_key)
        assert principal is not None
        job = create_job(s, tenant_id=principal.tenant_id, kind_name="research",
                         raw_input={"query": "Why is the sky blue?", "max_subquestions": 2},
                         budget={}, metadata={})
        job_id = job.id
        plan_id = s.scalars(select(Step.id).where(Step.job_id == job_id)).one()
        s.commit()
    claimed = _claim(plan_id)
    assert claimed is not None
    c, parents = claimed
    kind = get_kind(c.kind)
    assert kind is not None
    ctx = MeteredContext(run=Run(c.job_id, c.step_id, c.attempt, Budget.of(c.budget)),
                         tenant_id=c.tenant_id, step_key=c.key, role=c.role,
                         step_input=c.input, max_tokens=c.max_tokens, parents=parents,
                         pool=Pool([standin.url]))
    # The model call is made and billed; then the run "dies" before saving the step, holding
    # a reservation for a call it never settled (one that has long expired).
    kind.run_step(ctx, kind.parse_input(c.job_input))
    with transaction() as s:
        ctx.carry.write(s)  # the finished call's settlement is written
    requests_after_crash = standin.state.requests_total
    with transaction() as s:
        s.execute(insert(Reservation), [{
            "request_id": f"{plan_id}:1:9", "job_id": job_id, "step_id": plan_id,
            "attempt": 1, "tokens": 500, "cost_usd": Decimal(0),
            "created_at": utcnow() - timedelta(hours=1),
            "expires_at": utcnow() - timedelta(seconds=1)}])
        s.execute(update(Step).where(Step.id == plan_id)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.execute(update(Job).where(Job.id == job_id)
                  .values(reserved_tokens=Job.reserved_tokens + 500))
    done = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert done["status"] == "completed", done
    with transaction() as s:
        plan_calls = s.scalar(select(func.count()).select_from(ModelCall)
                              .where(ModelCall.step_id == plan_id))
        row = s.get(Job, job_id)
        assert row is not None
        assert row.reserved_tokens == 0
        step = s.get(Step, plan_id)
        assert step is not None
        assert step.attempt == 2
        held = s.scalar(select(func.count()).select_from(Reservation)
                        .where(Reservation.step_id == plan_id))
        assert held == 0
    assert plan_calls == 1  # the plan's call was replayed from the ledger, not made again
    # the re-run made only the investigators' and the synthesiser's calls
    assert standin.state.requests_total - requests_after_crash == done["usage"]["model_calls"] - 1
