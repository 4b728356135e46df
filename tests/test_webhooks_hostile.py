"""Receivers that misbehave on purpose cannot hold anything for long: a receiver that drips its
answer a byte every half second, and one whose answer is 300 MB. An attempt ends by its
deadline, reads a few KiB at most, is made once at a time, runs on the worker's webhook threads
(never in a step's slot), and another tenant's job and webhook go through on time meanwhile."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, get_args

import httpx
import pytest
from fastapi.testclient import TestClient

from api.jobs.schemas import EventType
from core.db import transaction
from core.models import DeliveryStatus, Job, WebhookDelivery, utcnow
from core.settings import get_settings
from core.webhook_http import DeadlineExceeded, send
from tests.helpers import auth, wait_for_job, wait_until
from tests.receivers import HUGE_BYTES, serve
from tests.stack import isolated_stack

T = TypeVar("T")
JOB = {"kind": "completion", "input": {"prompt": "Say hello", "max_tokens": 4}}
ALL_EVENTS = list(get_args(EventType))
MIB = 1024 * 1024


def within(fn: Callable[[], T], limit_s: float) -> T:
    """`fn()` on a thread of its own; fails the test if it has not returned in `limit_s`."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            box.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert box, f"still running after {limit_s} s"
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def test_an_attempt_ends_by_its_deadline_while_the_body_drips() -> None:
    with serve("drip") as drip:
        started = time.monotonic()
        result = within(lambda: send(drip.url, "{}", {}, allow_private=True, timeout_s=2), 20)
        took = time.monotonic() - started
        wait_until(lambda: drip.open_now() == 0, 10, what="the receiver to see the hang-up")
    assert result.status_code == 200
    assert result.timed_out
    assert took < 3.5, took  # the 2 s deadline, and time for the thread to be scheduled
    assert drip.connections[0].sent <= 10  # about one byte per half second, then cut off


def test_an_attempt_ends_by_its_deadline_while_the_headers_drip() -> None:
    with serve("drip-headers") as drip:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            within(lambda: send(drip.url, "{}", {}, allow_private=True, timeout_s=2), 20)
        took = time.monotonic() - started
    assert took < 3.5, took


