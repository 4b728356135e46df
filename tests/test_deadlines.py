"""Flex jobs with deadlines: checked at submission, promoted on an injected clock when their
estimated time to finish no longer fits (by the pass before the one that would be too late,
the sweeper's passes starting an interval apart), or at submission when it already does not,
the estimate leaving out the time flex jobs waited by design, and met with real workers under
another tenant's flood (counted in /metrics); a run claimed before its job's promotion has
its later calls admitted as promoted."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import TERMINAL, auth, metric, wait_until
from tests.stack import isolated_stack
from tests.test_agent_loops import ANSWER, MARKER, Q1, Q2, SEARCH, make_corpus


def _flex(deadline: datetime | str, tier: str = "flex") -> dict[str, Any]:
    return {"kind": "completion", "input": {"prompt": "Later is fine", "max_tokens": 8},
            "service_tier": tier,
            "deadline": deadline if isinstance(deadline, str) else deadline.isoformat()}


def test_deadlines_are_checked(client: TestClient, tenant_key: str) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    for body, words in [
        (_flex(soon, "standard"), "only flex jobs"),
        (_flex(datetime.now(UTC) - timedelta(minutes=1)), "has passed"),
        (_flex(datetime.now(UTC) + timedelta(days=8)), "7 days"),
        (_flex("2026-12-01T06:00:00"), "time zone"),
    ]:
        r = client.post("/v1/jobs", json=body, headers=auth(tenant_key))
        assert r.status_code == 422, r.text
        assert words in r.json()["error"]["message"], r.text


def test_a_flex_job_is_promoted_when_its_deadline_nears(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from core.db import transaction
    from core.models import Step
    from core.queue import step_priority
    from orchestrator import scheduling

    due = datetime.now(UTC) + timedelta(hours=1)
    r = client.post("/v1/jobs", json=_flex(due), headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["deadline"] is not None

    def priorities() -> set[int | None]:
        with transaction() as s:
            return {st.priority for st in s.query(Step).filter(Step.job_id == job_id)}

    assert priorities() == {step_priority("flex", False)}
    # An hour ahead, against an estimate of a minute (no completed jobs of the kind measured
    # yet, AGENTQ_DEADLINE_DEFAULT_ESTIMATE_S) twice over: not yet.
    scheduling.promote_due(now=datetime.now(UTC))
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()["promoted_at"] \
        is None
    # On a clock moved to the deadline (so whatever the kind's measured run time, which other
    # jobs of the kind may have made short): promoted, its step ahead of standard's. (A
    # worker's sweeper may hold the job's row for a moment: its pass skips locked rows.)
    wait_until(lambda: scheduling.promote_due(now=due) >= 1, 30,
               what="the job to be promoted")
    body = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()
    assert body["promoted_at"] is not None
    assert body["service_tier"] == "flex"  # still priced as flex
    assert priorities() == {step_priority("promoted", False)}
    assert step_priority("promoted", False) < step_priority("standard", True)
    types = [e["type"] for e in client.get(f"/v1/jobs/{job_id}/events",
                                           headers=auth(tenant_key)).json()["data"]]
    assert "job.promoted" in types


def test_the_sweeper_promotes_a_job_its_next_pass_would_find_too_late(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from core.db import transaction
    from core.settings import get_settings
    from orchestrator import scheduling

    due = datetime.now(UTC) + timedelta(hours=1)
    r = client.post("/v1/jobs", json=_flex(due), headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def promoted() -> bool:
        return client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()[
            "promoted_at"] is not None

    settings = get_settings()
    interval = settings.outbox_sweep_interval_s
    with transaction() as s:
        estimate = scheduling.estimate_s(s, "completion", now=due)
    margin = settings.deadline_safety * estimate
    # Time left over the safety margin by more than an interval: the next pass is soon enough.
    scheduling.promote_due(now=due - timedelta(seconds=margin + 1.5 * interval))
    assert not promoted()
    # Over the margin by less than an interval: the next pass would come past it, so now.
    at = due - timedelta(seconds=margin + 0.5 * interval)
    wait_until(lambda: scheduling.promote_due(now=at) >= 0 and promoted(), 30,
               what="the job to be promoted")


def test_the_sweeper_starts_its_passes_an_interval_apart() -> None:
    import statistics
    import threading
    import time

    from workers.tasks import every

    starts: list[float] = []
    stop = threading.Event()

    def a_pass() -> None:
        starts.append(time.monotonic())
        if len(starts) == 5:
            stop.set()
        stop.wait(0.3)  # a pass that takes a while

    every(0.5, a_pass, stop)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # From start to start; an interval after each pass's end would make them 0.8 s apart.
    assert 0.45 < statistics.mean(gaps) < 0.65, gaps


def test_a_job_due_within_its_lead_is_promoted_at_submission(
        client: TestClient, tenant_key: str, quiet_workers: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from core.db import transaction
    from core.models import Step
    from core.queue import step_priority
    from core.settings import get_settings

    # Due within the sweeper's interval alone (whatever the kind's estimate, which the jobs of
    # earlier tests set): the next pass could come too late, so the job is promoted as it is
    # created.
    monkeypatch.setattr(get_settings(), "outbox_sweep_interval_s", 60.0)
    r = client.post("/v1/jobs", json=_flex(datetime.now(UTC) + timedelta(seconds=30)),
                    headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["promoted_at"] is not None
    assert r.json()["service_tier"] == "flex"
    with transaction() as s:
        assert {st.priority for st in s.query(Step).filter(Step.job_id == job_id)} == {
            step_priority("promoted", False)}
    events = client.get(f"/v1/jobs/{job_id}/events", headers=auth(tenant_key)).json()["data"]
    assert "job.promoted" in [e["type"] for e in events]


def test_the_estimate_leaves_out_the_time_a_flex_job_waited_by_design(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from sqlalchemy import update

    from core.db import transaction
    from core.models import Job, JobStatus
    from core.repositories import jobs

    soon = datetime.now(UTC) + timedelta(hours=1)
    bodies = [_flex(soon), _flex(soon), _flex(soon, "standard") | {"deadline": None}]
    ids = [client.post("/v1/jobs", json=b, headers=auth(tenant_key)).json()["id"]
           for b in bodies]
    # Finished in the future, so that only these jobs count from there on: a flex job promoted
    # while it waited (10 s from its promotion), one that started as flex (4 s from its
    # start), and a standard one (6 s from its submission).
    end = datetime.now(UTC) + timedelta(days=30)
    times = [(100, 9, 10), (100, 4, None), (6, 1, None)]  # seconds before the end
    try:
        with transaction() as s:
            for job_id, (created, started, promoted) in zip(ids, times, strict=True):
                s.execute(update(Job).where(Job.id == job_id).values(
                    status=JobStatus.COMPLETED, created_at=end - timedelta(seconds=created),
                    started_at=end - timedelta(seconds=started), finished_at=end,
                    promoted_at=None if promoted is None else end - timedelta(seconds=promoted)))
        with transaction() as s:
            rates = jobs.mean_run_s(s, end - timedelta(seconds=1))
        assert rates["completion"] == pytest.approx((10 + 4 + 6) / 3)
    finally:
        with transaction() as s:
            s.execute(update(Job).where(Job.id.in_(ids)).values(
                status=JobStatus.CANCELLED, finished_at=datetime.now(UTC)))


def test_a_run_claimed_before_its_promotion_has_its_later_calls_admitted_as_promoted(
        client: TestClient, tenant_key: str, standin: Any, quiet_workers: None) -> None:
    from sqlalchemy import select

    from core.db import transaction
    from core.models import Job, Step
    from inference.pool import Completion, CompletionRequest, Pool
    from orchestrator import runner, scheduling
    from orchestrator.watchers import stopping

    standin.state.plan_text = json.dumps([Q1, Q2])
    standin.state.scripts = {MARKER: [SEARCH, ANSWER]}  # two calls in the investigator's run
    corpus = make_corpus(client, tenant_key)
    due = datetime.now(UTC) + timedelta(hours=1)
    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "service_tier": "flex", "deadline": due.isoformat(),
        "input": {"query": "How do bees make and keep honey?", "max_subquestions": 2,
                  "corpus_id": corpus, "effort": "medium"}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def step_id(key: str) -> str:
        with transaction() as s:
            return str(s.scalar(select(Step.id).where(Step.job_id == job_id, Step.key == key)))

    def promoted() -> bool:
        with transaction() as s:
            return s.scalar(select(Job.promoted_at).where(Job.id == job_id)) is not None

    tiers: list[str] = []

    class Promoting(Pool):
        """The real pool; after the investigator's first call its job is promoted (by the
        sweeper's pass, on a clock at the deadline) and the stop watcher has read it."""

        def complete(self, req: CompletionRequest) -> Completion:
            done = super().complete(req)
            if req.request_id.startswith(step_id("investigate-1") + ":"):
                tiers.append(req.service_tier)
                if len(tiers) == 1:
                    wait_until(lambda: scheduling.promote_due(now=due) >= 0 and promoted(),
                               30, what="the job to be promoted")
                    stopping.tick()
            return done

    pool = Promoting()
    try:
        runner.run_step(step_id("plan"), pool=pool)  # a flex job's next steps go to the broker
        runner.run_step(step_id("investigate-1"), pool=pool)
    finally:
        pool.close()
        client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert len(tiers) >= 2, tiers
    assert tiers[0] == "flex"
    assert set(tiers[1:]) == {"promoted"}, tiers


