"""Deep research against the stand-in, through real Celery workers: citations by construction,
the gap analysis with follow-up investigators and the critique-and-revise pass at high effort,
and `output_schema`."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from agents.research import SYNTHESIS_CUE, ResearchResult
from agents.research.extract import EXTRACT_CUE
from agents.research.plan import FOLLOWUP_CUE
from agents.research.synthesis import REVISION_CUE
from tests.helpers import auth, wait_for_job
from tests.test_research_corpus import DOCUMENTS, PLAN

pytestmark = pytest.mark.usefixtures("worker")

# The model never writes a `[n]` marker, nor a passage number.
FINDINGS = ("Honey bees make honey from flower nectar. Worker bees evaporate the water of the "
            "nectar by fanning their wings.")
SUMMARY = "Honey bees make honey from flower nectar."


@pytest.fixture
def corpus(client: TestClient, tenant_key: str) -> str:
    cid = str(client.post("/v1/corpora", json={"name": "nature"},
                          headers=auth(tenant_key)).json()["id"])
    for name, text in DOCUMENTS.items():
        resp = client.post(f"/v1/corpora/{cid}/documents", headers=auth(tenant_key),
                           files={"file": (name, text.encode(), "text/plain")})
        assert resp.status_code in (200, 201), resp.text
    return cid


def research(client: TestClient, key: str, standin: Any, corpus_id: str | None,
             replies: dict[str, str], **extra: Any) -> dict[str, Any]:
    standin.state.plan_text = json.dumps(PLAN)
    standin.state.replies = {"Sources:": FINDINGS, SYNTHESIS_CUE: SUMMARY, **replies}
    body: dict[str, Any] = {"query": "How do bees make and keep honey?", "max_subquestions": 2,
                            **extra}
    if corpus_id:
        body["corpus_id"] = corpus_id
    resp = client.post("/v1/jobs", headers=auth(key), json={"kind": "research", "input": body})
    assert resp.status_code == 202, resp.text
    return wait_for_job(client, key, resp.json()["id"], timeout=90)


def steps_of(client: TestClient, key: str, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    data = client.get(f"/v1/jobs/{job['id']}/steps", headers=auth(key)).json()["data"]
    return {s["key"]: s for s in data}


def test_citations_come_with_every_sentence_though_the_model_writes_no_marker(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    job = research(client, tenant_key, standin, corpus, {})
    assert job["status"] == "completed", job
    result = job["result"]
    ResearchResult.model_validate(result)
    # The model's paragraphs were asked for as structured output: sentences with passages.
    asked = [b for b in standin.state.bodies if '"sentences"' in json.dumps(b)]
    assert asked
    for section in result["sections"]:
        assert section["sentences"], section
        for sentence in section["sentences"]:
            assert sentence["citations"], sentence
            assert sentence["how"] == "overlap", sentence
        assert "[1]" in section["answer"]  # rendered from the structure
    assert result["citations"][0]["document"] == "bees"
    assert all(s["citations"] for s in result["sections"])
    assert "[1]" in result["answer"]
    check = result["verification"]
    assert check["verified"] is True, check
    assert check["citations_checked"] >= 5  # two sentences in each section, and the answer
    brief = result["brief"]
    assert brief.startswith("# How do bees make and keep honey?")
    assert all(f"## {q}" in brief for q in PLAN)
    assert "followups" not in result
    assert "critique" not in result


def test_high_effort_adds_follow_ups_and_a_critique_and_revision(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    followup = "Where do bees keep the honey they make?"
    revised = "Worker bees store the honey in wax cells sealed with a cap of wax."
    job = research(client, tenant_key, standin, corpus, {
        "Sources:": FINDINGS + " The queen lives for decades.",
        FOLLOWUP_CUE: json.dumps([followup]), REVISION_CUE: revised}, effort="high")
    assert job["status"] == "completed", job
    result = job["result"]
    steps = steps_of(client, tenant_key, job)
    assert list(steps) == ["plan", "investigate-1", "investigate-2", "gaps", "followup-1",
                           "synthesise", "critique", "revise", "verify"]
    assert {s["status"] for s in steps.values()} == {"completed"}
    assert steps["gaps"]["role"] == "gap_analyst"
    assert set(steps["gaps"]["depends_on"]) == {"investigate-1", "investigate-2"}
    # The synthesis waited for the follow-up investigator.
    assert "followup-1" in steps["synthesise"]["depends_on"]
    assert steps["synthesise"]["started_at"] >= steps["followup-1"]["finished_at"]
    assert result["followups"] == [followup]
    assert [s["question"] for s in result["sections"]] == [*PLAN, followup]
    # The critique named the claim no passage supports; the revision rewrote those sections.
    named = [p for p in result["critique"] if p.get("sentence") == "The queen lives for decades."]
    assert {p["section"] for p in named} == {1, 2, 3}
    for section in result["sections"]:
        assert "queen" not in section["answer"]
        assert section["sentences"][0]["text"] == revised
        assert section["sentences"][0]["citations"]
    assert result["verification"]["verified"] is True, result["verification"]
    assert job["progress"]["steps_total"] == 9


SCHEMA = {"type": "object", "required": ["summary", "count"],
          "properties": {"summary": {"type": "string"},
                         "count": {"type": "integer", "minimum": 1}}}


def _field(value: Any, citations: list[int] | None = None, confidence: float = 0.7
           ) -> dict[str, Any]:
    return {"value": value, "citations": citations or [], "confidence": confidence}


def test_output_schema_gives_a_valid_object_with_citations_and_confidence(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    answer = {"summary": _field(SUMMARY), "count": _field(2, [1], 0.5)}
    job = research(client, tenant_key, standin, corpus, {EXTRACT_CUE: json.dumps(answer)},
                   output_schema=SCHEMA)
    assert job["status"] == "completed", job
    result = job["result"]
    jsonschema.validate(result["output"], SCHEMA)
    assert result["output"] == {"summary": SUMMARY, "count": 2}
    fields = result["output_fields"]
    assert fields["count"] == {"citations": [1], "confidence": 0.5}
    # The model named no source for the summary: the passage that says it is found.
    assert fields["summary"]["citations"] == [1]
    assert "output_error" not in result
    assert list(steps_of(client, tenant_key, job))[-1] == "extract"


def test_an_invalid_object_is_repaired_with_the_validation_error(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    bad = {"summary": _field(SUMMARY), "count": _field(0)}
    good = {"summary": _field(SUMMARY), "count": _field(3)}
    standin.state.scripts = {EXTRACT_CUE: [json.dumps(bad), json.dumps(good)]}
    job = research(client, tenant_key, standin, corpus, {}, output_schema=SCHEMA)
    assert job["status"] == "completed", job
    assert job["result"]["output"] == {"summary": SUMMARY, "count": 3}
    asked = [b for b in standin.state.bodies if EXTRACT_CUE in json.dumps(b)]
    assert len(asked) == 2
    assert "A previous answer was not valid: count: 0 is less than the minimum of 1" \
        in json.dumps(asked[1])


def test_an_object_that_cannot_be_made_valid_is_never_returned_and_the_job_says_why(
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    bad = {"summary": _field(SUMMARY), "count": _field(0)}
    job = research(client, tenant_key, standin, corpus, {EXTRACT_CUE: json.dumps(bad)},
                   output_schema=SCHEMA)
    assert job["status"] == "completed", job
    result = job["result"]
    assert "output" not in result
    assert "output_fields" not in result
    assert "no object valid against output_schema" in result["output_error"]
    assert "count: 0 is less than the minimum of 1" in result["output_error"]
    assert result["verification"]["verified"] is True  # the brief itself stands


def test_output_schema_without_a_corpus(client: TestClient, tenant_key: str,
                                        standin: Any) -> None:
    answer = {"summary": _field("Bees make honey."), "count": _field(1)}
    job = research(client, tenant_key, standin, None, {EXTRACT_CUE: json.dumps(answer)},
                   output_schema=SCHEMA)
    assert job["status"] == "completed", job
    assert job["result"]["output"] == {"summary": "Bees make honey.", "count": 1}
    assert job["result"]["output_fields"]["summary"]["citations"] == []
    assert job["result"]["sources"] == "model_knowledge"


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "object", "properties": {"a": {"type": "strng"}}}, "not a valid JSON Schema"),
    ({"type": "string"}, "must describe an object"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}},
     "only references within the schema"),
    ({"type": "object", "properties": {f"f{i}": {"type": "string", "description": "x" * 600}
                                       for i in range(30)}}, "bytes as JSON"),
])
def test_an_unusable_output_schema_is_refused_at_submission(
        client: TestClient, tenant_key: str, schema: dict[str, Any], says: str) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "How do bees make honey?",
                                      "output_schema": schema}})
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert "output_schema" in message, message
    assert says in message, message
