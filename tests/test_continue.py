"""Continuing stopped jobs (`POST /v1/jobs/{id}/continue`) through real Celery worker processes
against the stand-in model server: out of budget, cancelled and past the deadline; completed
steps never run again and no call is paid for twice; one continuation however many ask at
once; only stopped jobs, only the tenant's own."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.client import AgentqClient
from bench.standin import StandinServer
from core.db import transaction
from core.models import JobEvent, ModelCall, Step
from tests.helpers import auth, start_worker, wait_for_job, wait_until
from tests.receivers import serve

pytestmark = pytest.mark.usefixtures("worker")

QUERY = "How do honey bees make honey?"


def submit(client: TestClient, key: str, **body: Any) -> str:
    body = {"kind": "research", "input": {"query": QUERY}, **body}
    resp = client.post("/v1/jobs", json=body, headers=auth(key))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def continue_once_stopped(client: TestClient, key: str, job_id: str,
                          body: dict[str, Any] | None = None,
                          headers: dict[str, str] | None = None) -> Any:
    """Continue the job once the steps that were running when it stopped have stopped (409
    `job_stopping` until then); the response."""
    def attempt() -> Any:
        resp = client.post(f"/v1/jobs/{job_id}/continue", json=body,
                           headers={**auth(key), **(headers or {})})
        if resp.status_code == 409 and resp.json()["error"]["code"] == "job_stopping":
            return None
        return resp

    return wait_until(attempt, 30, what=f"job {job_id} to stop running steps")


def steps_of(job_id: str) -> dict[str, Step]:
    with transaction() as s:
        return {st.key: st for st in s.scalars(select(Step).where(Step.job_id == job_id))}


def ledger_rows(job_id: str) -> list[ModelCall]:
    with transaction() as s:
        return list(s.scalars(select(ModelCall).where(ModelCall.job_id == job_id)))


def event_types(job_id: str) -> list[str]:
    with transaction() as s:
        return list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)
                              .order_by(JobEvent.seq)))


def seen_by(server: Any, job_id: str) -> list[str]:
    """The request ids of the job's calls that reached this model server."""
    step_ids = {st.id for st in steps_of(job_id).values()}
    with server.state.lock:
        return [r for r in server.state.request_ids if r.split(":", 1)[0] in step_ids]


def assert_paid_once(server: Any, job: dict[str, Any]) -> None:
    """Every call the server saw is one ledger row, none seen twice; the usage is the
    ledger's."""
    rows = ledger_rows(job["id"])
    made = [r.request_id for r in rows if r.cached_from is None]
    seen = seen_by(server, job["id"])
    assert Counter(seen) == Counter(made), (seen, made)
    assert len(set(seen)) == len(seen)
    assert job["usage"]["total_tokens"] == sum(r.prompt_tokens + r.completion_tokens
                                               for r in rows)
    assert job["usage"]["model_calls"] == len(rows)


