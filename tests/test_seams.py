"""Where features meet: promotion and the runs and sweeps that queue a promoted job's steps,
the tenant's cap with windows, promotion and cancellation, windows and max_seconds, timelines
of cancelled and waiting steps, a traced OpenAI batch, and a deciding candidate in a
continued job."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.helpers import auth, wait_until


def test_a_step_running_when_its_job_is_promoted_is_requeued_at_the_promoted_priority(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from core.db import transaction
    from core.models import OutboxMessage, Step
    from core.queue import step_priority
    from core.repositories import steps
    from orchestrator import scheduling, sweeps

    due = datetime.now(UTC) + timedelta(hours=1)
    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Later is fine", "max_tokens": 8},
        "service_tier": "flex", "deadline": due.isoformat()})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with transaction() as s:
        step_id = s.scalars(select(Step.id).where(Step.job_id == job_id)).one()
        # A worker runs it ...
        assert steps.claim(s, step_id, 60) is not None
    # ... when the job is promoted to meet its deadline ...
    wait_until(lambda: scheduling.promote_due(now=due) >= 1, 30,
               what="the job to be promoted")
    # ... and then dies: the sweeper queues the step again, once its lease has run out.
    with transaction() as s:
        s.execute(update(Step).where(Step.id == step_id).values(
            lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    wait_until(lambda: sweeps.requeue_expired() >= 1, 30, what="the step to be requeued")
    with transaction() as s:
        prio = s.scalars(select(OutboxMessage.priority).where(
            OutboxMessage.payload["step_id"].as_string() == step_id)
            .order_by(OutboxMessage.id.desc()).limit(1)).one()
    # Ahead of standard work, as the job's other steps are: not behind it at flex's.
    assert prio is not None
    assert prio <= step_priority("promoted", False) < step_priority("standard", True)


def test_a_cancelled_jobs_timeline_ends_when_the_job_ended(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from core.db import transaction
    from core.models import Job, utcnow
    from orchestrator.timeline import job_timeline

    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Never mind", "max_tokens": 8}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert r.json()["status"] == "cancelled", r.text
    with transaction() as s:
        finished = s.get(Job, job_id).finished_at  # type: ignore[union-attr]
    assert finished is not None
    # Some time after the end, the timeline still ends with the job: its step, queued and
    # cancelled before it ran, was queued until it was cancelled, not until now.
    wait_until(lambda: utcnow() > finished + timedelta(milliseconds=300), 5,
               what="time to pass")
    with transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        timeline = job_timeline(s, job)
    job_end_ms = (finished - job.created_at).total_seconds() * 1000
    assert timeline.end_ms <= job_end_ms + 1, (timeline.end_ms, job_end_ms)
    [lane] = timeline.lanes
    assert [seg.phase for seg in lane.segments] == ["queue"]
    assert lane.segments[0].end_ms <= job_end_ms + 1


@pytest.fixture
def schedule(agentq_env: dict[str, str]) -> Iterator[datetime]:
    """A grid schedule whose cheapest hour is 6 hours from now (in this process's settings:
    the API under test); yields now."""
    from core import grid
    from core.settings import get_settings

    now = datetime.now(UTC)
    cheap = (now.hour + 6) % 24
    settings = get_settings()
    old = settings.grid_schedule
    settings.grid_schedule = [{"price": 0.05 if h == cheap else 0.30, "carbon": 100.0}
                              for h in range(24)]
    grid.schedules.cache_clear()
    yield now
    settings.grid_schedule = old
    grid.schedules.cache_clear()


@pytest.fixture
def tenant_cap(agentq_env: dict[str, str]) -> Iterator[int]:
    """A cap of 3 steps in the broker per tenant (this process's settings)."""
    from core.settings import get_settings

    settings = get_settings()
    old = settings.tenant_queued_steps_max
    settings.tenant_queued_steps_max = 3
    yield 3
    settings.tenant_queued_steps_max = old


def test_a_deferred_job_promoted_before_its_hour_starts_within_the_tenants_cap(
        client: TestClient, tenant_key: str, schedule: datetime, tenant_cap: int,
        quiet_workers: None) -> None:
    from core.db import transaction
    from core.models import Step
    from orchestrator import scheduling

    due = schedule + timedelta(hours=20)
    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": [f"p{i}" for i in range(12)], "max_tokens": 4},
        "service_tier": "flex", "deadline": due.isoformat(), "optimize": "cost"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["planned_start"] is not None

    def statuses() -> list[str]:
        with transaction() as s:
            return sorted(st.status for st in s.query(Step).filter(Step.job_id == job["id"]))

    assert statuses() == ["deferred"] * 12
    # Its deadline nears before its hour has come: promoted, it starts now, as a job whose
    # hour came starts: no more of its steps in the broker than the tenant's cap.
    wait_until(lambda: scheduling.promote_due(now=due) >= 1, 30,
               what="the job to be promoted")
    assert statuses() == ["held"] * (12 - tenant_cap) + ["queued"] * tenant_cap


def test_a_planned_start_leaves_the_job_its_max_seconds(
        client: TestClient, tenant_key: str, schedule: datetime, quiet_workers: None) -> None:
    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Overnight", "max_tokens": 8},
        "service_tier": "flex", "deadline": (schedule + timedelta(hours=20)).isoformat(),
        "optimize": "cost", "budget": {"max_seconds": 1800}})
    assert r.status_code == 202, r.text
    job = r.json()
    # The cheap hour is 6 hours away, but the job ends `deadline_exceeded` 30 minutes after
    # its submission: waiting for that hour would fail it before it ran.
    assert job["planned_start"] is None or datetime.fromisoformat(job["planned_start"]) \
        < schedule + timedelta(seconds=1800), job


