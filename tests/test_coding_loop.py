"""The coder as an agent loop, through real Celery workers, Postgres, Redis and the sandbox,
against the stand-in model server (a base model: it chooses each action as JSON under a
schema): it writes a fix, runs the tests, reads the failure, repairs and passes; a tool error
reaches the model and the loop goes on; the step budget ends a loop with a last short call;
parallel candidates, where the first to pass wins and the others are cancelled and aborted at
the server; a failed round escalates to a larger size class; and a step run again after its
worker died rebuilds the same workspace from its replayed calls."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text

from bench.standin import StandinServer
from core.db import transaction
from core.models import ModelCall, Step
from tests.helpers import auth, start_worker, wait_for_job, wait_until
from tests.stack import isolated_stack
from tests.test_coding import BUGGY

TASK = "Make add() return the sum."
FIXED = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a * b\n"


def act(tool: str, **arguments: Any) -> str:
    return json.dumps({"tool": tool, "arguments": arguments})


WRITE_FIX = act("write_file", path="calc.py", content=FIXED)
WRITE_WRONG = act("write_file", path="calc.py", content=WRONG)
RUN_TESTS = act("run_tests")
FINISH = json.dumps({"final": {"summary": "Changed add."}})


def submit(http: Any, key: str, budget: dict[str, Any] | None = None, **extra: Any) -> str:
    resp = http.post("/v1/jobs", headers=auth(key), json={
        "kind": "coding", "budget": budget or {},
        "input": {"task": TASK, "files": BUGGY, "test_command": "python -m pytest -q",
                  **extra}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def steps_of(job_id: str) -> dict[str, Step]:
    with transaction() as s:
        found = list(s.scalars(select(Step).where(Step.job_id == job_id)))
        for step in found:
            s.expunge(step)
    return {step.key: step for step in found}


def calls_of(job_id: str, step_key: str) -> list[ModelCall]:
    step = steps_of(job_id)[step_key]
    with transaction() as s:
        rows = list(s.scalars(select(ModelCall).where(ModelCall.step_id == step.id)
                              .order_by(ModelCall.attempt, ModelCall.call_index)))
        for r in rows:
            s.expunge(r)
    return rows


def prompts_of(standin: StandinServer, job_id: str, step_key: str) -> list[str]:
    step_id = steps_of(job_id)[step_key].id
    with standin.state.lock:
        return [str(b.get("prompt", "")) for b in standin.state.bodies
                if b["_request_id"].startswith(step_id + ":")]


@pytest.mark.usefixtures("worker")
def test_the_coder_writes_runs_the_tests_reads_the_failure_repairs_and_passes(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.scripts = {f"Task: {TASK}": [WRITE_WRONG, RUN_TESTS, WRITE_FIX, RUN_TESTS]}
    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id, timeout=240)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["coder"] == "loop"
    assert result["passed"] is True
    assert result["winner"] == 1
    assert result["files"]["calc.py"] == FIXED
    assert "+    return a + b" in result["diff"]
    assert "1 passed" in result["test_report"]
    assert result["exit_code"] == 0
    assert result["candidates"] == [{"candidate": 1, "outcome": "passed", "rounds": 1,
                                     "turns": 4, "test_runs": 2, "exit_code": 0,
                                     "size": None}]
    assert set(steps_of(job_id)) == {"code-1-1"}
    rows = calls_of(job_id, "code-1-1")
    assert [r.turn for r in rows] == [1, 2, 3, 4]  # passing tests end the loop: no 5th call
    prompts = prompts_of(standin, job_id, "code-1-1")
    # The model read the failing report before it repaired the file.
    assert "The tests fail." in prompts[2]
    assert "1 failed" in prompts[2]
    assert "assert 6 == 5" in prompts[2]
    assert "Wrote calc.py" in prompts[1]


@pytest.mark.usefixtures("worker")
def test_a_tool_error_reaches_the_model_and_the_loop_goes_on(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.scripts = {f"Task: {TASK}": [
        act("read_file", path="nope.py"), act("write_file", path="../evil.py", content="x"),
        WRITE_FIX, RUN_TESTS]}
    job_id = submit(client, tenant_key)
    job = wait_for_job(client, tenant_key, job_id, timeout=240)
    assert job["status"] == "completed", job
    assert job["result"]["passed"] is True
    assert set(job["result"]["files"]) == set(BUGGY)  # nothing was written outside
    prompts = prompts_of(standin, job_id, "code-1-1")
    assert "error: there is no file 'nope.py'" in prompts[1]
    assert "is not a relative path inside the repository" in prompts[2]


@pytest.mark.usefixtures("worker")
def test_the_step_budget_ends_the_loop_with_a_last_short_call_and_keeps_the_work(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.scripts = {f"Task: {TASK}": [WRITE_WRONG, RUN_TESTS, WRITE_WRONG]}
    budget = 4000
    job_id = submit(client, tenant_key, budget={"step_max_tokens": {"coder-agent": budget}},
                    max_rounds=1)
    job = wait_for_job(client, tenant_key, job_id, timeout=240)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["passed"] is False
    assert result["files"]["calc.py"] == WRONG  # what it had written is kept
    assert "1 failed" in result["test_report"]
    assert result["candidates"][0]["outcome"] == "failed"
    step = steps_of(job_id)["code-1-1"]
    assert step.output is not None
    assert step.output["stopped"] == "step_budget"
    rows = calls_of(job_id, "code-1-1")
    assert sum(r.prompt_tokens + r.completion_tokens for r in rows) <= budget
    assert len(rows) >= 3  # it wrote, ran the tests, ... and made its last call
    with standin.state.lock:
        last = [b for b in standin.state.bodies if b["_request_id"].startswith(step.id)][-1]
    # The last call is short and may only answer.
    assert last["max_tokens"] <= 96
    schema = last["structured_outputs"]["json"]
    assert "tool" not in json.dumps(schema.get("properties") or {})
    assert "final" in json.dumps(schema)


@pytest.mark.usefixtures("worker")
def test_the_first_candidate_to_pass_wins_and_the_others_are_cancelled_and_aborted(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    # Candidates 1 and 3 write a long file slowly; candidate 2 fixes the bug at once.
    slow_write = act("write_file", path="calc.py",
                     content=FIXED + "# " + " ".join(["padding"] * 400) + "\n")
    standin.state.scripts = {"You are candidate 1 of 3.": [slow_write],
                             "You are candidate 2 of 3.": [WRITE_FIX, RUN_TESTS],
                             "You are candidate 3 of 3.": [slow_write]}
    standin.state.token_delay_by_marker = {"You are candidate 1 of 3.": 0.3,
                                           "You are candidate 3 of 3.": 0.3}
    aborted_before = standin.state.aborted_total
    job_id = submit(client, tenant_key, candidates=3)
    job = wait_for_job(client, tenant_key, job_id, timeout=240)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["passed"] is True
    assert result["winner"] == 2
    assert result["files"]["calc.py"] == FIXED
    assert {c["candidate"]: c["outcome"] for c in result["candidates"]} == {
        1: "cancelled", 2: "passed", 3: "cancelled"}
    found = steps_of(job_id)
    assert {k: str(s.status) for k, s in found.items()} == {
        "code-1-1": "cancelled", "code-2-1": "completed", "code-3-1": "cancelled"}
    # Their calls in flight were aborted at the server, and what they generated is billed.
    wait_until(lambda: standin.state.aborted_total - aborted_before >= 2, 30,
               what="the losers' calls to be aborted")
    def aborted_in_ledger() -> bool:
        return all([r.finish_reason for r in calls_of(job_id, key)] == ["cancelled"]
                   for key in ("code-1-1", "code-3-1"))

    wait_until(aborted_in_ledger, 30, what="the aborted calls in the ledger")
    events = client.get(f"/v1/jobs/{job_id}/events?limit=200",
                        headers=auth(tenant_key)).json()["data"]
    cancelled = [e["data"] for e in events if e["type"] == "step.cancelled"]
    assert sorted(c["step"] for c in cancelled) == ["code-1-1", "code-3-1"]
    assert all(c["reason"] == "step code-2-1 decided the job" for c in cancelled)


def test_more_candidates_than_allowed_are_422(client: TestClient, tenant_key: str) -> None:
    for extra, words in (({"candidates": 99}, "AGENTQ_CODING_MAX_CANDIDATES"),
                         ({"candidates": 2, "coder": "fixed"}, "needs the loop coder"),
                         ({"candidates": 0}, "candidates")):
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "coding", "input": {"task": TASK, "files": BUGGY, **extra}})
        assert resp.status_code == 422, resp.text
        assert words in resp.text


@pytest.fixture
def small_model() -> Iterator[StandinServer]:
    server = StandinServer(model="small-model").start()
    yield server
    server.stop()


@pytest.fixture
def two_sizes(agentq_env: dict[str, str], standin: Any, small_model: StandinServer,
              tmp_path: Path, quiet_workers: None) -> Iterator[None]:
    """A worker whose catalogue has a small model and a large one (the session's stand-in)."""
    catalogue = [{"name": "small-model", "endpoints": [small_model.url], "size": "small"},
                 {"name": "standin-model", "endpoints": [standin.url], "size": "large"}]
    proc = start_worker({**agentq_env, "AGENTQ_MODELS": json.dumps(catalogue)},
                        tmp_path / "sizes.log")
    yield
    proc.stop()


@pytest.mark.usefixtures("two_sizes")
def test_a_failed_round_escalates_to_the_larger_size_class(
        client: TestClient, tenant_key: str, standin: Any, small_model: StandinServer) -> None:
    marker = f"Task: {TASK}"
    small_model.state.scripts = {marker: [WRITE_WRONG, RUN_TESTS, FINISH]}
    standin.state.scripts = {marker: [WRITE_FIX, RUN_TESTS]}
    job_id = submit(client, tenant_key, max_rounds=2)
    job = wait_for_job(client, tenant_key, job_id, timeout=240)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["passed"] is True
    assert result["rounds"] == 2
    assert result["candidates"][0]["size"] == "large"
    assert {r.model for r in calls_of(job_id, "code-1-1")} == {"small-model"}
    assert {r.model for r in calls_of(job_id, "code-1-2")} == {"standin-model"}
    # The second round starts from the first one's files and test report.
    first = prompts_of(standin, job_id, "code-1-2")[0]
    assert "a * b" in first
    assert "1 failed" in first
    assert httpx.get(f"{small_model.url}/_stats").json()["requests_total"] == 3


def test_a_coder_step_run_again_rebuilds_its_workspace_from_the_replayed_calls(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    """Worker A is killed while the coder's fourth call is in flight (after it wrote a wrong
    fix, saw the tests fail and wrote the right one); worker B runs the step again: the three
    finished calls are replayed from the ledger (the tools run again over a workspace rebuilt
    from the input, and the test report reads the same, timings aside), only the fourth call
    is made anew, and the files come out the same."""
    standin.state.scripts = {f"Task: {TASK}": [WRITE_WRONG, RUN_TESTS, WRITE_FIX, RUN_TESTS]}
    standin.state.delay_by_index = {3: 60.0}
    with isolated_stack(database_url, agentq_env, tmp_path, "_coder_replay") as stack:
        first = stack.worker("first")
        key = stack.key("coder-replay")
        engine = create_engine(stack.env["AGENTQ_DATABASE_URL"])

        def query(sql: str, **params: Any) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params))

        with httpx.Client(base_url=stack.api, timeout=30) as http:
            job_id = submit(http, key)

            def in_fourth_call() -> str | None:
                found = query("SELECT id FROM steps WHERE job_id = :j", j=job_id)
                if not found:
                    return None
                step_id = str(found[0][0])
                settled = query("SELECT count(*) FROM model_calls WHERE step_id = :s",
                                s=step_id)[0][0]
                sent = f"{step_id}:1:3" in standin.state.request_ids
                return step_id if settled == 3 and sent else None

            step_id = wait_until(in_fourth_call, 90, what="the fourth call to be in flight")
            os.killpg(first.popen.pid, signal.SIGKILL)
            first.popen.wait(timeout=10)
            standin.state.delay_by_index = {}
            stack.worker("second")
            job = wait_for_job(http, key, job_id, timeout=240)
        rows = query("SELECT attempt, turn FROM model_calls WHERE step_id = :s "
                     "ORDER BY attempt, call_index", s=step_id)
        engine.dispose()
    assert job["status"] == "completed", job
    assert job["result"]["passed"] is True
    assert job["result"]["files"]["calc.py"] == FIXED
    assert [tuple(r) for r in rows] == [(1, 1), (1, 2), (1, 3), (2, 4)]
    sent = [r for r in standin.state.request_ids if r.startswith(step_id + ":")]
    assert sent == [f"{step_id}:1:{i}" for i in range(4)] + [f"{step_id}:2:3"]