@pytest.mark.usefixtures("standin")
def test_a_deadline_is_met_under_a_flood(database_url: str, agentq_env: dict[str, str],
                                         tmp_path: Path, standin: Any) -> None:
    with standin.state.lock:
        standin.state.delay_s = 0.1
    env = {"AGENTQ_DEADLINE_DEFAULT_ESTIMATE_S": "4", "AGENTQ_DEADLINE_SAFETY": "1"}
    with isolated_stack(database_url, {**agentq_env, **env}, tmp_path, "_due") as stack:
        busy, patient = stack.key("busy"), stack.key("patient")
        stack.worker("w1", concurrency=1)
        flood = {"kind": "batch", "input": {"prompts": [f"p{i}" for i in range(100)],
                                            "max_tokens": 4}}
        r = httpx.post(f"{stack.api}/v1/jobs", json=flood, headers=auth(busy), timeout=30)
        flood_id = r.json()["id"]
        due = datetime.now(UTC) + timedelta(seconds=10)
        r = httpx.post(f"{stack.api}/v1/jobs", json=_flex(due), headers=auth(patient),
                       timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def ended() -> dict[str, Any] | None:
            body = httpx.get(f"{stack.api}/v1/jobs/{job_id}", headers=auth(patient),
                             timeout=30).json()
            return body if body["status"] in TERMINAL else None

        job = wait_until(ended, 60, what="the flex job")
        flood_job = httpx.get(f"{stack.api}/v1/jobs/{flood_id}", headers=auth(busy),
                              timeout=30).json()
        assert job["status"] == "completed"
        assert job["promoted_at"] is not None
        assert datetime.fromisoformat(job["finished_at"]) <= due, (job["finished_at"], due)
        # Without the promotion it would have waited for the whole flood (flex goes last).
        assert flood_job["status"] == "running"
        assert flood_job["progress"]["steps_done"] < 100
        assert metric(stack.api, "agentq_deadline_misses_total") == 0
        assert metric(stack.api, "agentq_jobs_promoted_total") == 1