def test_a_job_out_of_budget_continues_to_completed_paying_for_nothing_twice(
        client: TestClient, tenant_key: str, standin: Any, api_server: str) -> None:
    """The synthesiser's calls cannot fit the first budget: the job ends `budget_exhausted`
    after the plan and the investigations. Continued with a larger total, only the
    synthesiser runs; the result is built from every step's output; the job's webhook hears
    the terminal event again; the event stream goes on past the first terminal event."""
    with serve("ok") as receiver:
        job_id = submit(client, tenant_key,
                        budget={"max_total_tokens": 3000,
                                "step_max_tokens": {"synthesiser": 4000}},
                        webhook={"url": receiver.url})
        job = wait_for_job(client, tenant_key, job_id, timeout=60)
        assert job["status"] == "budget_exhausted", job
        assert job["result"]["partial"] is True
        assert len(job["result"]["sections"]) == 3
        before = {k: (st.status, st.attempt) for k, st in steps_of(job_id).items()}
        assert before["synthesise"] == ("failed", 1)
        assert {v for k, v in before.items() if k != "synthesise"} == {("completed", 1)}
        spent = job["usage"]["total_tokens"]

        # A limit at what was spent (the limit is the new total, not an addition) is refused.
        refused = client.post(f"/v1/jobs/{job_id}/continue", headers=auth(tenant_key),
                              json={"budget": {"max_total_tokens": spent}})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "budget_not_above_spent"
        assert f"already spent {spent} tokens" in refused.json()["error"]["message"]
        assert "budget.max_total_tokens" in refused.json()["error"]["message"]

        resp = continue_once_stopped(client, tenant_key, job_id,
                                     {"budget": {"max_total_tokens": 20000}})
        assert resp.status_code == 202, resp.text
        out = resp.json()
        assert resp.headers["Location"] == f"/v1/jobs/{job_id}"
        assert out["status"] == "running"
        assert out["result"] is None
        assert out["error"] is None
        assert out["budget"] == {"max_total_tokens": 20000,
                                 "step_max_tokens": {"synthesiser": 4000}}
        assert out["usage"]["total_tokens"] == spent

        job = wait_for_job(client, tenant_key, job_id, timeout=60)
        assert job["status"] == "completed", job
        assert job["error"] is None
        result = job["result"]
        assert "partial" not in result
        assert result["answer"].startswith("Stand-in answer")
        assert [s["question"] for s in result["sections"]] == \
            json.loads(standin.state.plan_text)

        after = {k: (st.status, st.attempt) for k, st in steps_of(job_id).items()}
        assert after["synthesise"] == ("completed", 2)
        for key, (status, attempt) in before.items():
            if key != "synthesise":
                assert after[key] == (status, attempt), key  # never run again
        assert job["progress"] == {"steps_total": 5, "steps_done": 5, "phase": "completed"}
        assert_paid_once(standin, job)
        assert job["usage"]["total_tokens"] <= 20000

        types = event_types(job_id)
        assert types.count("job.continued") == 1
        assert types.index("job.budget_exhausted") < types.index("job.continued") \
            < types.index("job.completed")
        assert types[-1] == "job.completed"
        with transaction() as s:
            continued = s.scalars(select(JobEvent.data).where(
                JobEvent.job_id == job_id, JobEvent.type == "job.continued")).one()
        assert continued["previous"]["status"] == "budget_exhausted"
        assert continued["previous"]["error"]["code"] == "budget_exhausted"
        assert continued["budget"]["max_total_tokens"] == 20000

        def delivered() -> list[str] | None:
            with receiver.lock:
                got = [json.loads(body)["type"] for _, body in receiver.received]
            return got if len(got) >= 2 else None

        assert sorted(wait_until(delivered, 30, what="both terminal deliveries")) == \
            ["job.budget_exhausted", "job.completed"]

    with AgentqClient(api_server, tenant_key) as aq:
        streamed = [e["type"] for e in aq.events(job_id)]
    assert streamed == types

    again = client.post(f"/v1/jobs/{job_id}/continue", headers=auth(tenant_key), json={})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_completed"


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
        {"name": "small-model", "endpoints": [small_model.url], "size": "small"},
        {"name": "standin-model", "endpoints": [standin.url], "size": "large"},
    ]
    proc = start_worker({**agentq_env, "AGENTQ_MODELS": json.dumps(catalogue)},
                        tmp_path / "cascade.log")
    yield proc
    proc.stop()