def test_a_huge_answer_is_not_read() -> None:
    with serve("huge") as huge:
        tracemalloc.start()
        try:
            result = within(lambda: send(huge.url, "{}", {}, allow_private=True, timeout_s=10,
                                         max_response_bytes=4096), 60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        wait_until(lambda: huge.open_now() == 0, 30, what="the receiver to see the hang-up")
    assert result.status_code == 500
    assert not result.timed_out
    assert result.excerpt == "A" * 500
    assert peak < 2 * MIB, peak
    # what the receiver got rid of is what fits in the sockets' buffers, not 300 MB
    assert huge.connections[0].sent < 64 * MIB < HUGE_BYTES


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _deliveries(http: httpx.Client, key: str, job_ids: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for job_id in job_ids:
        out += http.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth(key)).json()["data"]
    return out


def test_hostile_receivers_do_not_starve_another_tenant(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    deadline_s = 2.0
    with serve("drip") as drip, serve("huge") as huge, serve("ok") as good_rx, \
            isolated_stack(database_url, agentq_env, tmp_path, "_hostile") as stack:
        # Two step slots, four webhook threads (two per tenant): were deliveries run in the
        # steps' slots, the hostile ones would hold both for as long as they are dripped to.
        worker = stack.worker("worker", concurrency=2,
                              AGENTQ_WEBHOOK_TIMEOUT_S=str(deadline_s),
                              AGENTQ_WEBHOOK_CONCURRENCY="4",
                              AGENTQ_WEBHOOK_TENANT_CONCURRENCY="2")
        rss_at_start = _memory_kib(worker.popen.pid, "VmRSS")
        # started as an operator starts one, the worker consumes both queues
        assert ".> agentq.webhooks" in worker.output()
        hostile, good = stack.key("hostile"), stack.key("good")
        with httpx.Client(base_url=stack.api, timeout=30) as http:
            limit = get_settings().webhook_max_endpoints_per_tenant
            for i in range(limit):
                r = http.post("/v1/webhook-endpoints", headers=auth(hostile), json={
                    "url": (drip if i % 2 else huge).url, "events": ALL_EVENTS})
                assert r.status_code == 201, r.text
            r = http.post("/v1/webhook-endpoints", headers=auth(hostile),
                          json={"url": drip.url, "events": ALL_EVENTS})
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "too_many_webhook_endpoints"
            assert f"the limit is {limit}" in r.json()["error"]["message"]
            hostile_jobs = [http.post("/v1/jobs", headers=auth(hostile), json={
                **JOB, "webhook": {"url": drip.url, "events": ALL_EVENTS}}).json()["id"]
                for _ in range(3)]
            wait_until(lambda: drip.open_now() >= 2 and huge.connections, 60,
                       what="the hostile receivers to hold attempts")

            started = time.monotonic()
            resp = http.post("/v1/jobs", headers=auth(good), json={
                **JOB, "webhook": {"url": good_rx.url, "events": ["job.completed"]}})
            assert resp.status_code == 202, resp.text
            done = wait_for_job(http, good, resp.json()["id"], timeout=120)
            job_took = time.monotonic() - started
            wait_until(lambda: good_rx.received, 120, what="the good tenant's webhook")
            hook_took = time.monotonic() - started
            busy_meanwhile = drip.open_now()

            def recorded() -> list[dict[str, Any]] | None:
                ds = _deliveries(http, hostile, hostile_jobs)
                tried = {d["url"] for d in ds if d["attempts"]}
                return ds if {drip.url, huge.url} <= tried else None

            deliveries = wait_until(recorded, 120, interval=0.5,
                                    what="attempts at both hostile receivers to be recorded")
        rss_peak = _memory_kib(worker.popen.pid, "VmHWM")

    assert done["status"] == "completed"
    # On time: the hostile tenant has hundreds of deliveries that each hold a connection
    # for the whole deadline, yet the other tenant's job and webhook take seconds.
    assert job_took < 20, job_took
    assert hook_took < 20, hook_took
    assert busy_meanwhile >= 1
    assert len(deliveries) > 100
    for d in deliveries:
        assert d["status"] != "succeeded", d
        for a in d["attempts"]:
            assert a["duration_ms"] < (deadline_s + 1.5) * 1000, a
            if d["url"] == drip.url:
                assert a["status_code"] == 200
                assert "did not end within the attempt's 2 s" in a["error"], a
            else:
                assert a["status_code"] == 500
                assert a["response_excerpt"] == "A" * 500
    # one attempt at a time per delivery, however many sweeps passed meanwhile
    assert set(drip.most_at_once.values()) == {1}
    assert set(huge.most_at_once.values()) == {1}
    assert max(c.sent for c in huge.connections) < 64 * MIB
    # each huge answer offered 300 MB; the worker's peak memory hardly moved
    assert rss_peak - rss_at_start < 150 * 1024, (rss_at_start, rss_peak)


def test_deliveries_have_a_queue_of_their_own(agentq_env: dict[str, str]) -> None:
    from core.queue import QUEUE, WEBHOOK_QUEUE, get_celery

    router = get_celery().amqp.router
    assert router.route({}, "webhooks.deliver")["queue"].name == WEBHOOK_QUEUE
    assert router.route({}, "steps.run")["queue"].name == QUEUE


def _delivery_row(job_id: str, status: str, changed_ago_s: float) -> str:
    with transaction() as s:
        job = s.get(Job, job_id)
        assert job is not None
        now = utcnow()
        d = WebhookDelivery(id=f"whd_test{time.monotonic_ns()}", message_id="msg_test",
                            tenant_id=job.tenant_id, job_id=job_id, endpoint_id=None,
                            url="http://127.0.0.1:9/hook", event_type="job.completed",
                            event_seq=1, payload={}, status=status, attempts=1,
                            next_attempt_at=now,
                            status_changed_at=now - timedelta(seconds=changed_ago_s))
        s.add(d)
        return d.id


def _status(delivery_id: str) -> tuple[str, int]:
    with transaction() as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None
        return d.status, d.attempts


def test_an_attempt_under_way_is_never_doubled(client: TestClient, tenant_key: str) -> None:
    from orchestrator import webhooks

    h = auth(tenant_key)
    job_id = client.post("/v1/jobs", headers=h, json=JOB).json()["id"]
    path = f"/v1/jobs/{job_id}/webhook-deliveries/{{}}/redeliver"
    # An attempt holds its claim: redelivery is refused and the sweeper leaves it alone.
    under_way = _delivery_row(job_id, DeliveryStatus.DELIVERING, 1.0)
    r = client.post(path.format(under_way), headers=h)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "delivery_attempt_in_progress"
    webhooks.sweep_due()
    assert _status(under_way) == (DeliveryStatus.DELIVERING, 1)
    # A claim whose lease ran out (its worker died) may be taken again.
    lost = _delivery_row(job_id, DeliveryStatus.DELIVERING, webhooks.lease_s() + 1)
    r = client.post(path.format(lost), headers=h)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == DeliveryStatus.QUEUED
    # An attempt whose claim was lost (a later attempt claimed the delivery) records what it
    # saw, but cannot decide the delivery's fate.
    stale = _delivery_row(job_id, DeliveryStatus.QUEUED, 0.0)
    with transaction() as s:
        claimed = webhooks.repo.claim_delivery(s, stale, utcnow())
    assert claimed is not None
    assert claimed.attempt == 2
    ok = webhooks.Outcome(200, None, "ok", None, False)
    webhooks._record(stale, 1, utcnow(), 5.0, ok)
    assert _status(stale) == (DeliveryStatus.DELIVERING, 2)
    webhooks._record(stale, 2, utcnow(), 5.0, ok)
    assert _status(stale) == (DeliveryStatus.SUCCEEDED, 2)


def test_the_endpoint_limit_holds_under_concurrent_registrations(
        api_server: str, tenant_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "webhook_max_endpoints_per_tenant", 3)
    with serve("ok") as rx, httpx.Client(base_url=api_server, headers=auth(tenant_key),
                                         timeout=30) as http:
        def register(_: int) -> httpx.Response:
            return http.post("/v1/webhook-endpoints", json={"url": rx.url})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(register, range(12)))
        codes = sorted(r.status_code for r in answers)
        listed = http.get("/v1/webhook-endpoints").json()["data"]
        for ep in listed:
            http.delete(f"/v1/webhook-endpoints/{ep['id']}")
    assert codes == [201] * 3 + [409] * 9
    assert len(listed) == 3
    refused = next(r for r in answers if r.status_code == 409)
    assert "delete one before registering another" in refused.json()["error"]["message"]
