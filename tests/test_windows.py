"""Flex jobs that wait for a cheap or clean hour: the planned start is the best hour of the
grid's schedule that still meets the deadline, the job starts when that hour comes (an
injected clock), and the ledger records each call's price of power and carbon intensity."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from core.grid import GridHour, best_start
from tests.helpers import TERMINAL, auth, wait_until
from tests.stack import isolated_stack


def _hours(cheap: int, clean: int) -> list[dict[str, float]]:
    return [{"price": 0.05 if h == cheap else 0.30, "carbon": 50.0 if h == clean else 400.0}
            for h in range(24)]


@pytest.fixture
def schedule(agentq_env: dict[str, str]) -> Iterator[datetime]:
    """A schedule whose cheapest hour is 6 hours from now and cleanest 9 hours from now (in
    this process's settings: the API under test); yields now."""
    from core import grid
    from core.settings import get_settings

    now = datetime.now(UTC)
    settings = get_settings()
    old = settings.grid_schedule
    settings.grid_schedule = _hours((now.hour + 6) % 24, (now.hour + 9) % 24)
    grid.schedules.cache_clear()
    yield now
    settings.grid_schedule = old
    grid.schedules.cache_clear()


def test_best_start_keeps_to_the_window() -> None:
    hours = tuple(GridHour(price=p, carbon=0) for p in [0.3] * 5 + [0.1] + [0.2] * 18)
    now = datetime(2026, 12, 1, 1, 30, tzinfo=UTC)
    assert best_start(hours, now, now + timedelta(hours=10), "cost") == now.replace(
        hour=5, minute=0)
    # The cheapest hour lies past the latest start: the best one before it (here, now).
    assert best_start(hours, now, now + timedelta(hours=2), "cost") == now


def test_a_deferred_job_starts_in_its_window(client: TestClient, tenant_key: str,
                                             schedule: datetime, quiet_workers: None) -> None:
    from core.db import transaction
    from core.models import Step
    from orchestrator import scheduling

    now = schedule
    body = {"kind": "completion", "input": {"prompt": "Overnight", "max_tokens": 8},
            "service_tier": "flex", "deadline": (now + timedelta(hours=20)).isoformat()}
    for optimize, hours in (("cost", 6), ("carbon", 9)):
        r = client.post("/v1/jobs", json={**body, "optimize": optimize},
                        headers=auth(tenant_key))
        assert r.status_code == 202, r.text
        job = r.json()
        expected = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)
        assert datetime.fromisoformat(job["planned_start"]) == expected, (optimize, job)
    job_id = job["id"]

    def statuses() -> set[str]:
        with transaction() as s:
            return {st.status for st in s.query(Step).filter(Step.job_id == job_id)}

    assert statuses() == {"deferred"}
    shown = client.get(f"/v1/jobs/{job_id}/steps", headers=auth(tenant_key))
    assert shown.status_code == 200, shown.text
    assert {st["status"] for st in shown.json()["data"]} == {"deferred"}
    events = client.get(f"/v1/jobs/{job_id}/events", headers=auth(tenant_key)).json()["data"]
    assert [e for e in events if e["type"] == "job.deferred"]
    # A second before its hour: still waiting. At its hour: queued.
    start = datetime.fromisoformat(job["planned_start"])
    scheduling.start_deferred(now=start - timedelta(seconds=1))
    assert statuses() == {"deferred"}
    assert scheduling.start_deferred(now=start) >= 1
    assert statuses() == {"queued"}

    # Without a deadline, optimize is refused.
    r = client.post("/v1/jobs", json={**body, "deadline": None, "optimize": "cost"},
                    headers=auth(tenant_key))
    assert r.status_code == 422, r.text
    assert "deadline" in r.json()["error"]["message"]