def test_a_step_stopped_between_its_calls_replays_the_finished_ones(
        client: TestClient, tenant_key: str, standin: Any, small_model: StandinServer,
        cascade_worker: Any) -> None:
    """The planner's first call (the small model) finishes; its answer fails validation and
    the escalation to the larger model cannot be reserved: the job runs out of budget with
    the planner failed after one finished call. Continued, the planner's next run replays
    that call from the ledger and makes only the escalation."""
    from agents.research import plan_prompt
    from orchestrator.budget import Hold

    max_tokens = 64
    hold = Hold.for_call("r", plan_prompt(QUERY), max_tokens).tokens
    # The first call's reservation fits; after it is paid, the second's (as large) does not.
    job_id = submit(client, tenant_key, input={"query": QUERY, "max_subquestions": 3},
                    budget={"max_total_tokens": hold + 1,
                            "step_max_tokens": {"planner": max_tokens}})
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "budget_exhausted", job
    plan = steps_of(job_id)["plan"]
    assert (plan.status, plan.attempt) == ("failed", 1)
    first = [r.request_id for r in ledger_rows(job_id)]
    assert first == [f"{plan.id}:1:0"]

    resp = continue_once_stopped(client, tenant_key, job_id,
                                 {"budget": {"max_total_tokens": 20000}})
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    assert job["result"]["plan_fallback"] is False  # the larger model's plan
    assert steps_of(job_id)["plan"].attempt == 2
    planner = sorted((r.request_id, r.model, r.escalated_from) for r in ledger_rows(job_id)
                     if r.role == "planner")
    assert planner == [(f"{plan.id}:1:0", "small-model", None),
                       (f"{plan.id}:2:1", "standin-model", "small-model")]
    # The small model saw the planner's first call once: the second run replayed it.
    assert seen_by(small_model, job_id).count(f"{plan.id}:1:0") == 1
    assert f"{plan.id}:2:0" not in seen_by(small_model, job_id)
    rows = ledger_rows(job_id)
    made = Counter(r.request_id for r in rows if r.cached_from is None)
    seen = Counter(seen_by(small_model, job_id) + seen_by(standin, job_id))
    assert seen == made


def test_a_cancelled_job_continues_where_it_stopped(client: TestClient, tenant_key: str,
                                                    standin: Any) -> None:
    standin.state.delay_s = 1.0
    h = auth(tenant_key)
    job_id = submit(client, tenant_key)
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=h).json()["progress"]["phase"]
               == "investigating", 30, what="investigators to start")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h).status_code == 202
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "cancelled"
    before = {k: (st.status, st.attempt) for k, st in steps_of(job_id).items()}
    assert before["plan"] == ("completed", 1)
    assert before["synthesise"] == ("cancelled", 0)
    standin.state.delay_s = 0.0

    resp = continue_once_stopped(client, tenant_key, job_id)  # no body: the budget is kept
    assert resp.status_code == 202, resp.text
    assert resp.json()["budget"] == job["budget"]
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    assert len(job["result"]["sections"]) == 3
    after = steps_of(job_id)
    assert {st.status for st in after.values()} == {"completed"}
    for key, (status, attempt) in before.items():
        # Completed steps never run again; the others ran once more, on the next attempt.
        assert after[key].attempt == (attempt if status == "completed" else attempt + 1), key
    # Investigations cut off by the cancel were billed for what they had generated (rows
    # marked `cancelled`) and made afresh; nothing the server answered in full is paid twice.
    rows = ledger_rows(job_id)
    whole = [r.request_id for r in rows if r.finish_reason != "cancelled"]
    assert len(whole) == len(set(whole))
    keys = Counter((r.step_id, r.call_index) for r in rows if r.finish_reason != "cancelled")
    assert max(keys.values()) == 1


