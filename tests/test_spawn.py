"""Sub-agents through real Celery workers, Postgres and Redis against the stand-in model server,
with the `delegate` kind of `tests/plugins/agentq-kind-delegate` installed: a lead agent's
`spawn` tool adds helper steps that run in parallel; the lead waits for them without holding a
worker, runs again replaying its finished calls (never sent or billed twice) and answers from
their typed notes. Spawns past the limits (the settings, the job's budget) come back to the
model as tool errors; cancelling the job stops the children and the waiting lead; a job
cancelled while its lead waits continues to completed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from tests.helpers import auth, install_plugin, wait_for_job, wait_until
from tests.stack import Stack, isolated_stack


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory with the plugin installed in it, to put on PYTHONPATH."""
    return install_plugin("agentq-kind-delegate", tmp_path_factory.mktemp("delegate"))


@pytest.fixture(scope="module")
def stack(database_url: str, agentq_env: dict[str, str], plugin_path: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A deployment of its own (so no worker without the kind takes its messages): the API
    and one worker of two slots, with the kind installed; the worker lets a step spawn two
    children and a job have three."""
    with isolated_stack(database_url, agentq_env, tmp_path_factory.mktemp("spawn"), "_spawn",
                        PYTHONPATH=plugin_path) as s:
        s.worker("worker", 2, PYTHONPATH=plugin_path, AGENTQ_SPAWN_MAX_CHILDREN="2",
                 AGENTQ_SPAWN_MAX_PER_JOB="3")
        yield s


@pytest.fixture(scope="module")
def db(stack: Stack) -> Iterator[Engine]:
    engine = create_engine(stack.env["AGENTQ_DATABASE_URL"])
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.key("delegating")


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api, timeout=30) as client:
        yield client


def spawn(*topics: str) -> str:
    return json.dumps({"tool": "spawn", "arguments": {"tasks": [{"topic": t} for t in topics]}})


def final(answer: str) -> str:
    return json.dumps({"final": {"answer": answer}})


def submit(http: httpx.Client, key: str, question: str, rounds: int = 1,
           parallel: bool = False, **budget: Any) -> str:
    resp = http.post("/v1/jobs", headers=auth(key), json={
        "kind": "delegate", "input": {"question": question, "rounds": rounds,
                                      "parallel": parallel},
        "budget": budget})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def query(db: Engine, sql: str, **params: Any) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(text(sql), params))


def step_rows(db: Engine, job_id: str) -> dict[str, Any]:
    """The job's steps by key."""
    return {r.key: r for r in query(
        db, "SELECT id, key, role, status, attempt, depends_on, deps_remaining, spawned_by, "
            "lease_expires_at, prompt_tokens + completion_tokens AS tokens, model_calls "
            "FROM steps WHERE job_id = :j ORDER BY created_at", j=job_id)}


def ledger_of(db: Engine, step_id: str) -> list[Any]:
    return query(db, "SELECT request_id, attempt, call_index, turn, "
                     "prompt_tokens + completion_tokens AS tokens, finish_reason "
                     "FROM model_calls WHERE step_id = :s ORDER BY attempt, call_index",
                 s=step_id)


def sent(standin: Any, step_id: str) -> list[str]:
    with standin.state.lock:
        return [r for r in standin.state.request_ids if r.startswith(step_id + ":")]


def prompts(standin: Any, step_id: str) -> list[str]:
    with standin.state.lock:
        return [str(b.get("prompt")) for b in standin.state.bodies
                if b["_request_id"].startswith(step_id + ":")]


def event_types(http: httpx.Client, key: str, job_id: str) -> list[dict[str, Any]]:
    page = http.get(f"/v1/jobs/{job_id}/events", params={"after": 0, "limit": 500},
                    headers=auth(key)).json()
    return list(page["data"])


def assert_billed_once(db: Engine, job_id: str) -> None:
    """The job's usage is its ledger's, and no call was made (at full price) twice."""
    usage = query(db, "SELECT prompt_tokens + completion_tokens, model_calls FROM jobs "
                      "WHERE id = :j", j=job_id)[0]
    ledger = query(db, "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0), count(*) "
                       "FROM model_calls WHERE job_id = :j", j=job_id)[0]
    assert tuple(usage) == tuple(ledger)
    whole = query(db, "SELECT step_id, call_index, count(*) FROM model_calls WHERE job_id = :j "
                      "AND coalesce(finish_reason, '') <> 'cancelled' "
                      "GROUP BY step_id, call_index HAVING count(*) > 1", j=job_id)
    assert whole == []


def test_spawned_helpers_outputs_come_back_typed_and_the_lead_answers_with_them(
        http: httpx.Client, key: str, standin: Any, db: Engine) -> None:
    standin.state.scripts = {"Round 1 of 1. Question: How do bees keep honey?": [
        spawn("bees", "wax"), final("Bees make honey and keep it in wax.")]}
    standin.state.replies = {"Note on topic: bees": "Bees make honey from nectar.",
                             "Note on topic: wax": "Wax cells hold the honey."}
    job_id = submit(http, key, "How do bees keep honey?")
    job = wait_for_job(http, key, job_id, timeout=90)
    assert job["status"] == "completed", job
    notes = [{"topic": "bees", "note": "Bees make honey from nectar."},
             {"topic": "wax", "note": "Wax cells hold the honey."}]
    assert job["result"] == {"answer": "Bees make honey and keep it in wax.", "notes": notes,
                             "leads": 1}
    listed = http.get(f"/v1/jobs/{job_id}/steps", headers=auth(key)).json()["data"]
    assert [(s["key"], s["role"], s["status"], s["spawned_by"]) for s in listed] == [
        ("lead-1", "lead", "completed", None),
        ("lead-1.1", "helper", "completed", "lead-1"),
        ("lead-1.2", "helper", "completed", "lead-1")]
    assert job["progress"]["steps_total"] == 3
    steps = step_rows(db, job_id)
    lead = steps["lead-1"]
    # It ran twice: once up to its spawn, once (after its helpers) to its answer.
    assert lead.attempt == 2
    assert list(lead.depends_on) == ["lead-1.1", "lead-1.2"]
    # The first call was sent once and replayed from the ledger on the second run.
    assert sent(standin, lead.id) == [f"{lead.id}:1:0", f"{lead.id}:2:1"]
    rows = ledger_of(db, lead.id)
    assert [(r.attempt, r.call_index, r.turn) for r in rows] == [(1, 0, 1), (2, 1, 2)]
    assert lead.tokens == sum(r.tokens for r in rows)
    assert lead.model_calls == 2
    assert_billed_once(db, job_id)
    # The model read the helpers' notes, as JSON of their output model, as the tool's result.
    second = prompts(standin, lead.id)[-1]
    assert '[1] {"topic":"bees","note":"Bees make honey from nectar."}' in second
    assert '[2] {"topic":"wax","note":"Wax cells hold the honey."}' in second
    events = event_types(http, key, job_id)
    waiting = [e["data"] for e in events if e["type"] == "step.waiting"]
    assert waiting == [{"step": "lead-1", "role": "lead",
                        "waiting_for": ["lead-1.1", "lead-1.2"]}]
    spawned = [e["data"] for e in events if e["type"] == "plan.ready"]
    assert [s["key"] for s in spawned[0]["steps"]] == ["lead-1.1", "lead-1.2"]


def test_spawns_past_the_settings_come_back_to_the_model_as_errors(
        http: httpx.Client, key: str, standin: Any, db: Engine) -> None:
    """Two children per step, three per job (the worker's settings): the first lead asks for
    three (too many for a step), then two; the second lead asks for two (the job has room for
    one), then one. Each refusal is the tool's result, and the leads go on."""
    standin.state.scripts = {
        "Round 1 of 2": [spawn("a", "b", "c"), spawn("a", "b"), final("first")],
        "Round 2 of 2": [spawn("c", "d"), spawn("c"), final("second")]}
    job_id = submit(http, key, "What are the parts?", rounds=2)
    job = wait_for_job(http, key, job_id, timeout=90)
    assert job["status"] == "completed", job
    assert job["result"]["answer"] == "second"
    assert [n["topic"] for n in job["result"]["notes"]] == ["a", "b", "c"]
    steps = step_rows(db, job_id)
    assert sorted(k for k, s in steps.items() if s.spawned_by) == [
        "lead-1.1", "lead-1.2", "lead-2.1"]
    first, second = steps["lead-1"], steps["lead-2"]
    per_step = ("error: this step may spawn at most 2 sub-agents (AGENTQ_SPAWN_MAX_CHILDREN) "
                "and has spawned 0; 3 more were asked for")
    per_job = ("error: this job may have at most 3 sub-agents (AGENTQ_SPAWN_MAX_PER_JOB) and "
               "has 2; 2 more were asked for")
    first_prompts, second_prompts = prompts(standin, first.id), prompts(standin, second.id)
    assert per_step in first_prompts[1]
    assert per_step in first_prompts[-1]
    assert per_job in second_prompts[1]
    assert per_job in second_prompts[-1]
    # Each lead's refused call and its spawn were made once; only the answer came after.
    for lead in (first, second):
        assert sent(standin, lead.id) == [f"{lead.id}:1:0", f"{lead.id}:1:1", f"{lead.id}:2:2"]
    assert_billed_once(db, job_id)


def test_leads_spawning_at_once_share_the_jobs_cap(
        http: httpx.Client, key: str, standin: Any, db: Engine) -> None:
    """Two leads at once each ask for two helpers, then one; the job may have three. Whichever
    spawns first gets two (its second ask passes the step's cap); the other is refused (by the
    check before its spawn, or, if both checked at once, by the check as the helpers are
    added, when its next run, replaying, is refused) and then gets one."""
    standin.state.scripts = {
        f"Round {n} of 2. Question: Who goes first?": [
            spawn(f"{n}a", f"{n}b"), spawn(f"{n}a"), final(f"lead {n}")] for n in (1, 2)}
    job_id = submit(http, key, "Who goes first?", rounds=2, parallel=True)
    job = wait_for_job(http, key, job_id, timeout=90)
    assert job["status"] == "completed", job
    steps = step_rows(db, job_id)
    children = {k: s.spawned_by for k, s in steps.items() if s.spawned_by}
    assert len(children) == 3
    by_lead = {lead: sorted(k for k, b in children.items() if b == lead)
               for lead in ("lead-1", "lead-2")}
    first, second = sorted(by_lead, key=lambda lead: -len(by_lead[lead]))
    assert by_lead[first] == [f"{first}.1", f"{first}.2"]
    assert by_lead[second] == [f"{second}.1"]
    last = {lead: prompts(standin, steps[lead].id)[-1] for lead in by_lead}
    assert "error: this step may spawn at most 2 sub-agents" in last[first]
    assert "error: this job may have at most 3 sub-agents (AGENTQ_SPAWN_MAX_PER_JOB) and " \
           "has 2; 2 more were asked for" in last[second]
    assert_billed_once(db, job_id)


def test_a_spawn_the_jobs_budget_cannot_pay_for_is_refused(
        http: httpx.Client, key: str, standin: Any, db: Engine) -> None:
    """Each helper's step budget is 3,000 tokens and the job has about 5,000 left: two
    helpers are refused, one is not."""
    standin.state.scripts = {"Round 1 of 1. Question: Which one?": [
        spawn("x", "y"), spawn("x"), final("one")]}
    job_id = submit(http, key, "Which one?", max_total_tokens=5000,
                    step_max_tokens={"helper": 3000})
    job = wait_for_job(http, key, job_id, timeout=90)
    assert job["status"] == "completed", job
    assert [n["topic"] for n in job["result"]["notes"]] == ["x"]
    lead = step_rows(db, job_id)["lead-1"]
    refusal = ("error: the job's budget has too few tokens left for 2 sub-agents of 3000 "
               "tokens each (6000 in all); ask for fewer")
    assert refusal in prompts(standin, lead.id)[1]
    assert step_rows(db, job_id)["lead-1.1"].spawned_by == "lead-1"
    assert "lead-1.2" not in step_rows(db, job_id)


def _waiting_with_helpers_running(http: httpx.Client, key: str, standin: Any, db: Engine,
                                  question: str) -> tuple[str, dict[str, Any]]:
    """A job whose lead has spawned two helpers, both in a (slow) model call at once."""
    standin.state.scripts = {f"Round 1 of 1. Question: {question}": [
        spawn("slow one", "slow two"), final("done")]}
    # Each helper's answer streams for about 30 s: one token every 2 s.
    standin.state.token_delay_by_marker = {"Note on topic: slow": 2.0}
    job_id = submit(http, key, question)

    def both_calling() -> dict[str, Any] | None:
        steps = step_rows(db, job_id)
        helpers = [s for s in steps.values() if s.spawned_by]
        if len(helpers) == 2 and all(sent(standin, s.id) for s in helpers):
            return steps
        return None

    steps = wait_until(both_calling, 60, what="both helpers to be in their model calls")
    return job_id, steps


def test_cancelling_the_job_stops_the_children_and_the_waiting_lead(
        http: httpx.Client, key: str, standin: Any, db: Engine) -> None:
    job_id, steps = _waiting_with_helpers_running(http, key, standin, db, "Cancel me?")
    lead = steps["lead-1"]
    # The lead waits for its helpers without a lease (no worker holds it) ...
    assert (lead.status, lead.deps_remaining, lead.lease_expires_at) == ("pending", 2, None)
    # ... while they run in parallel, each in a model call: the worker has two slots, so
    # the waiting lead holds none.
    assert [steps[k].status for k in ("lead-1.1", "lead-1.2")] == ["running", "running"]
    resp = http.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert resp.status_code == 202
    job = wait_for_job(http, key, job_id, timeout=15)  # well before the calls' 30 s
    assert job["status"] == "cancelled", job
    after = step_rows(db, job_id)
    assert {k: s.status for k, s in after.items()} == {
        "lead-1": "cancelled", "lead-1.1": "cancelled", "lead-1.2": "cancelled"}
    assert all(s.lease_expires_at is None for s in after.values())
    # The helpers' calls were closed: none settled as a whole answer.
    for k in ("lead-1.1", "lead-1.2"):
        assert all(r.finish_reason == "cancelled" for r in ledger_of(db, after[k].id))


def test_a_job_cancelled_while_its_lead_waits_continues_to_completed(
        http: httpx.Client, key: str, standin: Any, db: Engine) -> None:
    job_id, steps = _waiting_with_helpers_running(http, key, standin, db, "Continue me?")
    assert http.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 202
    assert wait_for_job(http, key, job_id, timeout=15)["status"] == "cancelled"
    standin.state.token_delay_by_marker = {}

    def continued() -> bool:
        resp = http.post(f"/v1/jobs/{job_id}/continue", headers=auth(key))
        assert resp.status_code in (202, 409), resp.text
        return resp.status_code == 202

    wait_until(continued, 30, what="the job to be continuable")
    job = wait_for_job(http, key, job_id, timeout=90)
    assert job["status"] == "completed", job
    assert job["result"]["answer"] == "done"
    assert [n["topic"] for n in job["result"]["notes"]] == ["slow one", "slow two"]
    after = step_rows(db, job_id)
    lead = after["lead-1"]
    assert {k: s.status for k, s in after.items()} == {
        "lead-1": "completed", "lead-1.1": "completed", "lead-1.2": "completed"}
    # The lead's spawn was sent once: its continued run replayed it and found its helpers.
    assert sent(standin, lead.id) == [f"{lead.id}:1:0", f"{lead.id}:2:1"]
    assert sorted(after) == ["lead-1", "lead-1.1", "lead-1.2"]
    assert_billed_once(db, job_id)
