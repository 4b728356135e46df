"""Coding jobs and the workers' sandboxes, end to end: a real Celery worker running as `nobody`
on a host without user namespaces (so its sandbox can only be `plain`) says so in its log,
fails a coding job already queued with a clear error before any model call, and from then on
the API refuses coding jobs (422) and `/v1/kinds` says why, until the operator accepts `plain`
by name. The session's own worker is paused meanwhile (`quiet_workers`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator import sandboxes
from tests.helpers import ROOT, Proc, auth, wait_for_job, wait_until
from tests.test_coding import BUGGY, FIX
from tests.test_coding_loop import RUN_TESTS, WRITE_FIX

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                reason="drops to nobody: needs Linux and root")


def start_nobody_worker(env: dict[str, str], log: Path, **settings: str) -> Proc:
    """A Celery worker as `nobody` with user namespaces disabled (tests/unprivileged.py)."""
    args = [sys.executable, str(ROOT / "tests" / "unprivileged.py"), "--no-userns", "--",
            sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel", "INFO",
            "-P", "threads", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"nobody-{log.stem}@%h"]
    proc = Proc(args, {**env, "PYTHONPATH": str(ROOT), **settings}, log)
    proc.wait_for_output("ready.", timeout=60)
    return proc


@pytest.fixture
def no_worker_up(quiet_workers: None, agentq_env: dict[str, str]) -> None:
    """No worker has a word in (the session's is paused: its word expires)."""
    wait_until(lambda: not sandboxes.live(), 30, what="the paused workers' word to expire")


def submit(client: TestClient, key: str) -> Any:
    return client.post("/v1/jobs", headers=auth(key), json={
        "kind": "coding", "input": {"task": "Make add() return the sum.", "files": BUGGY,
                                    "test_command": "python -m pytest -q"}})


def coding_kind(client: TestClient, key: str) -> dict[str, Any]:
    kinds = client.get("/v1/kinds", headers=auth(key)).json()["data"]
    return next(k for k in kinds if k["name"] == "coding")


@pytest.mark.usefixtures("no_worker_up")
def test_a_worker_that_cannot_isolate_fails_queued_jobs_and_the_api_refuses_new_ones(
        client: TestClient, tenant_key: str, standin: Any, agentq_env: dict[str, str],
        tmp_path: Path) -> None:
    standin.state.replies = {"Changed files:": FIX}
    assert coding_kind(client, tenant_key)["available"] is True  # nobody has said otherwise
    queued = submit(client, tenant_key)
    assert queued.status_code == 202, queued.text  # no worker up: it waits in the queue

    worker = start_nobody_worker(agentq_env, tmp_path / "nobody.log")
    try:
        job = wait_for_job(client, tenant_key, queued.json()["id"], timeout=120)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "sandbox_unavailable"
        assert "AGENTQ_SANDBOX_WEAKEST_MODE" in job["error"]["message"]
        assert "'plain'" in job["error"]["message"]
        assert job["usage"]["total_tokens"] == 0, "it failed before any model call"
        log = worker.output()
        assert "sandbox mode plain: coding jobs are refused here" in log

        wait_until(lambda: [w for w in sandboxes.live() if w.refusal], 30,
                   what="the worker's word")
        refused = submit(client, tenant_key)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "sandbox_unavailable"
        assert "AGENTQ_SANDBOX_WEAKEST_MODE" in error["message"]
        kind = coding_kind(client, tenant_key)
        assert kind["available"] is False
        assert "AGENTQ_SANDBOX_WEAKEST_MODE" in kind["unavailable_reason"]
        research = [k for k in client.get("/v1/kinds", headers=auth(tenant_key)).json()["data"]
                    if k["name"] == "research"]
        assert research[0]["available"] is True  # other kinds are not affected
    finally:
        worker.stop()
    wait_until(lambda: not sandboxes.live(), 30, what="the stopped worker's word to go")


@pytest.mark.usefixtures("no_worker_up")
def test_coding_jobs_run_in_plain_when_the_operator_accepts_it(
        client: TestClient, tenant_key: str, standin: Any, agentq_env: dict[str, str],
        tmp_path: Path) -> None:
    standin.state.replies = {"Changed files:": FIX}
    # The default coder is the loop: it writes the fix and runs the tests.
    standin.state.scripts = {"Task: Make add() return the sum.": [WRITE_FIX, RUN_TESTS]}
    worker = start_nobody_worker(agentq_env, tmp_path / "nobody-plain.log",
                                 AGENTQ_SANDBOX_WEAKEST_MODE="plain")
    try:
        assert "sandbox mode plain (gives up: every isolation" in worker.output()
        wait_until(lambda: sandboxes.live(), 30, what="the worker's word")
        assert coding_kind(client, tenant_key)["available"] is True
        resp = submit(client, tenant_key)
        assert resp.status_code == 202, resp.text
        job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=120)
        assert job["status"] == "completed", job
        assert job["result"]["passed"] is True
        assert "1 passed" in job["result"]["test_report"]
    finally:
        worker.stop()
