"""Admission by service tier and by attained service in levels (Redis, the real Lua scripts),
and the same order through the pool against the stand-in."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

from inference.admission import Admission
from tests.conftest import REDIS_URL
from tests.helpers import wait_until

URL = "http://tiers"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    c.flushdb()
    yield c
    c.flushdb()


def _waiting_at_least(admission: Admission, n: int) -> Callable[[], bool]:
    return lambda: admission.loads([URL])[URL][1] >= n


def _grant_order(admission: Admission, waiters: list[tuple[str, str, str]],
                 before_release: Callable[[], None] = lambda: None) -> list[int]:
    """Hold the only slot, queue `waiters` (tier, tenant, job) in order, call `before_release`,
    then let go: the order in which they get the slot."""
    order: list[int] = []
    lock = threading.Lock()
    release = threading.Event()

    def holder() -> None:
        with admission.slot(URL, 1, "holder", "holder", timeout_s=30):
            release.wait()

    def waiter(i: int, tier: str, tenant: str, job: str) -> None:
        with admission.slot(URL, 1, tenant, job, timeout_s=30, tier=tier):
            with lock:
                order.append(i)

    h = threading.Thread(target=holder)
    h.start()
    wait_until(lambda: admission.loads([URL])[URL][0] == 1, 5)
    threads = []
    for i, w in enumerate(waiters):
        t = threading.Thread(target=waiter, args=(i, *w))
        t.start()
        threads.append(t)
        wait_until(_waiting_at_least(admission, i + 1), 5)
    before_release()
    release.set()
    for t in [h, *threads]:
        t.join()
    return order


def _serve(admission: Admission, job: str, tokens: int) -> None:
    """One finished call of `job` that was served `tokens`."""
    with admission.slot(URL, 1, "t", job, timeout_s=5) as slot:
        slot.served_tokens = tokens


def test_tiers_are_served_in_order_whoever_queued_first(client: redis.Redis) -> None:
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05)
    waiters = [("flex", "a", "f1"), ("flex", "b", "f2"), ("standard", "a", "s1"),
               ("interactive", "c", "i1"), ("standard", "b", "s2"), ("interactive", "a", "i2")]
    order = _grant_order(admission, waiters)
    tiers = [waiters[i][0] for i in order]
    assert tiers == ["interactive"] * 2 + ["standard"] * 2 + ["flex"] * 2, tiers


def test_the_job_served_least_goes_first(client: redis.Redis) -> None:
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05,
                          aging_tokens_per_s=0)
    # Levels (a quantum of 500 tokens, bounds growing sixteenfold): the short job (never
    # served) at level 0, the medium one at 1 (below 8000), the long one at 2.
    _serve(admission, "long", 100_000)
    _serve(admission, "medium", 5000)
    # The long job's calls queue first; the short (never served) and medium ones after.
    waiters = [("standard", "t", "long")] * 2 + [("standard", "t", "medium"),
                                                 ("standard", "t", "short")]
    order = _grant_order(admission, waiters)
    jobs = [waiters[i][2] for i in order]
    assert jobs == ["short", "medium", "long", "long"], jobs


@pytest.mark.parametrize(("aging", "long_at"), [(0, 2), (100_000, 0)])
def test_aging_lets_a_long_job_through(client: redis.Redis, aging: float, long_at: int
                                       ) -> None:
    # Without aging the long job (200000 tokens served: level 3) waits behind two jobs served
    # 10000 (level 2). With 100000 tokens of credit per second waited, ten seconds of waiting
    # forgive every waiting job's lead: they tie at level 0, and the job served longest ago
    # (the long one) goes first.
    # The admission clock is the test's, so the waits are exact whatever the machine's load.
    now = [1_000_000.0]
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05,
                          aging_tokens_per_s=aging, clock=lambda: now[0])
    for job, tokens in (("long", 200_000), ("s1", 10_000), ("s2", 10_000)):
        _serve(admission, job, tokens)
    waiters = [("standard", "t", "long"), ("standard", "t", "s1"), ("standard", "t", "s2")]

    def ten_seconds_later() -> None:
        now[0] += 10.0

    order = _grant_order(admission, waiters, before_release=ten_seconds_later)
    jobs = [waiters[i][2] for i in order]
    assert jobs.index("long") == long_at, jobs


@pytest.mark.parametrize(("quantum", "expected"), [
    (0, ["fan", "fan", "fan", "short"]), (500, ["short", "fan", "fan", "fan"])])
def test_a_short_jobs_follow_up_goes_before_a_new_fan_out(client: redis.Redis, quantum: int,
                                                          expected: list[str]) -> None:
    # A short job was served one call (300 tokens); a second later a new job fans out three
    # calls, queued before the short job's follow-up. Without levels (quantum 0) the new job,
    # served nothing, goes first with its whole fan-out; with levels both are at level 0 and
    # the job granted a slot longest ago (the short one, before the new job arrived) goes
    # first.
    now = [1_000_000.0]
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05,
                          aging_tokens_per_s=0, quantum_tokens=quantum, clock=lambda: now[0])
    _serve(admission, "short", 300)
    now[0] += 1.0
    waiters = [("standard", "t", "fan")] * 3 + [("standard", "t", "short")]
    jobs = [waiters[i][2] for i in _grant_order(admission, waiters)]
    assert jobs == expected, jobs


@pytest.mark.parametrize(("big", "first"), [(600, "small"), (450, "big")])
def test_a_job_past_the_quantum_yields_to_one_under_it(client: redis.Redis, big: int,
                                                       first: str) -> None:
    # Two jobs served one call each, the older one `big` tokens, the newer 400. Past the
    # quantum (500) the older job is a level up and yields; under it, both at level 0, they
    # take turns: the one granted longest ago (the older) goes first (levels are coarse:
    # within one, fewer tokens served earn nothing).
    now = [1_000_000.0]
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05,
                          aging_tokens_per_s=0, clock=lambda: now[0])
    _serve(admission, "big", big)
    now[0] += 1.0
    _serve(admission, "small", 400)
    waiters = [("standard", "t", "big"), ("standard", "t", "small")]
    jobs = [waiters[i][2] for i in _grant_order(admission, waiters)]
    assert jobs[0] == first, jobs


def test_the_last_grants_of_long_idle_jobs_are_pruned_once_an_interval(
        client: redis.Redis) -> None:
    # Level 0 orders jobs by their last grant, kept per job at each endpoint: the sweepers'
    # prune drops the fields of jobs granted nothing for a day, and keeps the others'.
    from inference.admission import endpoint_key

    now = [1_000_000.0]
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05,
                          clock=lambda: now[0])
    base = endpoint_key(URL)
    for i in range(1200):  # more than one HSCAN page
        _serve(admission, f"old{i}", 10)
    now[0] += 86_400 - 60
    _serve(admission, "recent", 10)
    now[0] += 120  # the old jobs are a day and a minute idle, `recent` two minutes
    assert client.hlen(base + "jt") == client.hlen(base + "jlast") == 1201
    assert admission.prune([URL], every_s=3600) == 1200
    assert client.hkeys(base + "jt") == client.hkeys(base + "jlast") == [b"recent"]
    # Each endpoint once an interval over every process: a second pass within it does
    # nothing, one asked for now does.
    _serve(admission, "later", 10)
    now[0] += 2 * 86_400
    assert admission.prune([URL], every_s=3600) == 0
    assert client.hlen(base + "jt") == 2
    assert 3500 < cast(int, client.ttl(base + "pruned")) <= 3600
    assert admission.prune([URL]) == 2
    assert client.hlen(base + "jt") == client.hlen(base + "jlast") == 0


def test_tenants_stay_fair_within_a_tier(client: redis.Redis) -> None:
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05)
    # One tenant queues six calls of new jobs, another one call of a well-served job: the
    # other tenant is still served first or second (fairness across tenants comes first).
    _serve(admission, "served", 10_000)
    waiters = [("standard", "flood", f"j{i}") for i in range(6)] + [
        ("standard", "other", "served")]
    order = _grant_order(admission, waiters)
    assert order.index(6) <= 1, order


def test_through_the_pool_tier_and_attained_service_order_calls(
        client: redis.Redis, standin: Any) -> None:
    from core.settings import Settings
    from inference.calls import CallSpec
    from inference.pool import CompletionRequest, Pool

    settings = Settings(pool_endpoints=[standin.url], endpoint_max_in_flight=1,
                        redis_url=REDIS_URL)
    # A quantum of one token: a job served anything is a level above one served nothing.
    admission = Admission(client, lease_s=30, waiter_ttl_s=60, poll_s=0.05,
                          aging_tokens_per_s=0, quantum_tokens=1)
    pool = Pool(settings=settings, admission=admission)
    url = standin.url.rstrip("/")
    order: list[str] = []
    lock = threading.Lock()

    def call(job: str, tier: str = "standard") -> None:
        pool.complete(CompletionRequest(
            call=CallSpec(prompt=f"{job} asks something", max_tokens=8),
            request_id=f"{job}:{len(order)}:{threading.get_ident()}", tenant_id="t",
            job_id=job, service_tier=tier))
        with lock:
            order.append(job)

    try:
        call("long")  # the pool counts what it was served to the job's attained service
        call("long")
        assert int(cast(bytes, client.get("agentq:adm:att:long")) or 0) > 0
        release = threading.Event()

        def holder() -> None:
            with admission.slot(url, 1, "holder", "holder", timeout_s=30):
                release.wait()

        h = threading.Thread(target=holder)
        h.start()
        wait_until(lambda: admission.loads([url])[url][0] == 1, 5)
        order.clear()
        waiters = [("long", "standard"), ("short", "standard"), ("late", "flex"),
                   ("urgent", "interactive")]
        threads = []
        for i, (job, tier) in enumerate(waiters):
            t = threading.Thread(target=call, args=(job, tier))
            t.start()
            threads.append(t)
            wait_until(_waiting_at_least_at(admission, url, i + 1), 5)
        release.set()
        for t in [h, *threads]:
            t.join()
        assert order == ["urgent", "short", "long", "late"], order
    finally:
        pool.close()


def _waiting_at_least_at(admission: Admission, url: str, n: int) -> Callable[[], bool]:
    return lambda: admission.loads([url])[url][1] >= n