def test_a_job_stopped_before_its_window_continues_at_once(
        client: TestClient, tenant_key: str, schedule: datetime, quiet_workers: None,
        standin: Any) -> None:
    """Continuing runs a job again at once (see the README): a job cancelled while it waited
    for its planned start is queued now, no longer shows that start, and is started by its
    first step's claim (`started_at`, `job.started`)."""
    from core.db import transaction
    from core.models import Step

    r = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Overnight", "max_tokens": 8},
        "service_tier": "flex", "deadline": (schedule + timedelta(hours=20)).isoformat(),
        "optimize": "cost"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["planned_start"] is not None
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key))
               .json()["status"] == "cancelled", 30, what="the job to be cancelled")
    r = client.post(f"/v1/jobs/{job_id}/continue", headers=auth(tenant_key))
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()
    # It never started: it is queued again, and its first step's claim starts it.
    assert job["status"] == "queued", job
    assert job["planned_start"] is None, job
    assert job["started_at"] is None, job
    with transaction() as s:
        steps = s.query(Step).filter(Step.job_id == job_id).all()
        assert {st.status for st in steps} == {"queued"}
        step_ids = [st.id for st in steps]
    from orchestrator import runner

    for step_id in step_ids:
        runner.run_step(step_id)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()
    assert job["status"] == "completed", job
    assert job["started_at"] is not None, job
    types = [e["type"] for e in client.get(f"/v1/jobs/{job_id}/events",
                                           headers=auth(tenant_key)).json()["data"]]
    assert types.count("job.started") == 1, types
    assert types.index("job.continued") < types.index("job.started"), types


@pytest.mark.usefixtures("standin")
def test_the_ledger_records_the_hours_price_and_carbon(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path) -> None:
    import json

    flat = [{"price": 0.12, "carbon": 230.0}] * 24
    env = {"AGENTQ_GRID_SCHEDULE": json.dumps(flat)}
    with isolated_stack(database_url, {**agentq_env, **env}, tmp_path, "_grid") as stack:
        key = stack.key("grid")
        stack.worker("w1", concurrency=2)
        due = datetime.now(UTC) + timedelta(hours=2)
        r = httpx.post(f"{stack.api}/v1/jobs", headers=auth(key), timeout=30, json={
            "kind": "completion", "input": {"prompt": "Now is as good", "max_tokens": 8},
            "service_tier": "flex", "deadline": due.isoformat(), "optimize": "carbon"})
        assert r.status_code == 202, r.text
        assert r.json()["planned_start"] is None  # every hour alike: no reason to wait
        job_id = r.json()["id"]

        def ended() -> Any:
            b = httpx.get(f"{stack.api}/v1/jobs/{job_id}", headers=auth(key), timeout=30).json()
            return b if b["status"] in TERMINAL else None

        assert wait_until(ended, 60, what="the job")["status"] == "completed"
        url = make_url(stack.env["AGENTQ_DATABASE_URL"]).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False)) as db:
            rows = db.execute("SELECT power_price, carbon_intensity FROM model_calls "
                              "WHERE job_id = %s", (job_id,)).fetchall()
        assert rows
        assert rows == [(0.12, 230.0)] * len(rows)


def test_the_schedule_may_differ_per_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from core import grid
    from core.settings import get_settings

    a = [{"price": 0.05, "carbon": 100.0}] * 24
    b = [{"price": 0.25, "carbon": 500.0}] * 24
    monkeypatch.setattr(get_settings(), "grid_schedule", {"http://a:8000/v1/": a, "*": b})
    grid.schedules.cache_clear()
    try:
        now = datetime.now(UTC)
        assert grid.at(now, "http://a:8000/v1") == GridHour(price=0.05, carbon=100.0)
        assert grid.at(now, "http://other:8000/v1") == GridHour(price=0.25, carbon=500.0)
        assert grid.at(now) == GridHour(price=0.25, carbon=500.0)  # planning: the default
        monkeypatch.setattr(get_settings(), "grid_schedule", {"http://a:8000/v1": a,
                                                              "http://b:8000/v1": b})
        grid.schedules.cache_clear()
        assert grid.at(now, "http://c:8000/v1") is None  # neither named nor defaulted
        assert grid.at(now) == GridHour(price=0.15, carbon=300.0)  # the mean of those named
        monkeypatch.setattr(get_settings(), "grid_schedule", {"*": a[:23]})
        grid.schedules.cache_clear()
        with pytest.raises(ValueError, match="23 hours"):
            grid.schedules()
    finally:
        grid.schedules.cache_clear()


