"""Service tiers and the per-tenant cap with real processes (an API, Celery workers, a Redis
server and a database of the test's own): tier order at the queue, discounts priced on the
ledger, tenants limited to some tiers, and a flooding tenant that cannot hold back another
tenant's first step while its held steps are released as its count falls."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from core.pricing import price_for
from tests.conftest import REDIS_URL
from tests.helpers import ROOT, TERMINAL, auth, wait_until
from tests.stack import Stack, isolated_stack

pytestmark = pytest.mark.usefixtures("standin")


def _db(stack: Stack) -> psycopg.Connection[Any]:
    url = make_url(stack.env["AGENTQ_DATABASE_URL"]).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def _submit(stack: Stack, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.api}/v1/jobs", json=body, headers=auth(key), timeout=30)


def _completion(tier: str, prompt: str = "The capital of France is") -> dict[str, Any]:
    return {"kind": "completion", "input": {"prompt": prompt, "max_tokens": 8},
            "service_tier": tier}


def _all_done(stack: Stack, key: str, ids: list[str]) -> bool:
    return all(httpx.get(f"{stack.api}/v1/jobs/{i}", headers=auth(key), timeout=30)
               .json()["status"] in TERMINAL for i in ids)


def test_tiers_order_the_queue_price_the_ledger_and_are_checked(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path) -> None:
    env = {"AGENTQ_TIER_DISCOUNTS": '{"flex": 0.5, "interactive": 0}',
           "AGENTQ_TENANT_TIERS": '{"only-flex": ["flex"]}'}
    with isolated_stack(database_url, {**agentq_env, **env}, tmp_path, "_tiers") as stack:
        key = stack.key("tiers-a")
        # No worker yet: nine jobs wait in the broker, submitted flex first.
        ids: dict[str, str] = {}
        for n in range(3):
            for tier in ("flex", "standard", "interactive"):
                r = _submit(stack, key, _completion(tier, f"Prompt {tier} {n}"))
                assert r.status_code == 202, r.text
                assert r.json()["service_tier"] == tier
                ids[r.json()["id"]] = tier
        stack.worker("w1", concurrency=1)
        wait_until(lambda: _all_done(stack, key, list(ids)), 60, what="the nine jobs")
        with _db(stack) as db:
            started = [ids[j] for (j,) in db.execute(
                "SELECT job_id FROM steps ORDER BY started_at")]
        assert started == ["interactive"] * 3 + ["standard"] * 3 + ["flex"] * 3, started

        # The same call at standard and at flex: the flex row records its tier and half
        # the price.
        with _db(stack) as db:
            rows = db.execute(
                "SELECT service_tier, model, prompt_tokens, completion_tokens, "
                "cached_tokens, cost_usd FROM model_calls").fetchall()
        assert {r[0] for r in rows} == {"interactive", "standard", "flex"}
        for tier, model, prompt, completion, cached, cost in rows:
            full = price_for(model).cost(prompt, completion, cached or 0)
            expected = full * Decimal("0.5") if tier == "flex" else full
            assert abs(Decimal(cost) - expected) < Decimal("1e-12"), (tier, cost, expected)
            assert full > 0

        # A tenant limited to flex: 403 for other tiers, saying which it may use; an unknown
        # tier is 422.
        limited = stack.key("only-flex")
        r = _submit(stack, limited, _completion("interactive"))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "tier_not_allowed"
        assert "'flex'" in r.json()["error"]["message"]
        assert _submit(stack, limited, _completion("flex")).status_code == 202
        r = _submit(stack, key, _completion("urgent"))
        assert r.status_code == 422, r.text
        assert "service_tier" in r.text


CAP, CONCURRENCY, JOBS, PROMPTS = 8, 4, 10, 20


def test_a_flooding_tenant_cannot_hold_back_another_tenants_first_step(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path, standin: Any) -> None:
    with standin.state.lock:
        standin.state.delay_s = 0.03  # the flood lasts a few seconds
    env = {"AGENTQ_TENANT_QUEUED_STEPS_MAX": str(CAP)}
    with isolated_stack(database_url, {**agentq_env, **env}, tmp_path, "_flood") as stack:
        flood, other = stack.key("flooder"), stack.key("other")
        stack.worker("w1", concurrency=CONCURRENCY)
        batch = {"kind": "batch", "input": {"prompts": [f"p{i}" for i in range(PROMPTS)],
                                            "max_tokens": 4}}
        flood_ids = [_submit(stack, flood, batch).json()["id"] for _ in range(JOBS)]
        with _db(stack) as db:
            (tenant,) = db.execute("SELECT tenant_id FROM jobs WHERE id = %s",
                                   (flood_ids[0],)).fetchone() or ("",)

            def waiting() -> tuple[int, int]:
                counts = dict(db.execute(
                    "SELECT status, count(*) FROM steps WHERE tenant_id = %s AND status IN "
                    "('queued', 'held') GROUP BY status", (tenant,)).fetchall())
                return int(counts.get("queued", 0)), int(counts.get("held", 0))

            queued, held = waiting()
            # The cap holds, give or take the completions running at once (the worker's
            # slots): each reads the count without a lock.
            assert queued <= CAP + CONCURRENCY, (queued, held)
            assert held > JOBS * PROMPTS // 2, (queued, held)

            r = _submit(stack, other, _completion("standard"))
            assert r.status_code == 202
            other_id = r.json()["id"]
            wait_until(lambda: _all_done(stack, other, [other_id]), 60,
                       what="the other tenant's job")
            # While the flood still waits, the other tenant's step started after at most the
            # flooder's steps in the broker (the cap) and those its workers had taken.
            _, still_held = waiting()
            (ahead,) = db.execute(
                "SELECT count(*) FROM steps s, jobs o, steps os WHERE s.tenant_id = %s "
                "AND o.id = %s AND os.job_id = o.id AND s.started_at > o.created_at "
                "AND s.started_at < os.started_at", (tenant, other_id)).fetchone() or (0,)
            assert still_held > 0, "the flood ended before the other job ran"
            assert ahead <= CAP + 2 * CONCURRENCY, ahead

            # Every held step is released as the flooder's count falls: all its jobs end.
            peak = [0]

            def flood_done() -> bool:
                peak[0] = max(peak[0], waiting()[0])
                return _all_done(stack, flood, flood_ids)

            wait_until(flood_done, 120, interval=0.2, what="the flood's jobs")
            (completed,) = db.execute(
                "SELECT count(*) FROM steps WHERE tenant_id = %s AND status = 'completed'",
                (tenant,)).fetchone() or (0,)
            assert completed == JOBS * PROMPTS
            # Completions of one tenant may overshoot by the transactions running at once.
            assert peak[0] <= CAP + CONCURRENCY, peak[0]


def test_a_held_step_of_a_started_job_is_released_at_a_running_jobs_priority(
        client: TestClient, tenant_key: str, standin: Any, quiet_workers: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step the kind's first steps wait for (the `echo` kind: `echo` after `shout`) becomes
    runnable when its job is running, and is held past the tenant's cap: released, it goes
    before new jobs' first steps, as the job's other next steps do. (A flex job's: the
    worker that completed `shout` does not run it straight on.)"""
    import importlib

    from sqlalchemy import select

    from agents import registry
    from core.db import transaction
    from core.models import OutboxMessage, Step
    from core.queue import step_priority
    from core.settings import get_settings
    from inference.pool import Completion, CompletionRequest, Pool
    from orchestrator import runner

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins" / "agentq-kind-echo"))
    echo = importlib.import_module("agentq_kind_echo").Echo()
    monkeypatch.setattr(registry, "_kinds", {**registry._load(), "echo": echo})
    monkeypatch.setattr(get_settings(), "tenant_queued_steps_max", 1)
    # The session's worker (if an earlier test started one) is paused: its sweeper, under the
    # default cap, would release the held step itself, and it would run the crowding job's step
    # and leave room under the cap. Messages go to a broker no worker consumes, so that it
    # finds none of this test's when it resumes.
    from core import queue

    idle = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/11")
    idle.flushdb()
    monkeypatch.setattr(get_settings(), "broker_url", REDIS_URL.rsplit("/", 1)[0] + "/11")
    monkeypatch.setattr(queue, "_app", None)
    standin.state.replies = {"Shout this:": "hello there"}
    r = client.post("/v1/jobs", json={"kind": "echo", "input": {"text": "hello"},
                                      "service_tier": "flex"},
                    headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def step(key: str) -> tuple[str, str]:
        with transaction() as s:
            found = s.scalars(select(Step).where(Step.job_id == job_id, Step.key == key)).one()
            return found.id, found.status

    others: list[str] = []

    class Crowding(Pool):
        """The real pool; while `shout` runs, another job of the tenant fills its cap."""

        def complete(self, req: CompletionRequest) -> Completion:
            if not others:
                r = client.post("/v1/jobs", json=_completion("standard"),
                                headers=auth(tenant_key))
                others.append(r.json()["id"])
            return super().complete(req)

    pool = Crowding()
    try:
        runner.run_step(step("shout")[0], pool=pool)
    finally:
        pool.close()
    echo_id, status = step("echo")
    assert status == "held"
    # The other job's step leaves the broker: the held one is released into its room.
    client.post(f"/v1/jobs/{others[0]}/cancel", headers=auth(tenant_key))
    wait_until(lambda: step("echo")[1] == "queued", 30, what="the echo step's release")
    with transaction() as s:
        sent = [p for p, payload in s.execute(
            select(OutboxMessage.priority, OutboxMessage.payload)
            .where(OutboxMessage.task == "steps.run")) if payload.get("step_id") == echo_id]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
    idle.flushdb()
    assert sent == [step_priority("flex", True)], sent
