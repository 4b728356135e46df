"""A worker's step slots: a completion's fan-out runs on the process's free slots, claimed in
the completing transaction, and never more steps at once than the worker's concurrency."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from orchestrator.slots import Slots
from tests.helpers import auth, wait_for_job, wait_until
from tests.stack import isolated_stack


def test_a_delivery_waits_for_a_slot_that_fan_out_holds() -> None:
    slots = Slots(3)
    slots.take()  # a delivery runs
    assert slots.try_take(5) == 2  # the fan-out gets what is free, no more
    assert slots.try_take(1) == 0
    waiting = threading.Thread(target=slots.take)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # a delivery waits: the process runs 3 steps at most
    released = threading.Event()
    slots.run(lambda: None if released.wait(10) else None)  # a fanned-out step, on a slot
    slots.give(1)  # the other was not needed
    waiting.join(5)
    assert not waiting.is_alive()
    assert slots.free == 0
    released.set()
    wait_until(lambda: slots.free == 1, 5, what="the slot of the step run here")
    slots.close()


def test_a_step_that_fails_on_a_local_slot_gives_it_back() -> None:
    slots = Slots(1)
    assert slots.try_take(1) == 1

    def crash() -> None:
        raise RuntimeError("boom")

    slots.run(crash)
    wait_until(lambda: slots.free == 1, 5, what="the slot back")
    slots.close()
    assert slots.try_take(1) == 0  # closing: no more fan-out here
    slots.run(lambda: None)  # after close: not run, the slot given back, nothing raised
    assert slots.free == 1


@pytest.mark.parametrize(("concurrency", "fanout", "claimed"), [
    (None, None, 3),  # the defaults: every investigator starts with the plan's completion
    (2, None, 2),  # the plan's slot and one free: one investigator here, one more beside it
    (None, "0", 1),  # no fan-out: the one run next in the same thread
])
def test_the_plans_completion_claims_the_investigators_this_worker_has_slots_for(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path,
        concurrency: int | None, fanout: str | None, claimed: int) -> None:
    """One research job (a plan, three investigators, a synthesis) on a worker of its own.
    The investigators claimed in the plan's completing transaction are those whose
    `step.started` event shares the transaction id (`xmin`) of the plan's `step.completed`;
    the rest went through the broker. The job completes either way, each step run once."""
    env = {"AGENTQ_WORKER_LOCAL_FANOUT": fanout} if fanout is not None else {}
    with isolated_stack(database_url, agentq_env, tmp_path, "_slots") as stack:
        stack.worker("only", concurrency, **env)
        key = stack.key("slots")
        with httpx.Client(base_url=stack.api, timeout=30) as http:
            resp = http.post("/v1/jobs", headers=auth(key), json={
                "kind": "research", "input": {"query": "Why do glaciers move?"}})
            assert resp.status_code == 202, resp.text
            job_id = resp.json()["id"]
            job = wait_for_job(http, key, job_id, timeout=60)
        assert job["status"] == "completed", job
        engine = create_engine(stack.env["AGENTQ_DATABASE_URL"])
        try:
            with engine.connect() as conn:
                rows = list(conn.execute(text(
                    "SELECT xmin::text, type, data->>'step' FROM job_events "
                    "WHERE job_id = :j AND type IN ('step.started', 'step.completed')"),
                    {"j": job_id}))
                attempts = list(conn.execute(text(
                    "SELECT attempt FROM steps WHERE job_id = :j"), {"j": job_id}))
        finally:
            engine.dispose()
    plan_txn = next(x for x, t, k in rows if t == "step.completed" and k == "plan")
    with_plan = {k for x, t, k in rows if t == "step.started" and x == plan_txn}
    assert len(with_plan) == claimed, rows
    assert all(k.startswith("investigate") for k in with_plan)
    assert sorted(a for a, in attempts) == [1] * 5
