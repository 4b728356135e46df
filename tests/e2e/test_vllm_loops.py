"""Agent loops on real vLLM servers with the embedded base model: research investigators over
a corpus choose their actions under a JSON-schema constraint from a plain transcript, their
prompts are counted by the server's tokenizer, every call stays within the model's 2048-token
context and each step within its budget, and the tokens billed are the tokens the servers
counted."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from agents.loop import LAST_TURN, MESSAGE_SLACK, MIN_RESULT_TOKENS
from agents.research.investigator import AGENT
from tests.e2e.conftest import Platform, VllmServer, make_corpus, wait_for_job
from tests.helpers import auth, metric

pytestmark = pytest.mark.e2e

DOCUMENTS = {
    "bees.txt": "Honey bees make honey from flower nectar. Worker bees carry the nectar to the "
                "hive, where they evaporate its water by fanning their wings and store it in "
                "wax cells sealed with a cap of wax.",
    "wax.txt": "Beeswax is made by young worker bees from glands on their abdomen. They build "
               "the hexagonal cells of the comb with it; the cells hold honey, pollen and the "
               "brood.",
}


def test_research_over_a_corpus_runs_loops_on_a_real_vllm_server(
        vllm_servers: list[VllmServer], platform: Platform) -> None:
    def counted(name: str) -> float:
        return sum(metric(s.url, name) for s in vllm_servers)

    prompt_before = counted("vllm:prompt_tokens_total")
    gen_before = counted("vllm:generation_tokens_total")
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        corpus_id = make_corpus(http, "bees", DOCUMENTS)
        job_id = submit(http, corpus_id)
        job = wait_for_job(http, job_id, 900)
    assert job["status"] == "completed", job
    assert job["result"]["sources"] == "corpus"
    assert len(job["result"]["sections"]) == 2
    engine = create_engine(platform.db_url)
    with engine.connect() as conn:
        steps = list(conn.execute(text(
            "SELECT id, max_tokens, prompt_tokens + completion_tokens FROM steps "
            "WHERE job_id = :j AND role = 'investigator'"), {"j": job_id}))
        rows = {step_id: list(conn.execute(text(
            "SELECT turn, prompt_tokens, completion_tokens, max_tokens FROM model_calls "
            "WHERE step_id = :s ORDER BY call_index"), {"s": step_id}))
            for step_id, _, _ in steps}
        prompt, completion = conn.execute(text(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM model_calls "
            "WHERE job_id = :j"), {"j": job_id}).one()
    engine.dispose()
    for step_id, budget, spent in steps:
        calls = rows[step_id]
        assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
        assert 1 <= len(calls) <= 4  # medium: up to 4 turns
        assert spent == sum(c[1] + c[2] for c in calls) <= budget
        assert all(c[1] + c[3] <= 2048 for c in calls)  # the model's context
    assert prompt == counted("vllm:prompt_tokens_total") - prompt_before
    assert completion == counted("vllm:generation_tokens_total") - gen_before

    # The step budget binds: room for the last call (its prompt, the last-turn note and a
    # full answer) with some to spare, but not for a turn and a last call after it (the
    # loop's plan: the turn's prompt and answer, then the last call's prompt bound and answer).
    first = max(calls[0][1] for calls in rows.values())
    budget = first + AGENT.final_max_tokens + 150
    turn = AGENT.turn_max_tokens
    needed = 2 * first + 2 * turn + MIN_RESULT_TOKENS + len(LAST_TURN) + MESSAGE_SLACK * 4 \
        + AGENT.final_max_tokens
    assert budget < needed
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        job_id = submit(http, corpus_id, step_max_tokens={"investigator": budget})
        job = wait_for_job(http, job_id, 900)
    assert job["status"] == "completed", job
    engine = create_engine(platform.db_url)
    with engine.connect() as conn:
        tight = list(conn.execute(text(
            "SELECT id, max_tokens, output FROM steps "
            "WHERE job_id = :j AND role = 'investigator'"), {"j": job_id}))
        tight_rows = {step_id: list(conn.execute(text(
            "SELECT turn, prompt_tokens, completion_tokens, max_tokens, output_text "
            "FROM model_calls WHERE step_id = :s ORDER BY call_index"), {"s": step_id}))
            for step_id, _, _ in tight}
    engine.dispose()
    assert len(tight) == 2
    for step_id, step_budget, output in tight:
        assert step_budget == budget
        calls = tight_rows[step_id]
        # The platform's database is the embedded default, SQLite: JSON comes back as text.
        out: dict[str, Any] = json.loads(output) if isinstance(output, str) else output
        assert out["stopped"] == "step_budget", (out, calls)
        assert out["turns"] == len(calls) >= 1
        assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
        assert sum(c[1] + c[2] for c in calls) <= budget
        # Each call's prompt and answer fit what the step had left before it.
        spent = 0
        for c in calls:
            assert spent + c[1] + c[3] <= budget, (spent, calls)
            spent += c[1] + c[2]
        # The last call could only answer (the schema held nothing but the final answer),
        # and was short.
        last = calls[-1]
        assert last[3] <= AGENT.final_max_tokens
        assert re.match(r'\s*\{\s*"final"', last[4]), last[4]


def submit(http: httpx.Client, corpus_id: str, **budget: Any) -> str:
    resp = http.post("/v1/jobs", json={"kind": "research", "budget": budget, "input": {
        "query": "How do bees make and keep honey?", "max_subquestions": 2,
        "corpus_id": corpus_id, "effort": "medium"}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])
