"""What a cancelled call is billed: a call the server took but had not answered yet (queued or
prefilling: no token, no usage) is aborted at once and billed its prompt, counted by the
server's tokenizer; a call cancelled while it waited for an admission slot never reached the
server and is billed nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from bench.standin import count_tokens
from core.db import transaction
from core.models import Job, ModelCall, Step
from core.queue import is_amqp
from inference.admission import Admission
from tests.broker import own_broker
from tests.conftest import REDIS_URL
from tests.helpers import auth, start_worker, wait_for_job, wait_until


def _rows(job_id: str) -> list[ModelCall]:
    with transaction() as s:
        return list(s.scalars(select(ModelCall).where(ModelCall.job_id == job_id)))


def _job(job_id: str) -> Job:
    with transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def test_a_call_cancelled_before_its_first_token_is_billed_its_prompt(
        client: TestClient, tenant_key: str, standin: Any, worker: Any) -> None:
    standin.state.delay_s = 120.0  # the server holds the first token back
    budget = 500
    prompt = "Tell me everything about the tides of the northern seas"
    before = standin.state.prompt_tokens_total
    aborted = standin.state.aborted_total
    job_id = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": prompt, "max_tokens": 40},
        "budget": {"max_total_tokens": budget}}).json()["id"]
    wait_until(lambda: standin.state.running >= 1, 30, what="the call to reach the server")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key)).status_code == 202
    # Aborted while it waited: long before the first token would have come.
    wait_until(lambda: standin.state.aborted_total > aborted, 15,
               what="the server to see the call aborted")
    job = wait_for_job(client, tenant_key, job_id, timeout=15)
    assert job["status"] == "cancelled"
    wait_until(lambda: _rows(job_id), 10, what="the cancelled call's ledger row")
    [row] = _rows(job_id)
    with standin.state.lock:
        [sent] = [b for b in standin.state.bodies if b["_request_id"] == row.request_id]
        server_prompt = standin.state.prompt_tokens_total - before
    assert row.finish_reason == "cancelled"
    assert row.completion_tokens == 0
    assert row.prompt_tokens == count_tokens(sent["prompt"]) == server_prompt
    assert row.cost_usd is not None
    assert row.cost_usd >= 0
    wait_until(lambda: _job(job_id).reserved_tokens == 0, 10, what="the hold to be released")
    charged = _job(job_id)
    assert charged.prompt_tokens == row.prompt_tokens
    assert charged.completion_tokens == 0
    assert charged.prompt_tokens + charged.completion_tokens <= budget
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()
    assert job["usage"]["prompt_tokens"] == row.prompt_tokens
    assert job["usage"]["total_tokens"] == row.prompt_tokens


@pytest.fixture
def one_slot(agentq_env: dict[str, str], tmp_path: Path, quiet_workers: None,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A worker whose pool admits one call at a time at an endpoint of its own (a stand-in
    server no other process calls: the session's worker, paused, may hold admission slots at
    the session's stand-in), on a broker of its own (this process publishes there too: the
    paused worker may be blocked on the session's broker in a pop that would still take this
    test's first message). Yields that stand-in."""
    from bench.standin import StandinServer
    from core import queue
    from core.settings import get_settings

    broker = own_broker("one-slot").get("AGENTQ_BROKER_URL") \
        or REDIS_URL.rsplit("/", 1)[0] + "/11"
    if not is_amqp(broker):
        redis.Redis.from_url(broker).flushdb()
    monkeypatch.setattr(get_settings(), "broker_url", broker)
    monkeypatch.setattr(queue, "_app", None)
    server = StandinServer().start()
    proc = start_worker({**agentq_env, "AGENTQ_ENDPOINT_MAX_IN_FLIGHT": "1",
                         "AGENTQ_BROKER_URL": broker, "AGENTQ_POOL_ENDPOINTS": server.url},
                        tmp_path / "one-slot.log")
    try:
        yield server
    finally:
        proc.stop()
        server.stop()


def test_a_call_cancelled_waiting_for_a_slot_is_billed_nothing(
        client: TestClient, tenant_key: str, one_slot: Any) -> None:
    standin = one_slot
    standin.state.token_delay_by_marker = {"Hold the slot": 0.5}
    admission = Admission(redis.Redis.from_url(REDIS_URL), lease_s=60)
    holder = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Hold the slot for a while",
                                        "max_tokens": 100}}).json()["id"]
    # Other tests' steps left in the shared database may run here too (the worker's sweeper
    # queues them): the holder's own call must be the one at the server, holding the slot.
    wait_until(lambda: _reached(standin, holder), 30, what="the first call to hold the slot")
    waiter = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Wait for the slot", "max_tokens": 20}}
                         ).json()["id"]
    wait_until(lambda: admission.loads([standin.url])[standin.url][1] >= 1, 30,
               what="the second call to wait for a slot")
    assert client.post(f"/v1/jobs/{waiter}/cancel", headers=auth(tenant_key)).status_code == 202
    assert wait_for_job(client, tenant_key, waiter, timeout=15)["status"] == "cancelled"
    wait_until(lambda: _job(waiter).reserved_tokens == 0, 10, what="the hold to be released")
    assert not _reached(standin, waiter)
    assert _rows(waiter) == []
    charged = _job(waiter)
    assert charged.prompt_tokens == charged.completion_tokens == charged.model_calls == 0
    # The call that held the slot, cancelled while streaming, is billed what it streamed.
    assert client.post(f"/v1/jobs/{holder}/cancel", headers=auth(tenant_key)).status_code == 202
    assert wait_for_job(client, tenant_key, holder, timeout=15)["status"] == "cancelled"
    wait_until(lambda: _rows(holder), 10, what="the holder's ledger row")
    [row] = _rows(holder)
    assert row.finish_reason == "cancelled"
    assert 0 < row.completion_tokens < 100


def _reached(standin: Any, job_id: str) -> bool:
    """Whether a call of the job reached the stand-in."""
    with transaction() as s:
        steps = {str(i) for i in s.scalars(select(Step.id).where(Step.job_id == job_id))}
    with standin.state.lock:
        return any(r.split(":")[0] in steps for r in standin.state.request_ids)
