"""OpenTelemetry traces: off (nothing set up) unless an `OTEL_*` exporter is configured; on, a
research job over a corpus reaches a real OTLP/HTTP receiver (in this process, decoding the
protobuf with opentelemetry-proto) as one connected tree, from the API process and the worker
processes, with the GenAI attributes, the span kinds and the ledger's token counts; so do an
OpenAI batch (at its tier) and a coding job, whose sandbox run is a span of its test step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from sqlalchemy import create_engine, text

from agents.sandbox.model import MODES
from bench.otlp_receiver import OtlpReceiver, ReceivedSpan
from core import tracing
from core.db import transaction
from core.models import Job
from tests.helpers import ROOT, auth, install_plugin, wait_for_job, wait_until
from tests.stack import Stack, isolated_stack
from tests.test_agent_loops import ANSWER, MARKER, SEARCH, make_corpus
from tests.test_coding import BUGGY, FIX

SERVICE = "agentq-under-test"
INTERNAL, CLIENT, CONSUMER = (ProtoSpan.SPAN_KIND_INTERNAL, ProtoSpan.SPAN_KIND_CLIENT,
                              ProtoSpan.SPAN_KIND_CONSUMER)


def test_the_otel_variables_choose_the_exporters() -> None:
    assert tracing.exporters({}) == []
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}
                             ) == ["otlp"]
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "otlp, console"}) == ["otlp", "console"]
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                              "OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                              "OTEL_SDK_DISABLED": "TRUE"}) == []


PROBE = """
from opentelemetry import trace
from core import tracing
from orchestrator import traces
print(tracing.enabled(), type(trace.get_tracer_provider()).__name__, traces.new_job(),
      tracing.message_headers())
