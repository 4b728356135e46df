"""Budgets under parallel load on real tokens: one job keeps more than fifty calls in flight at
real vLLM servers, its token budget binds halfway through, and it never spends past it; what the
servers generated is exactly what the ledger billed. (Runs first of the e2e modules, with both
servers up.)"""

from __future__ import annotations

import threading

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from inference.admission import Admission
from tests.e2e.conftest import E2E_REDIS_URL, Platform, VllmServer, wait_for_job
from tests.helpers import auth, metric

pytestmark = pytest.mark.e2e

PROMPTS = 120
MAX_TOKENS = 64
# Room for about 65 reservations at once (a reservation holds the prompt's bytes plus
# `max_tokens`), so the worker's 64 slots can all be calling; about 90 calls' real tokens.
BUDGET = 7000


def _in_flight(admission: Admission, servers: list[VllmServer]) -> int:
    """Calls the platform has in flight at the servers: the admission slots its workers hold
    (kept in Redis across processes; the servers' own gauges are sampled too coarsely)."""
    return sum(running for running, _ in admission.loads([s.url for s in servers]).values())


def _counted(servers: list[VllmServer], name: str) -> float:
    return sum(metric(s.url, name) for s in servers)


def test_a_budget_binding_under_fifty_parallel_calls_is_never_exceeded(
        vllm_servers: list[VllmServer], platform: Platform) -> None:
    before = {name: _counted(vllm_servers, name) for name in (
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total")}
    admission = Admission(redis.Redis.from_url(E2E_REDIS_URL), lease_s=60)
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _in_flight(admission, vllm_servers))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    prompts = [f"Fact number {i} about the sea: the" for i in range(PROMPTS)]
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        job_id = http.post("/v1/jobs", json={
            "kind": "batch", "input": {"prompts": prompts, "max_tokens": MAX_TOKENS},
            "budget": {"max_total_tokens": BUDGET}}).json()["id"]
        job = wait_for_job(http, job_id, 600)
    stop.set()
    watcher.join(timeout=5)

    assert job["status"] == "budget_exhausted", job
    assert peak[0] >= 50, f"at most {peak[0]} calls were in flight at once"
    engine = create_engine(platform.db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT prompt_tokens, completion_tokens, finish_reason "
                                 "FROM model_calls WHERE job_id = :j"), {"j": job_id}).all()
    engine.dispose()
    prompt = sum(r[0] for r in rows)
    completion = sum(r[1] for r in rows)
    # The budget bound: more than half the calls ran, not all of them, and never past it.
    assert PROMPTS // 2 < len(rows) < PROMPTS
    assert prompt + completion <= BUDGET
    assert job["usage"]["prompt_tokens"] + job["usage"]["completion_tokens"] == prompt + completion
    assert job["usage"]["model_calls"] == len(rows)
    # Every call the servers finished is on the ledger once, with the tokens they counted. Calls
    # still streaming when the budget bound are aborted (`cancelled`): billed for what they
    # streamed, while a server may have generated a few tokens more before the abort reached
    # it. A call aborted after a server took it but before any usage came is billed its prompt
    # as that server's tokenizer counts it, with no completion tokens; a server counts a prompt
    # once it has prefilled it, which such a call (queued there, or prefilling) may never have
    # been, so the ledger may bill a prompt the servers did not count, never the other way.
    # A call with no ledger row never reached a server (it waited for an admission slot, or
    # found the budget spent).
    finished = [r for r in rows if r[2] != "cancelled"]
    after = {name: _counted(vllm_servers, name) for name in before}
    served = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    assert len(finished) <= served <= len(rows)
    prompted = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    # Surely prefilled: the prompts of calls that finished or streamed a token.
    read = sum(r[0] for r in rows if r[2] != "cancelled" or r[1] > 0)
    assert read <= prompted <= prompt
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert sum(r[1] for r in finished) <= generated \
        <= completion + (len(rows) - len(finished)) * MAX_TOKENS
