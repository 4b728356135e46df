"""Research over a corpus: investigators answer from retrieved passages with numbered
citations, the synthesiser keeps them, and a verifier checks each one."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agents.citations import renumber, section_citations, verify
from agents.research import SYNTHESIS_CUE, ResearchResult
from tests.helpers import auth, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")

DOCUMENTS = {
    "bees.txt": "Honey bees make honey from flower nectar. Worker bees carry the nectar to the "
                "hive, where they evaporate its water by fanning their wings and store it in "
                "wax cells sealed with a cap of wax.",
    "volcanoes.txt": "Volcanoes erupt when magma rises through the crust. Pressure from "
                     "dissolved gases drives lava, ash and rock out of the vent.",
    "tides.txt": "Tides are caused by the gravity of the Moon and the Sun pulling on the "
                 "oceans. Most coasts see two high tides and two low tides each day.",
}
PLAN = ["How do honey bees make honey from nectar?", "Where do bees store their honey?"]


@pytest.fixture
def corpus(client: TestClient, tenant_key: str) -> str:
    cid = str(client.post("/v1/corpora", json={"name": "nature"},
                          headers=auth(tenant_key)).json()["id"])
    for name, text in DOCUMENTS.items():
        resp = client.post(f"/v1/corpora/{cid}/documents", headers=auth(tenant_key),
                           files={"file": (name, text.encode(), "text/plain")})
        assert resp.status_code in (200, 201), resp.text
    return cid


def run(client: TestClient, key: str, standin: Any, corpus_id: str, answer: str
        ) -> dict[str, Any]:
    standin.state.plan_text = json.dumps(PLAN)
    standin.state.replies = {"Sources:": answer,
                             SYNTHESIS_CUE: "Honey bees make honey from flower nectar [1]."}
    resp = client.post("/v1/jobs", headers=auth(key), json={
        "kind": "research", "input": {"query": "How do bees make and keep honey?",
                                      "max_subquestions": 2, "corpus_id": corpus_id}})
    assert resp.status_code == 202, resp.text
    return wait_for_job(client, key, resp.json()["id"], timeout=60)


def test_a_cited_brief_from_a_corpus_is_verified(client: TestClient, tenant_key: str,
                                                  standin: Any, corpus: str) -> None:
    job = run(client, tenant_key, standin, corpus,
              "Honey bees make honey from flower nectar [1].")
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["sources"] == "corpus"
    assert result["citations"]
    first = result["citations"][0]
    assert first["n"] == 1
    assert first["document"] == "bees"  # the title: the file name without its extension
    assert "nectar" in first["snippet"]
    assert first["chunk"]
    assert "[1]" in result["sections"][0]["answer"]
    assert result["verification"]["verified"] is True, result["verification"]
    assert result["verification"]["citations_checked"] >= 2
    steps = client.get(f"/v1/jobs/{job['id']}/steps", headers=auth(tenant_key)).json()["data"]
    assert steps[-1]["key"] == "verify"
    ResearchResult.model_validate(result)  # the result has the declared shape


def test_a_number_that_names_no_passage_never_reaches_the_brief_and_claims_without_support_are_flagged(  # noqa: E501
        client: TestClient, tenant_key: str, standin: Any, corpus: str) -> None:
    job = run(client, tenant_key, standin, corpus,
              "Honey bees make honey from flower nectar [1]. Bees also make wax [9]. "
              "The queen lives for decades.")
    assert job["status"] == "completed", job
    result = job["result"]
    first = result["sections"][0]
    assert "[9]" not in first["answer"]
    assert "[?" not in first["answer"]
    wax = next(s for s in first["sentences"] if "wax" in s["text"])
    assert wax["how"] == "overlap"  # attributed to the passage that says it
    assert result["citations"][wax["citations"][0] - 1]["document"] == "bees"
    check = result["verification"]
    assert check["verified"] is False
    assert not check["problems"]
    assert {(u["where"], u["sentence"], u["reason"]) for u in check["unsupported_sentences"]} \
        >= {("section 1", "The queen lives for decades.", "cites no source")}


def test_a_corpus_of_another_tenant_is_refused(client: TestClient, corpus: str) -> None:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        other, _ = create_key(s, "someone-else-research")
    resp = client.post("/v1/jobs", headers=auth(other), json={
        "kind": "research", "input": {"query": "How do bees make honey?", "corpus_id": corpus}})
    assert resp.status_code == 422
    assert "corpus_id" in resp.json()["error"]["message"]


def test_without_a_corpus_the_brief_says_where_it_comes_from(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "How do tides work?", "max_subquestions": 2}})
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["result"]["sources"] == "model_knowledge"
    assert "own knowledge" in job["result"]["note"]
    assert "citations" not in job["result"]


# -- the verifier on its own --------------------------------------------------------------------

RETRIEVED = [{"chunk_id": "chk_a", "text": "Honey bees make honey from flower nectar."},
             {"chunk_id": "chk_b", "text": "Bees store honey in wax cells."}]
CHUNKS = {"chk_a": RETRIEVED[0]["text"], "chk_b": RETRIEVED[1]["text"],
          "chk_c": "Volcanoes erupt when magma rises."}


def _brief(*answers: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    sections = [{"question": f"q{i}", "answer": a,
                 "citations": section_citations(a, RETRIEVED)} for i, a in enumerate(answers)]
    return renumber(sections)


def test_verify_accepts_supported_citations() -> None:
    sections, citations = _brief("Honey bees make honey from flower nectar [1].",
                                 "Bees store honey in wax cells [2].")
    report = verify(sections, citations, [["chk_a", "chk_b"], ["chk_a", "chk_b"]], CHUNKS)
    assert report["verified"] is True, report
    assert report["citations_checked"] == 2


def test_verify_catches_planted_bad_citations() -> None:
    sections, citations = _brief("Honey bees make honey from flower nectar [1].",
                                 "Bees store honey in wax cells [2].")
    # A chunk that does not exist, and one the section's investigator never retrieved.
    planted = [dict(c) for c in citations]
    planted[1]["chunk_id"] = "chk_forged"
    report = verify(sections, planted, [["chk_a"], ["chk_a", "chk_b"]], CHUNKS)
    problems = {p["problem"] for p in report["problems"]}
    assert "the cited chunk does not exist in the corpus" in problems
    sections2, citations2 = _brief("Honey bees make honey from flower nectar [1].")
    citations2[0]["chunk_id"] = "chk_c"
    report2 = verify(sections2, citations2, [["chk_a"]], CHUNKS)
    assert any("not among the passages" in p["problem"] for p in report2["problems"])


def test_verify_flags_sentences_without_support() -> None:
    sections, citations = _brief(
        "Honey bees make honey from flower nectar [1]. The queen lives for decades.",
        "Volcanic eruptions shape mountains quickly [2].")
    report = verify(sections, citations, [["chk_a", "chk_b"], ["chk_a", "chk_b"]], CHUNKS)
    reasons = {(u["where"], u["reason"]) for u in report["unsupported_sentences"]}
    assert ("section 1", "cites no source") in reasons
    assert ("section 2", "the cited sources do not support it") in reasons
    assert report["verified"] is False