def test_the_steps_a_run_adds_after_its_job_was_promoted_go_at_the_promoted_priority(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from agents.registry import get_kind
    from agents.research.models import PlanOutput
    from core.db import transaction
    from core.models import OutboxMessage, Step
    from core.queue import step_priority
    from core.repositories import jobs, steps
    from core.repositories.ledger import Budget
    from orchestrator import dag, scheduling
    from orchestrator.budget import Carry, Run

    due = datetime.now(UTC) + timedelta(hours=1)
    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "How do bees make honey?"},
        "service_tier": "flex", "deadline": due.isoformat()})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with transaction() as s:
        plan_id = s.scalars(select(Step.id).where(Step.job_id == job_id)).one()
        claimed = steps.claim(s, plan_id, 60)  # a worker runs the plan ...
        jobs.started_step(s, job_id, "plan", True)
    assert claimed is not None
    assert not claimed.promoted
    # ... when the job is promoted ...
    wait_until(lambda: scheduling.promote_due(now=due) >= 1, 30,
               what="the job to be promoted")
    # ... and then the plan completes: the investigators it adds are the promoted job's.
    kind = get_kind("research")
    assert kind is not None
    with transaction() as s:
        dag.complete(s, claimed, kind, kind.parse_input(claimed.job_input),
                     PlanOutput(subquestions=["Where is nectar?", "What do bees do?"]),
                     Carry(Run(job_id, plan_id, claimed.attempt, Budget.of(claimed.budget))))
    with transaction() as s:
        added = dict(s.execute(select(Step.id, Step.priority).where(
            Step.job_id == job_id, Step.key.like("investigate-%"))).all())
        published = {str(p["step_id"]): prio for p, prio in s.execute(
            select(OutboxMessage.payload, OutboxMessage.priority))
            if p.get("step_id") in added}
    promoted = step_priority("promoted", True)
    assert len(added) == 2
    assert set(added.values()) == {promoted}, added
    assert published == dict.fromkeys(added, promoted), published


