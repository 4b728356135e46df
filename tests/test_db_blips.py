"""A database that drops connections under a running job: no step fails, nothing is billed
twice. While the job's steps run, the test holds the job's row locked until a transaction of
the worker waits on it, then has the server terminate that connection (the worker's transaction
dies in the middle), and lets go; again and again. Transactions that meet a dropped connection
are run again; a step that meets one elsewhere is handed back and run again, replaying the
calls it had finished."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from core.db import transaction
from core.models import ModelCall, Step
from tests.helpers import auth, start_worker, wait_for_job, wait_until

WORKER_NAME = "agentq-blips-worker"
BLIPS = 4


def _blip(conninfo: str, job_id: str) -> int:
    """Lock the job row until a worker transaction waits on it; terminate that connection."""
    with psycopg.connect(conninfo, autocommit=True) as watch, \
            psycopg.connect(conninfo) as locker:
        locker.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))

        def waiting() -> list[int]:
            return [pid for (pid,) in watch.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = current_database() AND wait_event_type = 'Lock'",
                (WORKER_NAME,))]

        pids = wait_until(waiting, 30, interval=0.01,
                          what="a worker transaction waiting on the job row")
        killed = 0
        for pid in pids:
            killed += bool(watch.execute("SELECT pg_terminate_backend(%s)", (pid,))
                           .fetchone()[0])  # type: ignore[index]
        locker.rollback()
    return killed


@pytest.mark.usefixtures("quiet_workers")
def test_dropped_connections_never_fail_a_job(
        client: TestClient, tenant_key: str, standin: Any, agentq_env: dict[str, str],
        database_url: str, tmp_path: Path) -> None:
    standin.state.delay_s = 0.5
    env = {**agentq_env, "AGENTQ_DB_APPLICATION_NAME": WORKER_NAME}
    worker = start_worker(env, tmp_path / "worker.log")
    conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    try:
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "research", "input": {"query": "Why do leaves change colour?",
                                          "max_subquestions": 3}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        killed = 0
        for _ in range(BLIPS):
            killed += _blip(conninfo, job_id)
            time.sleep(0.2)  # let the job move on before the next blip
        job = wait_for_job(client, tenant_key, job_id, timeout=90)
    finally:
        worker.stop()
    assert killed >= BLIPS, "the worker's transactions were not cut off"
    log = worker.output()
    assert job["status"] == "completed", (job.get("error"), log[-3000:])
    with transaction(read_only=True) as s:
        not_completed = s.scalar(select(func.count()).select_from(Step).where(
            Step.job_id == job_id, Step.status != "completed"))
        rows = s.scalar(select(func.count()).select_from(ModelCall)
                        .where(ModelCall.job_id == job_id))
        step_ids = set(s.scalars(select(Step.id).where(Step.job_id == job_id)))
    assert not_completed == 0
    assert rows is not None
    assert rows == job["usage"]["model_calls"]  # every call in the ledger once
    sent = [r for r in standin.state.request_ids if r.split(":")[0] in step_ids]
    assert len(sent) >= rows
