"""The coder loop on real vLLM servers with the embedded base model: each turn's action is
chosen under the JSON-schema constraint of the coding tools (their schemas compile on the
server, the tool with no arguments included), the tools run over the workspace and in the
sandbox, every call stays within the model's 2048-token context and the step within its
budget, and the job ends with a result of the declared shape. Whether a 270M base model fixes
the bug is not asserted: the figures are reported, not promised."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import create_engine, text

from agents.coding import CodingResult
from tests.e2e.conftest import Platform, VllmServer, wait_for_job
from tests.helpers import auth

pytestmark = pytest.mark.e2e

FILES = {"calc.py": "def add(a, b):\n    return a - b\n",
         "test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"}


def test_the_coder_loop_runs_on_a_real_vllm_server(
        vllm_servers: list[VllmServer], platform: Platform) -> None:
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        resp = http.post("/v1/jobs", json={"kind": "coding", "input": {
            "task": "Fix add() in calc.py so that it returns the sum of a and b.",
            "files": FILES, "candidates": 2, "max_rounds": 1, "max_turns": 4}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        job = wait_for_job(http, job_id, 900)
    assert job["status"] == "completed", job
    result = CodingResult.model_validate(job["result"])
    assert result.coder == "loop"
    assert {c.candidate for c in result.candidates} == {1, 2}
    engine = create_engine(platform.db_url)
    with engine.connect() as conn:
        steps = list(conn.execute(text(
            "SELECT id, key, status, max_tokens, prompt_tokens + completion_tokens, output "
            "FROM steps WHERE job_id = :j ORDER BY key"), {"j": job_id}))
        rows = {step[0]: list(conn.execute(text(
            "SELECT turn, prompt_tokens, max_tokens, tool_calls FROM model_calls "
            "WHERE step_id = :s ORDER BY call_index"), {"s": step[0]})) for step in steps}
    engine.dispose()
    assert [s[1] for s in steps] == ["code-1-1", "code-2-1"]
    for step_id, key, status, budget, spent, output in steps:
        calls = rows[step_id]
        if status == "cancelled":  # the other candidate passed first
            continue
        assert status == "completed", (key, status)
        assert 1 <= len(calls) <= 4
        assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
        assert spent <= budget
        assert all(c[1] + c[2] <= 2048 for c in calls)  # the model's context
        out = output if isinstance(output, dict) else json.loads(output)
        assert out["test_runs"] >= 1  # its files were tested, by the model or after it
        # Every turn's answer was an action under the schema: a tool call or the answer.
        assert all(c[3] for c in calls), calls
    print("coder loop on the embedded model:", json.dumps(
        [c.model_dump() for c in result.candidates]), "passed:", result.passed)