def test_a_step_completed_after_its_job_was_cancelled_is_expanded_on_continuing(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """The plan finishes while its job is cancelling: the job ends `cancelled` with the plan
    completed but never expanded (no investigators). Continuing expands it: the plan is not
    run again and the job completes."""
    from agents.registry import get_kind
    from core.db import session_factory
    from core.keys import authenticate
    from core.repositories.ledger import Budget
    from inference.pool import Pool
    from orchestrator import dag
    from orchestrator.budget import Run
    from orchestrator.jobs import create_job
    from orchestrator.metering import MeteredContext
    from orchestrator.runner import _claim
    from orchestrator.watchers import leases

    # The job is written without publishing its first step, which this test claims and runs
    # as a worker would (its lease kept by this process).
    with session_factory()() as s:
        principal = authenticate(s, tenant_key)
        assert principal is not None
        job_id = create_job(s, tenant_id=principal.tenant_id, kind_name="research",
                            raw_input={"query": QUERY, "max_subquestions": 2}, budget={},
                            metadata={}).id
        s.commit()
    plan_id = steps_of(job_id)["plan"].id
    claimed = _claim(plan_id)
    assert claimed is not None
    c, parents = claimed
    leases.add(c.step_id, c.attempt)
    try:
        kind = get_kind(c.kind)
        assert kind is not None
        job_input = kind.parse_input(c.job_input)
        ctx = MeteredContext(run=Run(c.job_id, c.step_id, c.attempt, Budget.of(c.budget)),
                             tenant_id=c.tenant_id, step_key=c.key, role=c.role,
                             step_input=c.input, max_tokens=c.max_tokens, parents=parents,
                             pool=Pool([standin.url]))
        output = kind.run_step(ctx, job_input)
        cancelling = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
        assert cancelling.json()["status"] == "cancelling"
        with transaction() as s:
            dag.complete(s, c, kind, job_input, output, ctx.carry)
    finally:
        leases.remove(c.step_id, c.attempt)
    job = wait_for_job(client, tenant_key, job_id, timeout=10)
    assert job["status"] == "cancelled"
    assert job["progress"]["steps_total"] == job["progress"]["steps_done"] == 1

    resp = continue_once_stopped(client, tenant_key, job_id)
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    assert len(job["result"]["sections"]) == 2
    after = steps_of(job_id)
    assert sorted(after) == ["investigate-1", "investigate-2", "plan", "synthesise"]
    assert after["plan"].attempt == 1
    assert "plan.ready" in event_types(job_id)
    assert_paid_once(standin, job)


def test_a_coding_job_decided_while_it_stopped_continues_to_completed_with_its_counts(
        client: TestClient, tenant_key: str) -> None:
    """Of two candidates, the first passes while its job is cancelling and the second is
    cancelled: the job ends `cancelled`, undecided. Continuing it, the pass decides it at
    once: it completes with the steps it completed as its total, the cancelled candidate
    not counted (as a decision counts the steps it cancels)."""
    from agents.coding.agent import AttemptOutput
    from agents.registry import get_kind
    from core.db import session_factory
    from core.keys import authenticate
    from core.models import StepStatus
    from core.repositories.ledger import Budget
    from orchestrator import dag
    from orchestrator.budget import Carry, Run
    from orchestrator.jobs import create_job
    from orchestrator.runner import _claim
    from orchestrator.watchers import leases

    files = {"calc.py": "def add(a, b):\n    return a + b\n"}
    # Written without publishing its first steps, which this test claims as workers would.
    with session_factory()() as s:
        principal = authenticate(s, tenant_key)
        assert principal is not None
        job_id = create_job(s, tenant_id=principal.tenant_id, kind_name="coding",
                            raw_input={"task": "Fix add", "files": files, "candidates": 2},
                            budget={}, metadata={}).id
        s.commit()
    ids = {k: st.id for k, st in steps_of(job_id).items()}
    assert sorted(ids) == ["code-1-1", "code-2-1"]
    claims = [_claim(ids[k]) for k in ("code-1-1", "code-2-1")]
    first, second = (c for c, _ in (claimed for claimed in claims if claimed is not None))
    kind = get_kind("coding")
    assert kind is not None
    job_input = kind.parse_input(first.job_input)
    for c in (first, second):
        leases.add(c.step_id, c.attempt)
    try:
        cancelling = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
        assert cancelling.json()["status"] == "cancelling"
        passed = AttemptOutput(
            passed=True, exit_code=0, timed_out=False, report="1 passed",
            output_truncated=False, duration_s=0.1, network_isolated=True, candidate=1,
            round=1, files=files, summary="The tests pass.", turns=1, stopped="done",
            test_runs=1)
        run = Run(first.job_id, first.step_id, first.attempt, Budget.of(first.budget))
        with transaction() as s:
            dag.complete(s, first, kind, job_input, passed, Carry(run))
        with transaction() as s:
            dag.end(s, second, StepStatus.CANCELLED, None, None, kind)
    finally:
        for c in (first, second):
            leases.remove(c.step_id, c.attempt)
    job = wait_for_job(client, tenant_key, job_id, timeout=10)
    assert job["status"] == "cancelled", job

    resp = continue_once_stopped(client, tenant_key, job_id)
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "completed", job
    assert job["progress"]["steps_done"] == job["progress"]["steps_total"] == 1, job["progress"]
    after = steps_of(job_id)
    assert (after["code-1-1"].status, after["code-2-1"].status) == ("completed", "cancelled")


def test_a_job_past_its_deadline_continues_on_a_new_clock(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.delay_s = 4
    job_id = submit(client, tenant_key, budget={"max_seconds": 1})
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "deadline_exceeded"
    standin.state.delay_s = 0.0

    resp = continue_once_stopped(client, tenant_key, job_id, {"budget": {"max_seconds": 120}})
    assert resp.status_code == 202, resp.text
    assert resp.json()["budget"]["max_seconds"] == 120
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    with transaction() as s:
        continued = s.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.type == "job.continued")).one()
    assert continued.data["previous"]["error"]["code"] == "deadline_exceeded"
    from datetime import datetime

    deadline = datetime.fromisoformat(continued.data["deadline_at"])
    assert 119 <= (deadline - continued.created_at).total_seconds() <= 121


