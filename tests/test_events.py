"""A job's event log: paging, and Server-Sent Events with resume (real worker, real uvicorn)."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx_sse import connect_sse

from tests.helpers import auth, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")

TERMINAL = {"job.completed", "job.failed", "job.cancelled", "job.budget_exhausted"}


def submit(http: Any, key: str) -> str:
    resp = http.post("/v1/jobs", headers=auth(key), json={
        "kind": "research", "input": {"query": "How do tides work?", "max_subquestions": 3}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def all_events(client: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 4},
                          headers=auth(key)).json()
        out += page["data"]
        after = page["next_cursor"]
        if not page["has_more"]:
            return out


def test_event_log_pages_in_order(client: TestClient, tenant_key: str, standin: Any) -> None:
    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id)
    assert job["status"] == "completed"
    events = all_events(client, tenant_key, job_id)
    assert [e["cursor"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types[:2] == ["job.created", "job.started"]
    assert types[-1] == "job.completed"
    assert "plan.ready" in types
    assert types.count("step.started") == types.count("step.completed") == 5
    usage = [e for e in events if e["type"] == "job.usage"]
    assert len(usage) == 5
    assert usage[-1]["data"]["total_tokens"] == job["usage"]["total_tokens"]
    completed = [e for e in events if e["type"] == "step.completed"]
    assert all("usage" in e["data"] for e in completed)
    plan = next(e for e in events if e["type"] == "plan.ready")
    assert [s["role"] for s in plan["data"]["steps"]].count("investigator") == 3
    assert client.get(f"/v1/jobs/{job_id}/events", params={"after": len(events)},
                      headers=auth(tenant_key)).json() == {
        "data": [], "next_cursor": len(events), "has_more": False}


def read_stream(http: httpx.Client, key: str, job_id: str, last_id: str | None = None,
                stop_after: int | None = None) -> tuple[list[tuple[int, str]], bool]:
    """Read events; returns (cursor, type) pairs and whether the server ended the stream."""
    headers = auth(key)
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    got: list[tuple[int, str]] = []
    with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events/stream", headers=headers) as src:
        assert src.response.status_code == 200
        for sse in src.iter_sse():
            if not sse.data:  # a heartbeat (httpx-sse reports comments as empty events)
                continue
            got.append((int(sse.id), sse.event))
            if stop_after is not None and len(got) >= stop_after:
                return got, False
    return got, True


def test_stream_resumes_after_a_dropped_connection(
        api_server: str, client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.delay_s = 0.3
    rng = random.Random()
    with httpx.Client(base_url=api_server, timeout=60) as http:
        job_id = submit(http, tenant_key)
        drop_at = rng.randint(1, 12)
        first, ended = read_stream(http, tenant_key, job_id, stop_after=drop_at)
        assert not ended
        rest, ended = read_stream(http, tenant_key, job_id, last_id=str(first[-1][0]))
        assert ended
    seen = first + rest
    cursors = [c for c, _ in seen]
    assert cursors == list(range(1, len(cursors) + 1)), f"dropped at {drop_at}: {cursors}"
    assert seen[-1][1] in TERMINAL
    logged = [(e["cursor"], e["type"]) for e in all_events(client, tenant_key, job_id)]
    assert seen == logged


def test_stream_sends_heartbeats_and_ends_after_the_terminal_event(
        api_server: str, tenant_key: str, standin: Any) -> None:
    standin.state.delay_s = 2.5
    with httpx.Client(base_url=api_server, timeout=60) as http:
        job_id = submit(http, tenant_key)
        heartbeats = 0
        events: list[str] = []
        start = time.monotonic()
        with http.stream("GET", f"/v1/jobs/{job_id}/events/stream",
                         headers=auth(tenant_key)) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith(":"):
                    heartbeats += 1
                elif line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
        assert time.monotonic() - start < 60
    assert heartbeats >= 1  # the plan call alone takes 2.5 s; heartbeats come every second
    assert events[-1] == "job.completed"


def test_stream_of_another_tenants_job_is_404(api_server: str, tenant_key: str) -> None:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        other, _ = create_key(s, "events-other")
    with httpx.Client(base_url=api_server, timeout=30) as http:
        job_id = submit(http, tenant_key)
        assert http.get(f"/v1/jobs/{job_id}/events/stream",
                        headers=auth(other)).status_code == 404
        assert http.get(f"/v1/jobs/{job_id}/events", headers=auth(other)).status_code == 404
        bad = http.get(f"/v1/jobs/{job_id}/events/stream",
                       headers={**auth(tenant_key), "Last-Event-ID": "abc"})
        assert bad.status_code == 422


def test_idle_streams_do_not_poll_the_database(api_server: str, tenant_key: str,
                                               standin: Any) -> None:
    """Streams read the log only when notified: ten open streams on a job whose model call is
    in progress make no event query while nothing happens."""
    import threading

    from sqlalchemy import event

    from core.db import get_engine

    standin.state.delay_s = 6
    queries: list[float] = []

    def count(_conn: Any, _cur: Any, statement: str, *_: Any) -> None:
        if "FROM job_events" in statement:
            queries.append(time.monotonic())

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", count)
    stop = threading.Event()
    try:
        with httpx.Client(base_url=api_server, timeout=60) as http:
            job_id = submit(http, tenant_key)

            def watch() -> None:
                with httpx.Client(base_url=api_server, timeout=60) as h, \
                        h.stream("GET", f"/v1/jobs/{job_id}/events/stream",
                                 headers=auth(tenant_key)) as resp:
                    for _ in resp.iter_lines():
                        if stop.is_set():
                            return

            threads = [threading.Thread(target=watch, daemon=True) for _ in range(10)]
            for t in threads:
                t.start()
            time.sleep(2.0)  # streams connect, read the backlog, then wait
            idle_from = time.monotonic()
            time.sleep(3.0)  # the plan's model call is still running: no new events
            idle_queries = [q for q in queries if q >= idle_from]
            stop.set()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert idle_queries == []
    assert len(queries) >= 10  # each stream did read its backlog
