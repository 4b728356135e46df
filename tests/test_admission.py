"""Admission control in Redis: a cap per endpoint shared by every process, waiting calls served
fairly across tenants and jobs, and slots that survive no crash; then the same through real
worker processes, and aborts of a cancelled job's calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import transaction
from core.models import Job, ModelCall, Step
from inference.admission import Admission, AdmissionTimeout
from tests.conftest import REDIS_URL
from tests.helpers import auth, start_worker, wait_for_job, wait_until


@pytest.fixture
def admission() -> Iterator[Admission]:
    client = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/12")
    client.flushdb()
    yield Admission(client, lease_s=30, waiter_ttl_s=2, poll_s=0.1)
    client.flushdb()


def test_a_cap_is_never_exceeded_by_many_threads(admission: Admission) -> None:
    running, peak, lock = 0, 0, threading.Lock()

    def call(i: int) -> None:
        nonlocal running, peak
        with admission.slot("http://e1", 3, f"t{i % 2}", f"j{i % 4}", timeout_s=30):
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.05)
            with lock:
                running -= 1

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 3
    assert admission.loads(["http://e1"]) == {"http://e1": (0, 0)}


def _waiting_at_least(admission: Admission, n: int) -> Callable[[], bool]:
    return lambda: admission.loads(["http://e2"])["http://e2"][1] >= n


def _grant_order(admission: Admission, waiters: list[tuple[str, str]]) -> list[int]:
    """Hold the only slot, queue `waiters` (tenant, job) in order, then let go: the order in
    which they get the slot."""
    order: list[int] = []
    lock = threading.Lock()
    release = threading.Event()

    def holder() -> None:
        with admission.slot("http://e2", 1, "first", "first", timeout_s=30):
            release.wait()

    def waiter(i: int, tenant: str, job: str) -> None:
        with admission.slot("http://e2", 1, tenant, job, timeout_s=30):
            with lock:
                order.append(i)
            time.sleep(0.01)

    h = threading.Thread(target=holder)
    h.start()
    wait_until(lambda: admission.loads(["http://e2"])["http://e2"][0] == 1, 5)
    threads = []
    for i, (tenant, job) in enumerate(waiters):
        t = threading.Thread(target=waiter, args=(i, tenant, job))
        t.start()
        threads.append(t)
        wait_until(_waiting_at_least(admission, i + 1), 5)
    release.set()
    for t in [h, *threads]:
        t.join()
    return order


def test_a_small_job_is_not_starved_by_a_wide_one(admission: Admission) -> None:
    # Twelve calls of one wide job queue first; then one call of another tenant.
    waiters = [("wide", "job-wide")] * 12 + [("small", "job-small")]
    order = _grant_order(admission, waiters)
    assert order.index(12) <= 1, order  # served first or second, not thirteenth
    assert [i for i in order if i != 12] == list(range(12))  # FIFO within a job


def test_jobs_of_one_tenant_take_turns(admission: Admission) -> None:
    waiters = [("t", "a")] * 4 + [("t", "b")] * 4
    order = _grant_order(admission, waiters)
    jobs = ["a" if i < 4 else "b" for i in order]
    assert jobs[:4].count("a") == 2, jobs  # alternating, not a-a-a-a-b-b-b-b


def test_a_waiter_gives_up_after_its_timeout(admission: Admission) -> None:
    release = threading.Event()

    def holder() -> None:
        with admission.slot("http://e3", 1, "t", "j", timeout_s=5):
            release.wait()

    h = threading.Thread(target=holder)
    h.start()
    wait_until(lambda: admission.loads(["http://e3"])["http://e3"][0] == 1, 5)
    with pytest.raises(AdmissionTimeout), admission.slot("http://e3", 1, "t", "k",
                                                         timeout_s=0.5):
        pass
    release.set()
    h.join()
    assert admission.loads(["http://e3"]) == {"http://e3": (0, 0)}


def test_energy_shares_an_endpoints_busy_time_over_every_process(
        admission: Admission) -> None:
    """Two pools (two worker processes, as far as the endpoint can tell) send two calls each to
    one endpoint at once. Admission shares each busy second out among the slots held over both,
    so the four calls' energy adds up to the endpoint's busy time at its power; each process
    counting only its own calls would bill every second twice."""
    from bench.standin import StandinServer
    from core.settings import Settings
    from inference.calls import CallSpec
    from inference.pool import CompletionRequest, Pool

    server = StandinServer().start()
    try:
        server.state.delay_s = 1.0
        cfg = Settings(pool_admission=False, endpoint_watts={"*": 3600.0},
                       retry_max_attempts=1, request_timeout_s=30)
        pools = [Pool([server.url], cfg, admission=admission) for _ in range(2)]
        results: list[Any] = []
        gate = threading.Barrier(4)

        def call(i: int) -> None:
            gate.wait()
            results.append(pools[i % 2].complete(CompletionRequest(
                call=CallSpec(prompt="one two three", max_tokens=4), request_id=f"en-{i}",
                tenant_id="t", job_id=f"j{i % 2}")))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.monotonic() - started
    finally:
        server.stop()
    assert len(results) == 4
    # At 3600 W a busy second is 1 Wh. The endpoint was busy at least the server's 1 s and at
    # most the wall time seen here, however the calls overlapped.
    total = sum(r.energy_wh for r in results)
    assert 0.95 <= total <= wall_s * 1.05, (total, wall_s)
    assert all(r.energy_method == "declared_watts" for r in results)


def test_a_dead_holders_slot_comes_back(admission: Admission) -> None:
    """A process that dies holding a slot never gives it back; its lease runs out."""
    short = Admission(redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/12"), lease_s=1,
                      waiter_ttl_s=2, poll_s=0.1)
    ctx = short.slot("http://e4", 1, "t", "j", timeout_s=5)
    ctx.__enter__()  # and never __exit__: the holder "died"
    started = time.monotonic()
    with short.slot("http://e4", 1, "t2", "j2", timeout_s=10):
        waited = time.monotonic() - started
    assert 0.5 < waited < 10


# -- through real worker processes ------------------------------------------------------------


@pytest.fixture
def capped_workers(agentq_env: dict[str, str], tmp_path: Path, quiet_workers: None
                   ) -> Iterator[list[Any]]:
    """Two worker processes whose pool admits 4 calls at a time per endpoint, in all."""
    env = {**agentq_env, "AGENTQ_ENDPOINT_MAX_IN_FLIGHT": "4"}
    procs = [start_worker(env, tmp_path / f"capped{i}.log") for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def test_two_workers_share_one_cap_and_serve_tenants_fairly(
        client: TestClient, tenant_key: str, standin: Any, capped_workers: list[Any],
        agentq_env: dict[str, str]) -> None:
    from core.keys import create_key

    standin.state.delay_s = 1.0
    with standin.state.lock:
        standin.state.max_running = 0
    with transaction() as s:
        other_key, _ = create_key(s, f"small-{time.monotonic_ns()}")
    wide = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": [f"p{i}" for i in range(60)], "max_tokens": 4}})
    assert wide.status_code == 202, wide.text
    wide_id = wide.json()["id"]
    # Let the wide job fill the queue, then a small job of another tenant arrives.
    wait_until(lambda: standin.state.requests_total > 0 and standin.state.running >= 4, 30,
               what="the wide job to fill the cap")
    time.sleep(1.0)
    with standin.state.lock:
        sent_before = len(standin.state.request_ids)
    small = client.post("/v1/jobs", headers=auth(other_key), json={
        "kind": "completion", "input": {"prompt": "Say hi", "max_tokens": 4}}).json()["id"]
    done = wait_for_job(client, other_key, small, timeout=60)
    assert done["status"] == "completed"
    wide_job = client.get(f"/v1/jobs/{wide_id}", headers=auth(tenant_key)).json()
    assert wide_job["status"] == "running", "the wide job finished first: nothing to show"
    with transaction() as s:
        small_steps = {str(sid) for sid in s.scalars(select(Step.id).where(Step.job_id == small))}
    with standin.state.lock:
        sent = list(standin.state.request_ids)
    small_at = next(i for i, rid in enumerate(sent) if rid.split(":")[0] in small_steps)
    # Counted in calls, not seconds, so a slow machine does not matter: in first-come order the
    # small call would wait behind every wide call still queued (about 50); served fairly, it
    # takes the next free slot, so only the wide calls started while the small job was being
    # planned and queued (4 a second) come before it.
    overtaken = small_at - sent_before
    assert wide_job["progress"]["steps_done"] < 60
    assert overtaken < 30, overtaken
    assert wait_for_job(client, tenant_key, wide_id, timeout=90)["status"] == "completed"
    assert standin.state.max_running <= 4
    assert standin.state.max_running == 4  # and the cap was used


def test_cancelling_a_job_aborts_its_calls_at_the_server(
        client: TestClient, tenant_key: str, standin: Any, worker: Any) -> None:
    standin.state.token_delay_s = 0.3  # each call streams for about 4 s
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "batch", "input": {"prompts": [f"slow {i}" for i in range(6)],
                                   "max_tokens": 12}})
    job_id = resp.json()["id"]
    wait_until(lambda: standin.state.running >= 6, 30, what="six calls streaming")
    time.sleep(0.5)
    aborted_before = standin.state.aborted_total
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key)).status_code == 202
    wait_until(lambda: standin.state.running == 0, 5, what="the server to stop generating")
    generated = standin.state.generation_tokens_total
    time.sleep(1.0)
    assert standin.state.generation_tokens_total == generated  # nothing more generated
    assert standin.state.aborted_total - aborted_before == 6
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "cancelled"
    with transaction() as s:
        rows = list(s.scalars(select(ModelCall).where(ModelCall.job_id == job_id)))
        charged = s.scalar(select(Job.completion_tokens).where(Job.id == job_id))
    # What was generated before the abort is on the ledger, and only that.
    assert len(rows) == 6
    assert all(r.finish_reason == "cancelled" for r in rows)
    assert all(0 < r.completion_tokens < 12 for r in rows)
    assert charged == sum(r.completion_tokens for r in rows)


def test_with_no_server_left_jobs_fail_clearly_and_soon(
        client: TestClient, tenant_key: str, agentq_env: dict[str, str], tmp_path: Path,
        quiet_workers: None) -> None:
    from bench.standin import free_port

    env = {**agentq_env, "AGENTQ_POOL_ENDPOINTS": f"http://127.0.0.1:{free_port()}",
           "AGENTQ_RETRY_MAX_SECONDS": "5"}
    proc = start_worker(env, tmp_path / "nowhere.log")
    try:
        started = time.monotonic()
        job_id = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "completion", "input": {"prompt": "Anyone there?"}}).json()["id"]
        job = wait_for_job(client, tenant_key, job_id, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        proc.stop()
    assert job["status"] == "failed"
    assert job["error"]["code"] in {"pool_unavailable", "inference_unavailable"}
    assert "endpoint" in job["error"]["message"]
    assert elapsed < 30
