"""Agent loops through real Celery workers, Postgres and Redis against the stand-in model
server: research investigators over a corpus search, read and answer under a step budget and a
turn limit; tool errors reach the model; chat models get OpenAI tools; a loop step whose
worker is killed is re-run without re-billing the calls it had finished."""

from __future__ import annotations

import json
import os
import signal
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text

from agents.loop import ANSWER_TOOL, LAST_TURN
from core.db import transaction
from core.models import ModelCall, Step
from tests.helpers import auth, wait_for_job, wait_until
from tests.stack import isolated_stack

pytestmark = pytest.mark.usefixtures("worker")

DOCUMENTS = {
    "bees.txt": "Honey bees make honey from flower nectar. Worker bees carry the nectar to the "
                "hive, where they evaporate its water by fanning their wings and store it in "
                "wax cells sealed with a cap of wax.",
    "volcanoes.txt": "Volcanoes erupt when magma rises through the crust. Pressure from "
                     "dissolved gases drives lava, ash and rock out of the vent.",
}
Q1 = "How do honey bees make honey from nectar?"
Q2 = "Where do bees store their honey?"
MARKER = f"Sub-question: {Q1}"
SEARCH = json.dumps({"tool": "search", "arguments": {"query": "honey nectar"}})
ANSWER = json.dumps({"final": {"sentences": [
    {"text": "Honey bees make honey from flower nectar.", "passages": [1]}]}})


def make_corpus(http: Any, key: str) -> str:
    cid = str(http.post("/v1/corpora", json={"name": "nature"}, headers=auth(key)).json()["id"])
    for name, body in DOCUMENTS.items():
        resp = http.post(f"/v1/corpora/{cid}/documents", headers=auth(key),
                         files={"file": (name, body.encode(), "text/plain")})
        assert resp.status_code in (200, 201), resp.text
    return cid


@pytest.fixture
def corpus(client: TestClient, tenant_key: str) -> str:
    return make_corpus(client, tenant_key)


