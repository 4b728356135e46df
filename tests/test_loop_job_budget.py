"""A job's token budget binding in the middle of an agent loop, through a real worker, Postgres
and Redis against the stand-in model server: the loop sees the job's tokens run low, makes its
last call with `max_tokens` cut to what the job has left, and the job never spends more than
its `max_total_tokens`.

One worker runs one step at a time, so what the job has left at each call is known: a first
job with room to spare measures the calls (the stand-in answers the same prompts the same
way), and the second job's budget is chosen from them so that the investigator's first turn
(reading a long document) fits, and after it only a last call cut to about half its usual
`max_tokens` does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from agents.loop import ANSWER_TOOL, LAST_TURN, MESSAGE_SLACK, MIN_RESULT_TOKENS
from agents.research.investigator import AGENT
from tests.helpers import auth, wait_for_job
from tests.stack import isolated_stack

Q1 = "How do honey bees make honey from nectar?"
Q2 = "Where do bees store their honey?"
MARKER = f"Sub-question: {Q1}"
# One word a token on the stand-in: a document read shows some 1,200 tokens.
DOCUMENT = "Honey bees make honey from flower nectar. " + "x " * 1500
READ = json.dumps({"tool": "read_document", "arguments": {"passage": 1}})
SEARCH = json.dumps({"tool": "search", "arguments": {"query": "honey nectar"}})
LEFT_FOR_LAST = 128  # what the job has left past the last call's prompt, about


def _submit(http: httpx.Client, key: str, corpus_id: str, max_total_tokens: int) -> str:
    resp = http.post("/v1/jobs", headers=auth(key), json={
        "kind": "research",
        "budget": {"max_total_tokens": max_total_tokens,
                   "step_max_tokens": {"investigator": 30_000}},
        "input": {"query": "How do bees make and keep honey?", "max_subquestions": 2,
                  "corpus_id": corpus_id, "effort": "medium"}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_a_job_budget_ends_a_loop_with_a_cut_last_call_and_is_never_exceeded(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    standin.state.plan_text = json.dumps([Q1, Q2])
    standin.state.scripts = {MARKER: [READ, SEARCH]}  # it would go on searching
    with isolated_stack(database_url, agentq_env, tmp_path, "_jobbudget") as stack:
        stack.worker("solo", concurrency=1)
        key = stack.key("jobbudget")
        engine = create_engine(stack.env["AGENTQ_DATABASE_URL"])

        def calls(job_id: str) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(text(
                    "SELECT s.key, c.turn, c.prompt_tokens, c.completion_tokens, c.max_tokens, "
                    "c.tool_calls FROM model_calls c JOIN steps s ON s.id = c.step_id "
                    "WHERE c.job_id = :j ORDER BY c.started_at, c.call_index"), {"j": job_id}))

        def tokens(rows: list[Any]) -> int:
            return sum(r.prompt_tokens + r.completion_tokens for r in rows)

        with httpx.Client(base_url=stack.api, timeout=30) as http:
            cid = str(http.post("/v1/corpora", json={"name": "bees"},
                                headers=auth(key)).json()["id"])
            resp = http.post(f"/v1/corpora/{cid}/documents", headers=auth(key),
                             files={"file": ("bees.txt", DOCUMENT.encode(), "text/plain")})
            assert resp.status_code in (200, 201), resp.text

            # The measure: room to spare.
            first = _submit(http, key, cid, 200_000)
            assert wait_for_job(http, key, first, timeout=120)["status"] == "completed"
            measured = calls(first)
            order = [r.key for r in measured]
            loop = [r for r in measured if r.key == "investigate-1"]
            assert len(loop) == 4
            assert loop[0].tool_calls[0]["name"] == "read_document"
            # What the job has spent when the investigator starts: the plan, and the other
            # investigator if it ran first.
            before = tokens(measured[:order.index("investigate-1")])
            p1, c1, p2 = loop[0].prompt_tokens, loop[0].completion_tokens, loop[1].prompt_tokens
            # The loop makes its first turn only if, after it, a last call of its usual size
            # fits as well (`plan_turn`), the turn's result counted at its least.
            turn, final = AGENT.turn_max_tokens, AGENT.final_max_tokens
            first_turn = 2 * p1 + 2 * turn + MIN_RESULT_TOKENS + len(LAST_TURN) \
                + MESSAGE_SLACK * 4 + final
            budget = before + p1 + c1 + p2 + LEFT_FOR_LAST
            assert budget - before >= first_turn, (budget, before, first_turn)

            # The job whose budget binds after the investigator's first turn.
            job_id = _submit(http, key, cid, budget)
            job = wait_for_job(http, key, job_id, timeout=120)
            rows = calls(job_id)
            with engine.connect() as conn:
                output = conn.execute(text(
                    "SELECT output, error FROM steps WHERE job_id = :j AND "
                    "key = 'investigate-1'"), {"j": job_id}).one()
                spent = conn.execute(text(
                    "SELECT prompt_tokens + completion_tokens FROM jobs WHERE id = :j"),
                    {"j": job_id}).scalar_one()
        engine.dispose()
    # The synthesis (or the other investigator) finds no room after the loop.
    assert job["status"] in ("completed", "budget_exhausted"), job
    assert spent == tokens(rows) <= budget
    keys = [r.key for r in rows]
    assert keys[:keys.index("investigate-1")] == order[:order.index("investigate-1")]
    assert output.output is not None, output.error
    assert output.output["stopped"] == "job_budget", rows
    loop = [r for r in rows if r.key == "investigate-1"]
    assert [r.turn for r in loop] == [1, 2]
    assert loop[0].max_tokens == turn
    last = loop[-1]
    # The last call could only answer, its max_tokens cut to exactly what the job had left.
    assert [c["name"] for c in last.tool_calls or []] == [ANSWER_TOOL]
    assert last.prompt_tokens > p2  # the last-turn note
    left = budget - tokens(rows[:rows.index(last)])
    assert last.max_tokens == left - last.prompt_tokens
    assert 0 < last.max_tokens < final
    assert output.output["turns"] == 2