def test_the_workspace_tools_check_paths_and_sizes_and_reports_read_the_same() -> None:
    from typing import cast

    from agents.base import StepContext, ToolCall
    from agents.coding.tools import CODING_TOOLS, CodeEnv
    from agents.coding.workspace import steady
    from agents.tools import run_tool

    env = CodeEnv(cast(StepContext, None), dict(BUGGY), "true")

    def call(tool: str, **arguments: Any) -> str:
        return run_tool(CODING_TOOLS, env, ToolCall(tool, json.dumps(arguments)), 10_000).text

    assert call("list_files") == "calc.py (32 bytes)\ntest_calc.py (65 bytes)"
    assert "return a - b" in call("read_file", path="calc.py")
    assert "offset 99 is past its end" in call("read_file", path="calc.py", offset=99)
    for path, words in (("../x.py", "relative path"), ("/etc/passwd", "relative path"),
                        ("calc.py/x.py", "both a file and the folder"),
                        (".sandbox-tmp/x", "the sandbox's own directory")):
        assert words in call("write_file", path=path, content="x"), path
    assert "larger than 200000 bytes" in call("write_file", path="big.py",
                                              content="x" * 200_001)
    for i in range(5):
        assert call("write_file", path=f"f{i}.py", content="x" * 190_000).startswith("Wrote")
    assert "more than 1000000 bytes" in call("write_file", path="f5.py", content="x" * 190_000)
    assert "f5.py" not in env.files
    assert call("no_such_tool").startswith("error: there is no tool 'no_such_tool'")
    assert steady("1 failed in 0.03s\nRan 2 tests in 0.001s") == \
        "1 failed in [time]\nRan 2 tests in [time]"