def test_only_a_stopped_job_of_ones_own_continues(client: TestClient, tenant_key: str,
                                                  standin: Any, worker: Any) -> None:
    from core.db import transaction as tx
    from core.keys import create_key

    h = auth(tenant_key)
    done = wait_for_job(client, tenant_key, submit(client, tenant_key))
    assert done["status"] == "completed"
    resp = client.post(f"/v1/jobs/{done['id']}/continue", headers=h, json={})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "job_completed"

    standin.state.fail_status, standin.state.fail_next = 400, 1
    failed = wait_for_job(client, tenant_key, submit(client, tenant_key))
    assert failed["error"]["code"] == "inference_error"
    resp = client.post(f"/v1/jobs/{failed['id']}/continue", headers=h, json={})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "job_failed"
    assert "inference_error" in resp.json()["error"]["message"]
    assert "deadline_exceeded" in resp.json()["error"]["message"]

    standin.state.delay_s = 2.0
    running_id = submit(client, tenant_key)
    wait_for_job(client, tenant_key, running_id, statuses={"running"}, timeout=30)
    resp = client.post(f"/v1/jobs/{running_id}/continue", headers=h, json={})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "job_not_stopped"
    assert "is running" in resp.json()["error"]["message"]

    def frozen_mid_step() -> bool:
        """The worker paused while it runs a step of the job (so it stays `cancelling`)."""
        os.kill(worker.popen.pid, signal.SIGSTOP)
        if any(st.status == "running" for st in steps_of(running_id).values()):
            return True
        os.kill(worker.popen.pid, signal.SIGCONT)
        return False

    wait_until(frozen_mid_step, 30, what="the worker paused mid-step")
    try:
        cancel = client.post(f"/v1/jobs/{running_id}/cancel", headers=h)
        assert cancel.json()["status"] == "cancelling"
        resp = client.post(f"/v1/jobs/{running_id}/continue", headers=h, json={})
        assert resp.status_code == 409
        assert resp.json()["error"]["code"] == "job_stopping"
    finally:
        os.kill(worker.popen.pid, signal.SIGCONT)
    assert wait_for_job(client, tenant_key, running_id)["status"] == "cancelled"

    # Another tenant's stopped job is not found; bad budgets are 422.
    with tx() as s:
        other, _ = create_key(s, "tenant-other-continue")
    resp = client.post(f"/v1/jobs/{running_id}/continue", headers=auth(other), json={})
    assert resp.status_code == 404
    for body, field in [({"budget": {"step_max_tokens": {"poet": 10}}},
                         "budget.step_max_tokens"),
                        ({"budget": {"max_total_tokens": 0}}, "budget.max_total_tokens"),
                        ({"budget": {}, "extra": 1}, "extra")]:
        resp = client.post(f"/v1/jobs/{running_id}/continue", headers=h, json=body)
        assert resp.status_code == 422, resp.text
        assert field in resp.json()["error"]["message"]
    assert client.get(f"/v1/jobs/{running_id}", headers=h).json()["status"] == "cancelled"


def _cancelled_job(client: TestClient, key: str, standin: Any) -> str:
    standin.state.delay_s = 1.0
    job_id = submit(client, key)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert wait_for_job(client, key, job_id, timeout=30)["status"] == "cancelled"
    wait_until(lambda: not any(st.status == "running" for st in steps_of(job_id).values()),
               30, what="no step running")
    standin.state.delay_s = 0.0
    return job_id


