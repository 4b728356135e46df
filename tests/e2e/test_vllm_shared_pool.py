"""The pool against real vLLM servers: a cancelled job's requests are aborted at the server, and
losing one of two servers mid-run loses no job. (Runs after the research test: it kills a
server.)"""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import Platform, VllmServer, wait_for_job
from tests.helpers import auth, metric, wait_until

pytestmark = pytest.mark.e2e


def _counted(servers: list[VllmServer], name: str) -> float:
    return sum(metric(s.url, name) for s in servers)


def test_cancelling_a_job_stops_generation_at_the_server(vllm_servers: list[VllmServer],
                                                         platform: Platform) -> None:
    gen_before = _counted(vllm_servers, "vllm:generation_tokens_total")
    story = "Here is a very long story, told in many chapters.\n\nChapter 1\n\nOnce upon a time"
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        job_id = http.post("/v1/jobs", json={
            "kind": "batch", "input": {"prompts": [f"{story} ({i})" for i in range(6)],
                                       "max_tokens": 1200}}).json()["id"]
        wait_until(lambda: _counted(vllm_servers, "vllm:num_requests_running") >= 4, 180,
                   interval=0.5, what="the calls to be generating")
        time.sleep(3)
        assert _counted(vllm_servers, "vllm:num_requests_running") >= 4
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        wait_until(lambda: _counted(vllm_servers, "vllm:num_requests_running") == 0, 15,
                   interval=0.25, what="the servers to stop generating")
        stopped_at = _counted(vllm_servers, "vllm:generation_tokens_total")
        time.sleep(3)
        assert _counted(vllm_servers, "vllm:generation_tokens_total") == stopped_at
        job = wait_for_job(http, job_id, 60)
    assert job["status"] == "cancelled"
    engine = create_engine(platform.db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT finish_reason, completion_tokens FROM model_calls "
                                 "WHERE job_id = :j"), {"j": job_id}).all()
    engine.dispose()
    aborted = [n for reason, n in rows if reason == "cancelled"]
    assert len(aborted) >= 4
    assert all(0 < n < 1200 for n in aborted)
    # What was generated is on the ledger: the server may have made a token or two more per
    # call between the last chunk read and the abort.
    generated = stopped_at - gen_before
    billed = sum(n for _, n in rows)
    assert billed <= generated <= billed + 4 * len(rows)


def test_losing_one_of_two_servers_mid_run_loses_no_job(vllm_servers: list[VllmServer],
                                                        platform: Platform) -> None:
    doomed = vllm_servers[1]
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        ids = [http.post("/v1/jobs", json={"kind": "research", "input": {
            "query": f"What makes question {i} about rivers interesting?",
            "max_subquestions": 2}}).json()["id"] for i in range(4)]
        wait_until(lambda: metric(doomed.url, "vllm:num_requests_running") > 0, 180,
                   interval=0.25, what="calls on the second server")
        doomed.kill()
        jobs = [wait_for_job(http, job_id, 900) for job_id in ids]
    assert [j["status"] for j in jobs] == ["completed"] * 4, jobs
