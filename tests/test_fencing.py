"""Fencing: a run that lost its step (its worker stopped past the lease) cannot write.

One worker is stopped with SIGSTOP while its model call is in flight, for longer than the step's
lease; a second worker claims the step (the next attempt; the first run's reservation expired
with its lease and is released by this claim) and makes the call again; the first worker is
continued with SIGCONT. Its call had really happened at the server, so it goes into the ledger,
billed only if the budget still has room; its output and completion are refused. With room for
one reservation and a half, the late call is billed; with room for exactly one, it is kept in
the ledger unbilled. A reservation released twice, or spend past the budget, would show.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.models import Job, ModelCall, Reservation, Step
from orchestrator.budget import Hold
from tests.conftest import REDIS_URL
from tests.helpers import auth, start_worker, wait_for_job, wait_until

PROMPT = ("Fencing keeps a stale run from writing: every write it makes is conditional on the "
          "attempt it claimed")


def _step(job_id: str) -> Step | None:
    with transaction(read_only=True) as s:
        return s.scalars(select(Step).where(Step.job_id == job_id)).first()


def _leader(job_id: str) -> str | None:
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(f"agentq:callkey:{job_id}:*"):
        value = r.get(key)
        return value.decode() if isinstance(value, bytes) else None
    return None


@pytest.mark.usefixtures("quiet_workers")
@pytest.mark.parametrize(("room", "late"), [(1.5, "billed"), (1.0, "unbilled")])
def test_a_worker_stopped_past_its_lease_cannot_overspend_or_write(
        client: TestClient, tenant_key: str, standin: Any, agentq_env: dict[str, str],
        tmp_path: Path, room: float, late: str) -> None:
    standin.state.delay_s = 3.0
    one_call = Hold.for_call("r", PROMPT, 8).tokens
    budget = int(one_call * room)  # room for one call's reservation at a time
    first = start_worker(agentq_env, tmp_path / "first.log")
    second = None
    try:
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "completion", "input": {"prompt": PROMPT, "max_tokens": 8},
            "budget": {"max_total_tokens": budget}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        step = wait_until(lambda: (st := _step(job_id)) is not None and st.attempt == 1
                          and st.status == "running" and st, 30, what="the first run")
        wait_until(lambda: f"{step.id}:1:0" in standin.state.request_ids, 30,
                   what="the first run's model call to reach the server")
        os.kill(first.popen.pid, signal.SIGSTOP)
        try:
            second = start_worker(agentq_env, tmp_path / "second.log")
            # The lease runs out; the second worker's sweeper queues the step and claims it.
            wait_until(lambda: (st := _step(job_id)) is not None and st.attempt == 2, 60,
                       what="a second run of the step")
            # The second run takes the lead of the call from the first (which no longer
            # holds its step) and makes it.
            wait_until(lambda: _leader(job_id) == f"{step.id}:2:0", 30,
                       what="the second run to make the call")
        finally:
            os.kill(first.popen.pid, signal.SIGCONT)
        job = wait_for_job(client, tenant_key, job_id, timeout=60)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert job["status"] == "completed", job
    assert job["usage"]["total_tokens"] <= budget
    sent = [r for r in standin.state.request_ids if r.startswith(f"{step.id}:")]
    assert sorted(sent) == [f"{step.id}:1:0", f"{step.id}:2:0"]  # both runs called
    with transaction(read_only=True) as s:
        rows = s.execute(select(ModelCall.request_id, ModelCall.attempt, ModelCall.prompt_tokens
                                + ModelCall.completion_tokens, ModelCall.settled_late)
                         .where(ModelCall.job_id == job_id)).all()
        row = s.get(Job, job_id)
        assert row is not None
        held = s.scalar(select(func.count()).select_from(Reservation)
                        .where(Reservation.job_id == job_id))
        final = s.get(Step, step.id)
        assert final is not None
    assert len(rows) == len(sent)  # the server's calls are the ledger's rows
    by_run = {r[1]: r for r in rows}
    assert set(by_run) == {1, 2}
    assert by_run[2][3] is None  # settled against its own reservation
    assert by_run[1][3] == late  # settled after its reservation was released with its lease
    billed = sum(r[2] for r in rows if r[3] != "unbilled")
    assert billed == job["usage"]["total_tokens"] <= budget
    assert row.reserved_tokens == 0
    assert row.reserved_cost_usd == 0
    assert held == 0
    assert final.attempt == 2
    assert final.status == "completed"
    # the stale run's output was refused: the job's result is the second run's
    assert job["result"]["text"].startswith(" Stand-in answer")
    assert "lost its step" in first.output()