def submit(http: Any, key: str, corpus_id: str, effort: str, **budget: Any) -> str:
    resp = http.post("/v1/jobs", headers=auth(key), json={
        "kind": "research", "budget": budget,
        "input": {"query": "How do bees make and keep honey?", "max_subquestions": 2,
                  "corpus_id": corpus_id, "effort": effort}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def investigator(job_id: str, key: str = "investigate-1") -> Step:
    with transaction() as s:
        step = s.scalars(select(Step).where(Step.job_id == job_id, Step.key == key)).one()
        s.expunge(step)
        return step


def calls_of(step_id: str) -> list[ModelCall]:
    with transaction() as s:
        rows = list(s.scalars(select(ModelCall).where(ModelCall.step_id == step_id)
                              .order_by(ModelCall.attempt, ModelCall.call_index)))
        for r in rows:
            s.expunge(r)
        return rows


def bodies_of(standin: Any, step_id: str) -> list[dict[str, Any]]:
    with standin.state.lock:
        return [b for b in standin.state.bodies if b["_request_id"].startswith(step_id + ":")]


def action_schema(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["structured_outputs"]["json"])


def offers_tools(schema: dict[str, Any]) -> bool:
    return any("tool" in (o.get("properties") or {}) for o in schema.get("anyOf") or [schema])


@pytest.fixture
def two_questions(standin: Any) -> None:
    standin.state.plan_text = json.dumps([Q1, Q2])


@pytest.mark.usefixtures("two_questions")
@pytest.mark.parametrize(("tokenizer", "step_budget"), [(None, 3000), (503, 5000)])
def test_a_loop_stops_at_its_step_budget_and_answers_from_its_last_call(
        client: TestClient, tenant_key: str, standin: Any, corpus: str,
        tokenizer: int | None, step_budget: int) -> None:
    """With the server's tokenizer prompts are counted before each call; when it does not
    answer they are bounded by their bytes, and the same turns need a larger budget."""
    standin.state.scripts = {MARKER: [SEARCH]}  # it would search for ever
    standin.state.tokenize_status = tokenizer
    job_id = submit(client, tenant_key, corpus, "max", max_total_tokens=200_000,
                    step_max_tokens={"investigator": step_budget})
    job = wait_for_job(client, tenant_key, job_id, timeout=90)
    assert job["status"] == "completed", job
    step = investigator(job_id)
    rows = calls_of(step.id)
    spent = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert spent <= step_budget, spent
    assert step.prompt_tokens + step.completion_tokens == spent
    # several turns of searching, then the budget (not the 12-turn limit) ended it
    assert 3 <= len(rows) < 12
    assert [r.turn for r in rows] == list(range(1, len(rows) + 1))
    assert step.output is not None
    assert step.output["stopped"] == "step_budget"
    assert step.output["turns"] == len(rows)
    assert step.output["fallback"] is False
    # the last call could only answer, and was short; the answer is its answer
    bodies = bodies_of(standin, step.id)
    assert len(bodies) == len(rows)
    assert all(offers_tools(action_schema(b)) for b in bodies[:-1])
    last = action_schema(bodies[-1])
    assert not offers_tools(last)
    assert "final" in last["properties"]
    assert LAST_TURN in bodies[-1]["prompt"]
    assert rows[-1].max_tokens <= 256
    said = json.loads(rows[-1].output_text)["final"]["sentences"][0]["text"]
    assert said.startswith("Stand-in answer")
    assert step.output["answer"].startswith("Stand-in answer")
    assert [c["name"] for c in rows[-1].tool_calls or []] == [ANSWER_TOOL]
    assert all([c["name"] for c in r.tool_calls or []] == ["search"] for r in rows[:-1])


@pytest.mark.usefixtures("two_questions")
def test_the_turn_limit_holds(client: TestClient, tenant_key: str, standin: Any,
                              corpus: str) -> None:
    standin.state.scripts = {MARKER: [SEARCH]}
    job_id = submit(client, tenant_key, corpus, "medium")  # up to 4 turns
    job = wait_for_job(client, tenant_key, job_id, timeout=90)
    assert job["status"] == "completed", job
    step = investigator(job_id)
    rows = calls_of(step.id)
    assert [r.turn for r in rows] == [1, 2, 3, 4]
    assert step.input["turn_limit"] == 4
    assert step.output is not None
    assert step.output["stopped"] == "turn_limit"
    bodies = bodies_of(standin, step.id)
    assert [offers_tools(action_schema(b)) for b in bodies] == [True, True, True, False]
    assert LAST_TURN in bodies[-1]["prompt"]
    assert LAST_TURN not in bodies[-2]["prompt"]
    # the prompt of each turn starts with the one before it (prefix-stable)
    for before, after in zip(bodies, bodies[1:], strict=False):
        assert after["prompt"].startswith(before["prompt"])
    # the other investigator answered at once, in its first turn
    other = calls_of(investigator(job_id, "investigate-2").id)
    assert [r.turn for r in other] == [1]


@pytest.mark.usefixtures("two_questions")
def test_a_dollar_budget_ends_a_loop_with_its_last_call_and_is_never_exceeded(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    """Each call is fitted to the job's dollars as well as its tokens: the loop sees the
    dollars run low and makes its last, short call instead of failing its step."""
    standin.state.scripts = {MARKER: [SEARCH]}  # it would search for ever
    cap = Decimal("0.00025")
    job_id = submit(client, tenant_key, corpus, "max", max_cost_usd=float(cap))
    job = wait_for_job(client, tenant_key, job_id, timeout=90)
    # The synthesis may or may not find room after the loop: either way the loop answered.
    assert job["status"] in ("completed", "budget_exhausted"), job
    step = investigator(job_id)
    rows = calls_of(step.id)
    assert step.output is not None, step.error
    assert step.output["stopped"] == "job_budget", [
        (r.prompt_tokens, r.completion_tokens, r.cost_usd) for r in rows]
    assert step.output["fallback"] is False
    assert 2 <= len(rows) < 12
    assert [c["name"] for c in rows[-1].tool_calls or []] == [ANSWER_TOOL]
    with transaction() as s:
        spent = sum(r.cost_usd or Decimal(0) for r in s.scalars(
            select(ModelCall).where(ModelCall.job_id == job_id)))
    assert Decimal(0) < spent <= cap


@pytest.mark.usefixtures("two_questions")
def test_low_effort_is_one_call_per_investigator(client: TestClient, tenant_key: str,
                                                 standin: Any, corpus: str) -> None:
    standin.state.scripts = {MARKER: [SEARCH]}
    job_id = submit(client, tenant_key, corpus, "low")
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    assert job["budget"]["max_total_tokens"] == 20_000  # the configured default
    for key in ("investigate-1", "investigate-2"):
        step = investigator(job_id, key)
        rows = calls_of(step.id)
        assert [r.turn for r in rows] == [1]
        (body,) = bodies_of(standin, step.id)
        assert not offers_tools(action_schema(body))
    medium = submit(client, tenant_key, corpus, "medium")
    assert wait_for_job(client, tenant_key, medium)["budget"]["max_total_tokens"] == 80_000


@pytest.mark.usefixtures("two_questions")
def test_tool_errors_reach_the_model_and_the_step_goes_on(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    standin.state.scripts = {MARKER: [
        json.dumps({"tool": "fly", "arguments": {}}),
        json.dumps({"tool": "search", "arguments": {"query": 5}}),
        json.dumps({"tool": "read_passage", "arguments": {"passage": 99}}),
        json.dumps({"tool": "read_document", "arguments": {"passage": 1, "offset": 10**6}}),
        json.dumps({"tool": "read_document", "arguments": {"passage": 1}}),
        ANSWER]}
    job_id = submit(client, tenant_key, corpus, "high")  # up to 8 turns
    job = wait_for_job(client, tenant_key, job_id, timeout=90)
    assert job["status"] == "completed", job
    step = investigator(job_id)
    rows = calls_of(step.id)
    assert [r.turn for r in rows] == [1, 2, 3, 4, 5, 6]
    prompts = [b["prompt"] for b in bodies_of(standin, step.id)]
    assert "error: there is no tool 'fly'; the tools are: search, read_passage, " \
           "read_document" in prompts[1]
    assert "error: the arguments of search do not fit: query:" in prompts[2]
    assert "error: there is no passage [99]" in prompts[3]
    assert "offset 1000000 is past its end" in prompts[4]
    assert "Document 'bees', characters 0 to" in prompts[5]
    assert "fanning their wings" in prompts[5]
    assert step.output is not None
    assert step.output["stopped"] == "answered"
    section = job["result"]["sections"][0]
    assert section["question"] == Q1
    assert section["answer"] == "Honey bees make honey from flower nectar [1]."
    assert job["result"]["citations"][0]["document"] == "bees"
    check = job["result"]["verification"]
    assert check["problems"] == [], check
    # (the other section and the brief are the stand-in's words, which cite nothing)
    assert all(u["where"] != "section 1" for u in check["unsupported_sentences"]), check


def _chat_catalogue(url: str) -> str:
    return json.dumps([{"name": "standin-model", "endpoints": [url], "api": "chat",
                        "tool_calling": True}])


def test_a_chat_model_with_tool_calling_gets_tools_and_its_tool_calls_drive_the_loop(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    standin.state.plan_text = json.dumps([Q1, Q2])
    standin.state.scripts = {MARKER: [
        json.dumps({"tool": "search", "arguments": {"query": "wax cells"}}),
        json.dumps({"tool": "read_passage", "arguments": {"passage": 1}}),
        json.dumps({"tool": ANSWER_TOOL, "arguments": {
            "sentences": [{"text": "Bees store honey in wax cells.", "passages": [1]}]}})]}
    catalogue = _chat_catalogue(standin.url)
    with isolated_stack(database_url, agentq_env, tmp_path, "_chat",
                        AGENTQ_MODELS=catalogue) as stack:
        stack.worker("worker", AGENTQ_MODELS=catalogue)
        key = stack.key("chat")
        with httpx.Client(base_url=stack.api, timeout=30) as http:
            corpus_id = make_corpus(http, key)
            job_id = submit(http, key, corpus_id, "medium")
            job = wait_for_job(http, key, job_id, timeout=90)
        engine = create_engine(stack.env["AGENTQ_DATABASE_URL"])
        with engine.connect() as conn:
            step_id = conn.execute(text("SELECT id FROM steps WHERE job_id = :j AND "
                                        "key = 'investigate-1'"), {"j": job_id}).scalar_one()
            turns = list(conn.execute(text(
                "SELECT turn FROM model_calls WHERE step_id = :s ORDER BY call_index"),
                {"s": step_id}).scalars())
        engine.dispose()
    assert job["status"] == "completed", job
    assert job["result"]["sections"][0]["answer"] == "Bees store honey in wax cells [1]."
    assert turns == [1, 2, 3]
    bodies = bodies_of(standin, step_id)
    assert [b["_path"] for b in bodies] == ["/v1/chat/completions"] * 3
    for b in bodies:
        names = [t["function"]["name"] for t in b["tools"]]
        assert names == ["search", "read_passage", "read_document", ANSWER_TOOL]
        assert b["tool_choice"] == "required"
        assert "structured_outputs" not in b
        assert b["tools"][0]["function"]["parameters"]["properties"]["query"]["type"] == "string"
    # each tool call comes back as a tool message answering it
    third = bodies[2]["messages"]
    assert [m["role"] for m in third] == ["system", "user", "assistant", "tool", "assistant",
                                         "tool"]
    assert third[2]["tool_calls"][0]["function"]["name"] == "search"
    assert third[3]["tool_call_id"] == third[2]["tool_calls"][0]["id"]
    assert "[1] (bees)" in third[3]["content"]
    assert third[5]["content"].startswith("[1] (bees) Honey bees make honey")


def test_a_loop_step_whose_worker_is_killed_replays_its_finished_calls(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    """Worker A is killed while the investigator's third call is in flight; worker B runs the
    step again: its first two calls are replayed from the ledger (never sent again, never
    billed again), the same transcript forms, and the third call is made anew."""
    standin.state.plan_text = json.dumps([Q1, Q2])
    standin.state.scripts = {MARKER: [
        SEARCH, json.dumps({"tool": "read_passage", "arguments": {"passage": 1}}), ANSWER]}
    standin.state.delay_by_index = {2: 60.0}
    with isolated_stack(database_url, agentq_env, tmp_path, "_replay") as stack:
        first = stack.worker("first")
        key = stack.key("replay")
        engine = create_engine(stack.env["AGENTQ_DATABASE_URL"])

        def query(sql: str, **params: Any) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params))

        with httpx.Client(base_url=stack.api, timeout=30) as http:
            corpus_id = make_corpus(http, key)
            job_id = submit(http, key, corpus_id, "medium")

            def in_third_call() -> str | None:
                found = query("SELECT id FROM steps WHERE job_id = :j AND key = "
                              "'investigate-1'", j=job_id)
                if not found:
                    return None
                step_id = str(found[0][0])
                settled = query("SELECT count(*) FROM model_calls WHERE step_id = :s",
                                s=step_id)[0][0]
                sent = f"{step_id}:1:2" in standin.state.request_ids
                return step_id if settled == 2 and sent else None

            step_id = wait_until(in_third_call, 60, what="the third call to be in flight")
            os.killpg(first.popen.pid, signal.SIGKILL)
            first.popen.wait(timeout=10)
            standin.state.delay_by_index = {}
            stack.worker("second")
            job = wait_for_job(http, key, job_id, timeout=90)
        rows = query("SELECT request_id, attempt, turn, prompt_tokens + completion_tokens "
                     "FROM model_calls WHERE step_id = :s ORDER BY attempt, call_index",
                     s=step_id)
        usage = query("SELECT prompt_tokens + completion_tokens, model_calls FROM jobs "
                      "WHERE id = :j", j=job_id)[0]
        ledger = query("SELECT sum(prompt_tokens + completion_tokens), count(*) "
                       "FROM model_calls WHERE job_id = :j", j=job_id)[0]
        attempt = query("SELECT attempt FROM steps WHERE id = :s", s=step_id)[0][0]
        engine.dispose()
    assert job["status"] == "completed", job
    assert attempt == 2
    assert [(r[1], r[2]) for r in rows] == [(1, 1), (1, 2), (2, 3)]
    sent = [r for r in standin.state.request_ids if r.startswith(step_id + ":")]
    assert sent == [f"{step_id}:1:0", f"{step_id}:1:1", f"{step_id}:1:2", f"{step_id}:2:2"]
    assert tuple(usage) == tuple(ledger)
    assert job["result"]["sections"][0]["answer"] == "Honey bees make honey from flower " \
                                                     "nectar [1]."