def test_concurrent_continues_make_one_continuation(tenant_key: str, standin: Any,
                                                    client: TestClient,
                                                    api_server: str) -> None:
    job_id = _cancelled_job(client, tenant_key, standin)
    n = 8
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def ask() -> None:
        with httpx.Client(base_url=api_server, headers=auth(tenant_key), timeout=30) as h:
            barrier.wait()
            resp = h.post(f"/v1/jobs/{job_id}/continue", json={})
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    codes = Counter(r.status_code for r in answers)
    assert codes[202] == 1, [r.text for r in answers]
    assert codes[409] == n - 1
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} <= \
        {"job_not_stopped", "job_completed"}
    assert wait_for_job(client, tenant_key, job_id, timeout=60)["status"] == "completed"
    assert event_types(job_id).count("job.continued") == 1


def test_continue_honours_idempotency_keys(client: TestClient, tenant_key: str,
                                           standin: Any) -> None:
    job_id = _cancelled_job(client, tenant_key, standin)
    h = {**auth(tenant_key), "Idempotency-Key": f"continue-{job_id}"}
    body = {"budget": {"max_total_tokens": 30000}}
    first = client.post(f"/v1/jobs/{job_id}/continue", headers=h, json=body)
    assert first.status_code == 202, first.text
    again = client.post(f"/v1/jobs/{job_id}/continue", headers=h, json=body)
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    other = client.post(f"/v1/jobs/{job_id}/continue", headers=h,
                        json={"budget": {"max_total_tokens": 40000}})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert wait_for_job(client, tenant_key, job_id, timeout=60)["status"] == "completed"
    assert event_types(job_id).count("job.continued") == 1


def test_cli_continue(client: TestClient, tenant_key: str, standin: Any,
                      agentq_env: dict[str, str], api_server: str) -> None:
    import subprocess
    import sys

    # Each call spends over 100 tokens; a few fit the budget, not six.
    prompts = [" ".join(["word"] * 100) + f" {i}" for i in range(6)]
    job_id = submit(client, tenant_key, kind="batch",
                    input={"prompts": prompts, "max_tokens": 16},
                    budget={"max_total_tokens": 800})
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "budget_exhausted", job
    env = {**os.environ, **agentq_env, "AGENTQ_URL": api_server, "AGENTQ_API_KEY": tenant_key}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, text=True,
                              capture_output=True, timeout=120)

    low = cli("continue", job_id, "--budget-tokens", str(job["usage"]["total_tokens"]))
    assert low.returncode == 1
    assert "422 budget_not_above_spent" in low.stderr

    def continued() -> dict[str, Any] | None:
        proc = cli("continue", job_id, "--budget-tokens", "20000", "--json")
        if proc.returncode == 1 and "job_stopping" in proc.stderr:
            return None
        assert proc.returncode == 0, proc.stderr
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    out = wait_until(continued, 30, what="the job's steps to stop")
    assert out["status"] == "running"
    assert out["budget"]["max_total_tokens"] == 20000
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed"
    assert len(job["result"]["completions"]) == 6


def test_a_run_stopped_by_a_stop_that_a_continuation_undid_runs_again(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """A run can stop on a stop signal its process saw before the job was continued (the
    signal is read every half second): its step is queued again, not left cancelled in a
    running job that would then never finish."""
    from agents.registry import get_kind
    from core.db import session_factory
    from core.keys import authenticate
    from core.models import StepStatus
    from orchestrator import dag
    from orchestrator.jobs import create_job
    from orchestrator.runner import _claim

    with session_factory()() as s:
        principal = authenticate(s, tenant_key)
        assert principal is not None
        job_id = create_job(s, tenant_id=principal.tenant_id, kind_name="research",
                            raw_input={"query": QUERY, "max_subquestions": 2}, budget={},
                            metadata={}).id
        s.commit()
    claimed = _claim(steps_of(job_id)["plan"].id)
    assert claimed is not None
    c, _ = claimed
    with transaction() as s:
        dag.end(s, c, StepStatus.CANCELLED, None, None, get_kind(c.kind))
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    assert steps_of(job_id)["plan"].attempt == 2
    assert "step.cancelled" not in event_types(job_id)