@pytest.mark.usefixtures("standin")
def test_the_ledger_prices_power_at_the_endpoint_that_served_the_call(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path) -> None:
    """Two endpoints on grids of their own: each call is recorded with the figures of the
    endpoint that served it."""
    import json

    from bench.standin import StandinServer

    second = StandinServer().start()
    try:
        first = agentq_env["AGENTQ_POOL_ENDPOINTS"]
        by_url = {first: [{"price": 0.07, "carbon": 90.0}] * 24,
                  "*": [{"price": 0.21, "carbon": 480.0}] * 24}
        env = {"AGENTQ_GRID_SCHEDULE": json.dumps(by_url),
               "AGENTQ_POOL_ENDPOINTS": f"{first},{second.url}",
               "AGENTQ_POOL_ROUTING": "round_robin"}
        with isolated_stack(database_url, {**agentq_env, **env}, tmp_path, "_grid2") as stack:
            key = stack.key("grids")
            stack.worker("w1", concurrency=2)
            ids = []
            for i in range(6):
                r = httpx.post(f"{stack.api}/v1/jobs", headers=auth(key), timeout=30, json={
                    "kind": "completion", "input": {"prompt": f"Where {i}", "max_tokens": 8}})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])

            def ended() -> bool:
                return all(httpx.get(f"{stack.api}/v1/jobs/{i}", headers=auth(key),
                                     timeout=30).json()["status"] in TERMINAL for i in ids)

            wait_until(ended, 60, what="the jobs")
            url = make_url(stack.env["AGENTQ_DATABASE_URL"]).set(drivername="postgresql")
            with psycopg.connect(url.render_as_string(hide_password=False)) as db:
                rows = db.execute("SELECT endpoint, power_price, carbon_intensity FROM "
                                  "model_calls").fetchall()
        served = {e.rstrip("/") for e, _, _ in rows}
        assert served == {first.rstrip("/"), second.url.rstrip("/")}, rows
        for endpoint, price, carbon in rows:
            expected = (0.07, 90.0) if endpoint.rstrip("/") == first.rstrip("/") else (0.21,
                                                                                      480.0)
            assert (price, carbon) == expected, rows
    finally:
        second.stop()


@pytest.mark.usefixtures("standin")
def test_deferral_and_promotion_are_delivered_to_the_jobs_webhook(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path) -> None:
    """A flex job that waits for a cleaner hour: its webhook hears `job.deferred`; promoted
    when its deadline nears (a sweeper pass in a process of its own, on a clock moved to just
    before the deadline), it hears `job.promoted`, then it starts and completes."""
    import json
    import subprocess
    import sys

    from tests.receivers import serve

    now = datetime.now(UTC)
    env = {"AGENTQ_GRID_SCHEDULE": json.dumps(_hours((now.hour + 6) % 24,
                                                     (now.hour + 6) % 24))}
    due = now + timedelta(hours=20)
    with serve("ok") as receiver, isolated_stack(
            database_url, {**agentq_env, **env}, tmp_path, "_hooks") as stack:
        key = stack.key("hooks")
        stack.worker("w1", concurrency=2)
        events = ["job.deferred", "job.promoted", "job.started", "job.completed"]
        r = httpx.post(f"{stack.api}/v1/jobs", headers=auth(key), timeout=30, json={
            "kind": "completion", "input": {"prompt": "Tonight", "max_tokens": 8},
            "service_tier": "flex", "deadline": due.isoformat(), "optimize": "carbon",
            "webhook": {"url": receiver.url, "events": events}})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["planned_start"] is not None

        def delivered(n: int) -> Any:
            with receiver.lock:
                got = [json.loads(body) for _, body in receiver.received]
            return got if len(got) >= n else None

        first = wait_until(lambda: delivered(1), 30, what="the deferral's delivery")
        assert first[0]["type"] == "job.deferred"
        assert job_id in json.dumps(first[0]), first
        promote = ("from datetime import datetime; from orchestrator import scheduling; "
                   f"print(scheduling.promote_due(now=datetime.fromisoformat("
                   f"{(due - timedelta(seconds=30)).isoformat()!r})))")
        out = subprocess.run([sys.executable, "-c", promote], env=stack.env,
                             capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() == "1", out
        got = wait_until(lambda: delivered(4), 60, what="the other deliveries")
        assert [g["type"] for g in got] == events, got