"""


@pytest.mark.parametrize("env", [
    {}, {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}])
def test_without_an_exporter_no_tracer_provider_is_set_up(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "ProxyTracerProvider", "None", "None"]


def test_an_untraced_job_keeps_no_trace_context(client: Any, tenant_key: str) -> None:
    assert not tracing.enabled()
    resp = client.post("/v1/jobs", headers=auth(tenant_key),
                       json={"kind": "completion", "input": {"prompt": "untraced"}})
    assert resp.status_code == 202, resp.text
    with transaction() as s:
        job = s.get(Job, resp.json()["id"])
        assert job is not None
        assert job.trace_context is None


@dataclass
class Traced:
    stack: Stack
    receiver: OtlpReceiver
    key: str


@pytest.fixture(scope="module")
def traced(database_url: str, agentq_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """An API process and two workers that export traces to a receiver in this process (with
    the `delegate` kind of `tests/plugins`, whose steps spawn sub-agents)."""
    receiver = OtlpReceiver().start()
    plugin = install_plugin("agentq-kind-delegate", tmp_path_factory.mktemp("delegate"))
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_BSP_SCHEDULE_DELAY": "100", "PYTHONPATH": plugin}
    try:
        with isolated_stack(database_url, agentq_env, tmp_path_factory.mktemp("otel"), "_otel",
                            **otel) as stack:
            for name in ("worker-a", "worker-b"):
                stack.worker(name, concurrency=4, **otel)
            yield Traced(stack, receiver, stack.key("traced"))
    finally:
        receiver.stop()


def _ledger(url: str, job_id: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any],
                                           list[dict[str, Any]]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        calls = {r["request_id"]: dict(r) for r in conn.execute(text(
            "SELECT request_id, step_id, model, prompt_tokens, completion_tokens, max_tokens,"
            " finish_reason, ttft_ms, cost_usd, cached_from FROM model_calls"
            " WHERE job_id = :j"), {"j": job_id}).mappings()}
        job = dict(conn.execute(text(
            "SELECT trace_context, prompt_tokens, completion_tokens, model_calls, cost_usd"
            " FROM jobs WHERE id = :j"), {"j": job_id}).mappings().one())
        steps = [dict(r) for r in conn.execute(text(
            "SELECT id, key, role, attempt, status FROM steps WHERE job_id = :j"),
            {"j": job_id}).mappings()]
    engine.dispose()
    return calls, job, steps


def _spans_of(traced: Traced, trace_id: str, model_calls: int, root: str
              ) -> list[ReceivedSpan]:
    """The trace's spans, once its `root`, all its model calls' spans and the parent of every
    span that has arrived have arrived (processes export in batches, a parent after its
    children)."""
    def arrived() -> list[ReceivedSpan] | None:
        mine = [s for s in traced.receiver.spans() if s.trace_id == trace_id]
        ids = {s.span_id for s in mine}
        done = root in [s.name for s in mine] and sum(
            "gen_ai.usage.input_tokens" in s.attributes for s in mine) == model_calls \
            and all(not s.parent_span_id or s.parent_span_id in ids for s in mine)
        return mine if done else None

    found: list[ReceivedSpan] = wait_until(arrived, 30, what="the job's spans at the receiver")
    return found


@dataclass(frozen=True)
class JobTrace:
    calls: dict[str, dict[str, Any]]
    job: dict[str, Any]
    steps: list[dict[str, Any]]
    trace_id: str
    job_span_id: str
    spans: list[ReceivedSpan]


def _job_trace(traced: Traced, job_id: str, root: str) -> JobTrace:
    """The job's ledger rows and, once they have all arrived (`_spans_of`), its trace's spans."""
    calls, job, steps = _ledger(traced.stack.env["AGENTQ_DATABASE_URL"], job_id)
    trace_id, job_span_id = job["trace_context"].split("-")[1:3]
    return JobTrace(calls, job, steps, trace_id, job_span_id,
                    _spans_of(traced, trace_id, len(calls), root))


def _one_tree(spans: list[ReceivedSpan], root_id: str) -> dict[str, ReceivedSpan]:
    """The spans by id, checked to be one tree: one root, `root_id`, and every other span's
    parent there."""
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "a span id was used twice"
    assert [s.span_id for s in spans if not s.parent_span_id] == [root_id]
    orphans = [s.name for s in spans if s.parent_span_id and s.parent_span_id not in by_id]
    assert orphans == []
    return by_id


def test_a_research_job_is_one_connected_trace(traced: Traced, standin: Any) -> None:
    standin.state.plan_text = json.dumps([MARKER.split(": ", 1)[1],
                                          "Where do bees store their honey?"])
    standin.state.scripts = {MARKER: [SEARCH, ANSWER]}
    key = traced.key
    with httpx.Client(base_url=traced.stack.api, timeout=30) as http:
        corpus_id = make_corpus(http, key)
        resp = http.post("/v1/jobs", headers=auth(key), json={
            "kind": "research", "input": {"query": "How do bees make and keep honey?",
                                          "max_subquestions": 2, "corpus_id": corpus_id}})
        assert resp.status_code == 202, resp.text
        job_id = str(resp.json()["id"])
        assert wait_for_job(http, key, job_id, timeout=90)["status"] == "completed"
    t = _job_trace(traced, job_id, "job research")
    calls, job, steps, trace_id, job_span_id, spans = (
        t.calls, t.job, t.steps, t.trace_id, t.job_span_id, t.spans)

    # One tree under the job's span; nothing of the job went to another trace.
    by_id = _one_tree(spans, job_span_id)
    assert all(s.trace_id == trace_id for s in traced.receiver.spans()
               if s.attributes.get("agentq.job.id") == job_id)
    root = by_id[job_span_id]
    assert root.name == "job research"
    assert root.attributes["agentq.job.status"] == "completed"
    assert root.attributes["agentq.usage.prompt_tokens"] == job["prompt_tokens"]
    assert root.attributes["agentq.usage.completion_tokens"] == job["completion_tokens"]
    assert root.attributes["agentq.usage.model_calls"] == job["model_calls"] == len(calls)
    assert root.attributes["agentq.cost_usd"] == pytest.approx(float(job["cost_usd"]))
    assert root.attributes["agentq.budget.max_total_tokens"] > 0
    assert root.attributes["agentq.service_tier"] == "standard"
    assert all(s.resource["service.name"] == SERVICE for s in spans)

    # The API's part and the steps, each from its enqueue, under the job's span.
    submits = [s for s in spans if s.name == "submit"]
    assert len(submits) == 1
    assert submits[0].parent_span_id == job_span_id
    step_spans = {s.attributes["agentq.step.id"]: s for s in spans
                  if s.name.startswith("step ")}
    assert set(step_spans) == {st["id"] for st in steps}
    for st in steps:
        span = step_spans[st["id"]]
        assert span.name == f"step {st['role']}"
        assert span.parent_span_id == job_span_id
        assert span.attributes["agentq.step.key"] == st["key"]
        assert span.attributes["agentq.step.status"] == "completed"
        assert span.attributes["agentq.step.queue_wait_ms"] >= 0
        assert span.attributes["agentq.service_tier"] == "standard"
        queued = [c for c in spans if c.parent_span_id == span.span_id and c.name == "queued"]
        assert len(queued) == 1
        assert queued[0].start_ns == span.start_ns
    # The first step's message carried the API's context: its span links to the submission.
    planner = next(s for s in step_spans.values() if s.attributes["agentq.step.key"] == "plan")
    assert (trace_id, submits[0].span_id) in planner.links
    # API and worker processes, all in the one trace.
    api_pid = submits[0].resource["process.pid"]
    worker_pids = {s.resource["process.pid"] for s in step_spans.values()}
    assert api_pid not in worker_pids

    # Model calls: GenAI semantic conventions, and the ledger's figures.
    model_spans = {s.attributes["agentq.request_id"]: s for s in spans
                   if "gen_ai.usage.input_tokens" in s.attributes}
    assert set(model_spans) == set(calls)
    for request_id, row in calls.items():
        span = model_spans[request_id]
        a = span.attributes
        assert by_id[span.parent_span_id] is step_spans[row["step_id"]]
        assert a["gen_ai.operation.name"] in ("text_completion", "chat")
        assert span.name == f"{a['gen_ai.operation.name']} {row['model']}"
        assert a["gen_ai.request.model"] == row["model"]
        assert a["gen_ai.request.max_tokens"] == row["max_tokens"]
        assert a["gen_ai.usage.input_tokens"] == row["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == row["completion_tokens"]
        assert a["gen_ai.response.finish_reasons"] == [row["finish_reason"]]
        assert a["agentq.cost_usd"] == pytest.approx(float(row["cost_usd"]))
        assert a["agentq.service_tier"] == "standard"
        if row["cached_from"] is None:
            assert a["gen_ai.server.time_to_first_token"] == pytest.approx(row["ttft_ms"] / 1000)
            assert [e[0] for e in span.events] == ["gen_ai.first_token"]
            assert span.start_ns <= span.events[0][1] <= span.end_ns
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in model_spans.values()) \
        == job["prompt_tokens"]
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in model_spans.values()) \
        == job["completion_tokens"]

    # Kinds: a step consumes its message from the queue, a model call is a client of the
    # model server; the rest (job, submission, queue wait, tools) are internal.
    assert {s.kind for s in step_spans.values()} == {CONSUMER}
    assert {s.kind for s in model_spans.values()} == {CLIENT}
    outer = {s.span_id for s in [*step_spans.values(), *model_spans.values()]}
    assert {s.kind for s in spans if s.span_id not in outer} == {INTERNAL}

    # The investigator's search, under its step.
    tools = [s for s in spans if s.name == "execute_tool search"]
    assert tools, "no execute_tool span"
    for tool in tools:
        assert tool.attributes["gen_ai.tool.name"] == "search"
        assert by_id[tool.parent_span_id].name == "step investigator"


def test_a_continued_job_stays_in_its_trace(traced: Traced) -> None:
    """A job that ran out of budget and was continued: its span ends with the first stop (an
    error), the continued run is a span under it, and the steps of both runs stay in the
    tree."""
    key = traced.key
    with httpx.Client(base_url=traced.stack.api, timeout=30) as http:
        resp = http.post("/v1/jobs", headers=auth(key), json={
            "kind": "research", "input": {"query": "How do tides work?", "max_subquestions": 2},
            "budget": {"max_total_tokens": 100}})
        assert resp.status_code == 202, resp.text
        job_id = str(resp.json()["id"])
        stopped = wait_for_job(http, key, job_id, timeout=60)
        assert stopped["status"] == "budget_exhausted", stopped
        resp = http.post(f"/v1/jobs/{job_id}/continue", headers=auth(key),
                         json={"budget": {"max_total_tokens": 50_000}})
        assert resp.status_code == 202, resp.text
        assert wait_for_job(http, key, job_id, timeout=90)["status"] == "completed"
    t = _job_trace(traced, job_id, "job research continued")
    job, job_span_id, spans = t.job, t.job_span_id, t.spans
    by_id = _one_tree(spans, job_span_id)
    root = by_id[job_span_id]
    assert root.name == "job research"
    assert root.attributes["agentq.job.status"] == "budget_exhausted"
    assert root.status_code == 2  # error
    continued = [s for s in spans if s.name == "job research continued"]
    assert len(continued) == 1
    assert continued[0].parent_span_id == job_span_id
    assert continued[0].attributes["agentq.job.status"] == "completed"
    assert continued[0].attributes["agentq.budget.max_total_tokens"] == 50_000
    assert continued[0].start_ns >= root.end_ns
    planner_runs = sorted((s for s in spans if s.name == "step planner"),
                          key=lambda s: s.start_ns)
    assert [s.attributes["agentq.step.status"] for s in planner_runs] == ["failed", "completed"]
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in spans
               if "gen_ai.usage.input_tokens" in s.attributes) == job["prompt_tokens"]


def _job_traces(traced: Traced) -> set[str]:
    engine = create_engine(traced.stack.env["AGENTQ_DATABASE_URL"])
    with engine.connect() as conn:
        found = {str(t).split("-")[1] for (t,) in conn.execute(text(
            "SELECT trace_context FROM jobs WHERE trace_context IS NOT NULL"))}
    engine.dispose()
    return found


def test_an_idempotent_replay_records_no_orphan_span(traced: Traced) -> None:
    key = traced.key
    body = {"kind": "completion", "input": {"prompt": "Replay me", "max_tokens": 8}}
    once = {**auth(key), "Idempotency-Key": "traced-replay"}
    with httpx.Client(base_url=traced.stack.api, timeout=30) as http:
        first = http.post("/v1/jobs", headers=once, json=body)
        assert first.status_code == 202, first.text
        again = http.post("/v1/jobs", headers=once, json=body)
        assert again.status_code == 202, again.text
        assert again.headers.get("Idempotent-Replayed") == "true"
        job_id = str(first.json()["id"])
        assert again.json()["id"] == job_id
        # A later submission: once its span has arrived, so has every span the API ended
        # before it (a process exports its spans in the order they end).
        later = http.post("/v1/jobs", headers=auth(key), json=body)
        assert later.status_code == 202, later.text
        later_id = str(later.json()["id"])
        wait_until(lambda: any(s.name == "submit" and s.attributes.get("agentq.job.id")
                               == later_id for s in traced.receiver.spans()), 30,
                   what="the later submission's span")
    submits = [s for s in traced.receiver.spans() if s.name == "submit"]
    # Each submission's span is in its job's trace; the replay's would be alone in its own.
    assert [s.trace_id for s in submits if s.trace_id not in _job_traces(traced)] == []
    assert [s.attributes.get("agentq.job.id") for s in submits].count(job_id) == 1


def test_a_step_that_spawns_ends_its_run_suspended(traced: Traced, standin: Any) -> None:
    question = "How do traced bees keep honey?"
    standin.state.scripts = {f"Round 1 of 1. Question: {question}": [
        json.dumps({"tool": "spawn", "arguments": {"tasks": [{"topic": "bees"}]}}),
        json.dumps({"final": {"answer": "In wax."}})]}
    standin.state.replies = {"Note on topic: bees": "Bees make honey from nectar."}
    key = traced.key
    with httpx.Client(base_url=traced.stack.api, timeout=30) as http:
        resp = http.post("/v1/jobs", headers=auth(key), json={
            "kind": "delegate", "input": {"question": question, "rounds": 1}})
        assert resp.status_code == 202, resp.text
        job_id = str(resp.json()["id"])
        assert wait_for_job(http, key, job_id, timeout=90)["status"] == "completed"
    t = _job_trace(traced, job_id, "job delegate")
    job_span_id, spans = t.job_span_id, t.spans
    _one_tree(spans, job_span_id)
    runs = sorted((s.start_ns, s.name, s.attributes.get("agentq.step.attempt"),
                    s.attributes.get("agentq.step.status")) for s in spans
                   if s.name.startswith("step "))
    # The lead's first run spawned its helper and ended waiting for it; its second answered.
    assert [(n, a, st) for _, n, a, st in runs if n == "step lead"] == [
        ("step lead", 1, "suspended"), ("step lead", 2, "completed")]
    assert [st for _, n, _, st in runs if n == "step helper"] == ["completed"]


def _batch_line(i: int) -> str:
    return json.dumps({"custom_id": f"t{i}", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "standin-model", "prompt": f"Traced line {i}",
                                "max_tokens": 8}})


def test_an_openai_batch_is_one_connected_trace(traced: Traced) -> None:
    key = traced.key
    data = ("\n".join(_batch_line(i) for i in range(6)) + "\n").encode()
    with httpx.Client(base_url=traced.stack.api, timeout=30) as http:
        up = http.post("/v1/files", headers=auth(key), data={"purpose": "batch"},
                       files={"file": ("traced.jsonl", data)})
        assert up.status_code == 200, up.text
        made = http.post("/v1/batches", headers=auth(key), json={
            "input_file_id": up.json()["id"], "endpoint": "/v1/completions",
            "completion_window": "24h"})
        assert made.status_code == 200, made.text
        batch_id = str(made.json()["id"])

        def ended() -> dict[str, Any] | None:
            got: dict[str, Any] = http.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
            return got if got["status"] in ("completed", "failed", "cancelled") else None

        batch = wait_until(ended, 90, interval=0.2, what="the batch to end")
        assert batch["status"] == "completed", batch
        tier = http.get(f"/v1/jobs/{batch_id}", headers=auth(key)).json()["service_tier"]
    assert tier == "flex"
    t = _job_trace(traced, batch_id, "job openai_batch")
    calls, job, spans = t.calls, t.job, t.spans
    assert len(calls) >= 6

    by_id = _one_tree(spans, t.job_span_id)
    root = by_id[t.job_span_id]
    assert (root.name, root.kind) == ("job openai_batch", INTERNAL)
    assert root.attributes["agentq.job.status"] == "completed"
    assert root.attributes["agentq.service_tier"] == tier
    assert root.attributes["agentq.usage.prompt_tokens"] == job["prompt_tokens"]
    assert root.attributes["agentq.usage.completion_tokens"] == job["completion_tokens"]
    assert root.attributes["agentq.usage.model_calls"] == job["model_calls"] == len(calls)
    assert [s.parent_span_id for s in spans if s.name == "submit"] == [t.job_span_id]
    # Its steps (each one's runs) under the job's span; each step ran to completion.
    step_spans = {s.span_id: s for s in spans if s.name.startswith("step ")}
    assert {s.attributes["agentq.step.id"] for s in step_spans.values()
            if s.attributes["agentq.step.status"] == "completed"} == {st["id"] for st in t.steps}
    for span in step_spans.values():
        assert (span.parent_span_id, span.kind) == (t.job_span_id, CONSUMER)
        assert span.attributes["agentq.service_tier"] == tier
    # Each line's model call under the step that ran it, with its ledger row's figures.
    model_spans = {s.attributes["agentq.request_id"]: s for s in spans
                   if "gen_ai.usage.input_tokens" in s.attributes}
    assert set(model_spans) == set(calls)
    for request_id, row in calls.items():
        span = model_spans[request_id]
        assert span.kind == CLIENT
        assert span.parent_span_id in step_spans
        assert by_id[span.parent_span_id].attributes["agentq.step.id"] == row["step_id"]
        assert span.attributes["agentq.service_tier"] == tier
        assert span.attributes["gen_ai.usage.input_tokens"] == row["prompt_tokens"]
        assert span.attributes["gen_ai.usage.output_tokens"] == row["completion_tokens"]
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in model_spans.values()) \
        == job["prompt_tokens"] > 0
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in model_spans.values()) \
        == job["completion_tokens"] > 0


def test_a_coding_jobs_sandbox_run_is_a_span_of_its_test_step(traced: Traced,
                                                              standin: Any) -> None:
    standin.state.replies = {"Changed files:": FIX}
    key = traced.key
    with httpx.Client(base_url=traced.stack.api, timeout=30) as http:
        resp = http.post("/v1/jobs", headers=auth(key), json={
            "kind": "coding", "input": {"task": "Make add() return the sum.", "files": BUGGY,
                                        "test_command": "python -m pytest -q",
                                        "coder": "fixed"}})
        assert resp.status_code == 202, resp.text
        job_id = str(resp.json()["id"])
        job = wait_for_job(http, key, job_id, timeout=120)
    assert job["status"] == "completed", job
    assert job["result"]["passed"] is True
    t = _job_trace(traced, job_id, "job coding")
    by_id = _one_tree(t.spans, t.job_span_id)
    runs = [s for s in t.spans if s.name == "sandbox run"]
    assert len(runs) == 1
    run = runs[0]
    step = by_id[run.parent_span_id]
    assert step.name == "step tester"
    assert step.attributes["agentq.step.key"] == "test-1"
    assert step.parent_span_id == t.job_span_id
    assert step.start_ns <= run.start_ns <= run.end_ns <= step.end_ns
    assert run.kind == INTERNAL
    a = run.attributes
    assert a["agentq.sandbox.mode"] in MODES
    assert a["agentq.sandbox.exit_code"] == 0  # the fixed add() passes its test
    assert (a["agentq.sandbox.timed_out"], a["agentq.sandbox.cancelled"]) == (False, False)
    assert a["agentq.sandbox.limit"] == ""
    assert 0 < a["agentq.sandbox.duration_s"] <= (run.end_ns - run.start_ns) / 1e9