@pytest.fixture
def tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans recorded in this process (the API under test), exported nowhere."""
    from opentelemetry.sdk.trace import TracerProvider

    from core import tracing

    monkeypatch.setattr(tracing, "_tracer", TracerProvider().get_tracer("test"))
    monkeypatch.setattr(tracing, "_on", True)


def test_an_openai_batch_has_its_jobs_trace(client: TestClient, tenant_key: str,
                                            tracing_on: None, quiet_workers: None) -> None:
    import json

    from core.db import transaction
    from core.models import Job

    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "standin-model", "prompt": "Hi", "max_tokens": 4}})
    r = client.post("/v1/files", headers=auth(tenant_key), data={"purpose": "batch"},
                    files={"file": ("requests.jsonl", (line + "\n").encode())})
    assert r.status_code == 200, r.text
    r = client.post("/v1/batches", headers=auth(tenant_key), json={
        "input_file_id": r.json()["id"], "endpoint": "/v1/completions",
        "completion_window": "24h"})
    assert r.status_code == 200, r.text
    with transaction() as s:
        job = s.get(Job, r.json()["id"])
        assert job is not None
        # Traced as every job is: its steps' spans and model calls under the job's span.
        assert job.trace_context is not None


def test_a_step_waiting_for_its_children_is_not_shown_running(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from core.db import transaction
    from core.models import Job, Step, utcnow
    from core.repositories import step_deps, steps
    from orchestrator.timeline import job_timeline

    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Ask the helpers", "max_tokens": 8}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with transaction() as s:
        step_id = s.scalars(select(Step.id).where(Step.job_id == job_id)).one()
        c = steps.claim(s, step_id, 60)
        assert c is not None
    # The run spawns a child and ends waiting for it: it holds no worker meanwhile.
    with transaction() as s:
        assert step_deps.wait_for(s, step_id, c.attempt, ["lead.1"], 1)
    suspended = utcnow()
    wait_until(lambda: utcnow() > suspended + timedelta(milliseconds=300), 5,
               what="time to pass")
    with transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        [lane] = job_timeline(s, job).lanes
    assert lane.status == "pending"
    [run] = [seg for seg in lane.segments if seg.phase == "run"]
    suspended_ms = (suspended - job.created_at).total_seconds() * 1000
    assert run.end_ms <= suspended_ms + 1, (run, suspended_ms)
    # Its next run (its children done) is shown running from its claim, with no end yet.
    with transaction() as s:
        s.execute(update(Step).where(Step.id == step_id).values(status="queued"))
        again = steps.claim(s, step_id, 60)
        assert again is not None
        job = s.get(Job, job_id)
        assert job is not None
        [lane] = job_timeline(s, job).lanes
        step = s.get(Step, step_id)
        assert step is not None
        assert step.finished_at is None
    [run] = [seg for seg in lane.segments if seg.phase == "run"]
    assert run.end_ms > suspended_ms


def test_a_candidate_that_passed_while_its_job_stopped_decides_the_continued_job(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from agents.coding.agent import AttemptOutput
    from agents.registry import get_kind
    from core.db import transaction
    from core.models import Step
    from core.repositories import jobs, steps
    from core.repositories.ledger import Budget
    from orchestrator import dag
    from orchestrator.budget import Carry, Run

    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "coding", "input": {"task": "Make add add.", "candidates": 2,
                                    "files": {"calc.py": "def add(a, b):\n    return a - b\n"}}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with transaction() as s:
        first = s.scalars(select(Step.id).where(Step.job_id == job_id,
                                                Step.key == "code-1-1")).one()
        claimed = steps.claim(s, first, 60)  # a worker runs candidate 1 ...
        jobs.started_step(s, job_id, "coding", True)
    assert claimed is not None
    # ... the job is cancelled while it runs, and it passes as it stops.
    assert client.post(f"/v1/jobs/{job_id}/cancel",
                       headers=auth(tenant_key)).json()["status"] == "cancelling"
    kind = get_kind("coding")
    assert kind is not None
    passed = AttemptOutput(
        passed=True, exit_code=0, timed_out=False, report="1 passed", output_truncated=False,
        duration_s=0.1, network_isolated=True, candidate=1, round=1,
        files={"calc.py": "def add(a, b):\n    return a + b\n"}, summary="Fixed.", turns=2,
        stopped="done", test_runs=1)
    with transaction() as s:
        dag.complete(s, claimed, kind, kind.parse_input(claimed.job_input), passed,
                     Carry(Run(job_id, first, claimed.attempt, Budget.of(claimed.budget))))
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()["status"] \
        == "cancelled"
    # Continued, it has its answer already: the passing candidate decides it, and the other
    # candidate is not run again.
    r = client.post(f"/v1/jobs/{job_id}/continue", headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()
    assert job["status"] == "completed", job
    assert job["result"]["passed"] is True, job["result"]
    shown = client.get(f"/v1/jobs/{job_id}/steps", headers=auth(tenant_key)).json()["data"]
    assert {st["key"]: st["status"] for st in shown} == {
        "code-1-1": "completed", "code-2-1": "cancelled"}


def test_cancelling_a_job_makes_room_for_the_tenants_held_steps(
        client: TestClient, tenant_key: str, tenant_cap: int, quiet_workers: None) -> None:

    def submit(n: int) -> str:
        return _submit_batch(client, tenant_key, n)

    first, second = submit(5), submit(4)
    assert _statuses(first) == ["held"] * (5 - tenant_cap) + ["queued"] * tenant_cap
    assert _statuses(second) == ["held"] * 4
    r = client.post(f"/v1/jobs/{first}/cancel", headers=auth(tenant_key))
    assert r.json()["status"] == "cancelled", r.text
    # The cancelled job's queued steps left the tenant's room: the other job's held steps
    # take it at once, as when a step completes (not at the sweeper's next pass).
    assert _statuses(second) == ["held"] * (4 - tenant_cap) + ["queued"] * tenant_cap


def test_a_job_that_ends_otherwise_makes_room_for_the_tenants_held_steps(
        client: TestClient, tenant_key: str, tenant_cap: int, quiet_workers: None) -> None:
    """A job that fails, runs out of budget or passes its deadline leaves the broker as a
    cancelled one does: the tenant's held steps take its room at once."""
    from core.db import transaction
    from core.models import JobStatus
    from orchestrator import dag

    def submit(n: int) -> str:
        return _submit_batch(client, tenant_key, n)

    first, second = submit(5), submit(4)
    assert _statuses(second) == ["held"] * 4
    with transaction() as s:
        dag.finish(s, first, JobStatus.FAILED, error=("deadline_exceeded", "too late"))
    assert _statuses(first) == ["cancelled"] * 5
    assert _statuses(second) == ["held"] * (4 - tenant_cap) + ["queued"] * tenant_cap


def _submit_batch(client: TestClient, tenant_key: str, n: int) -> str:
    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": [f"p{i}" for i in range(n)], "max_tokens": 4}})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _statuses(job_id: str) -> list[str]:
    from core.db import transaction
    from core.models import Step

    with transaction() as s:
        return sorted(st.status for st in s.query(Step).filter(Step.job_id == job_id))
