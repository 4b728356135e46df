"""End to end through every real component: vLLM servers with the embedded model, the API under
uvicorn, a Celery worker process, Redis, and the embedded SQLite database."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import Platform, VllmServer, make_corpus, wait_for_job
from tests.helpers import TERMINAL, auth, metric

pytestmark = pytest.mark.e2e


def _counted(servers: list[VllmServer], name: str) -> float:
    return sum(metric(s.url, name) for s in servers)


def test_research_job_on_a_real_vllm_server(vllm_servers: list[VllmServer],
                                            platform: Platform) -> None:
    api, key, db_url = platform.api, platform.key, platform.db_url
    prompt_before = _counted(vllm_servers, "vllm:prompt_tokens_total")
    gen_before = _counted(vllm_servers, "vllm:generation_tokens_total")
    with httpx.Client(base_url=api, headers=auth(key), timeout=30) as http:
        assert http.get("/readyz").status_code == 200
        resp = http.post("/v1/jobs", json={
            "kind": "research", "input": {"query": "How do honey bees make honey?",
                                          "max_subquestions": 3},
            "budget": {"max_total_tokens": 20000}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        seen_running_usage = False
        deadline = time.monotonic() + 600
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["usage"]["model_calls"] > 0:
                seen_running_usage = True
            if job["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "completed", job
        assert job["result"]["answer"]
        assert 2 <= len(job["result"]["sections"]) <= 3
        steps = http.get(f"/v1/jobs/{job_id}/steps").json()["data"]
    assert {s["status"] for s in steps} == {"completed"}
    assert all(s["model"] == "gemma-3-270m" for s in steps)
    assert seen_running_usage or job["usage"]["model_calls"] > 0

    # The tokens agentq recorded equal what the server counted.
    prompt_delta = _counted(vllm_servers, "vllm:prompt_tokens_total") - prompt_before
    gen_delta = _counted(vllm_servers, "vllm:generation_tokens_total") - gen_before
    engine = create_engine(db_url)
    with engine.connect() as conn:
        prompt, completion, calls = conn.execute(text(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens), COUNT(*) FROM model_calls "
            "WHERE job_id = :j"), {"j": job_id}).one()
    engine.dispose()
    assert calls == job["usage"]["model_calls"] >= len(steps)
    assert prompt == job["usage"]["prompt_tokens"] == prompt_delta
    assert completion == job["usage"]["completion_tokens"] == gen_delta
    assert Path(db_url.removeprefix("sqlite:///")).exists()


CORPUS = {
    "bees.txt": "Honey bees make honey from flower nectar. Worker bees carry the nectar to the "
                "hive, where they evaporate its water by fanning their wings and store it in "
                "wax cells sealed with a cap of wax.",
    "wax.txt": "Beeswax is made by young worker bees from glands on their abdomen. They build "
               "the hexagonal cells of the comb with it; the cells hold honey, pollen and the "
               "brood.",
}


def test_research_over_a_corpus_cites_every_section_on_a_real_vllm_server(
        platform: Platform) -> None:
    """The base model never has to write a `[n]` marker: its paragraphs are structured output
    (sentences with the passages they rest on), checked and attributed; the brief is rendered
    from that structure and the verifier checks every citation."""
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        corpus_id = make_corpus(http, "bees-cited", CORPUS)
        resp = http.post("/v1/jobs", json={"kind": "research", "input": {
            "query": "How do bees make and keep honey?", "max_subquestions": 2,
            "corpus_id": corpus_id, "effort": "medium"}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        job = wait_for_job(http, job_id, 900)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["sources"] == "corpus"
    assert len(result["sections"]) == 2
    citations = {c["n"]: c for c in result["citations"]}
    assert citations, result
    assert {c["document"] for c in citations.values()} <= {"bees", "wax"}
    for section in result["sections"]:
        cited = [n for s in section["sentences"] for n in s["citations"]]
        assert cited, section  # every section rests on passages of the corpus
        assert set(cited) <= set(citations)
        assert all(f"[{n}]" in section["answer"] for n in cited)
    check = result["verification"]
    assert check["citations_checked"] >= len(result["sections"])
    # Every citation points at a chunk of the corpus its section retrieved (by construction);
    # sentences the passages do not support are flagged, not hidden.
    assert check["problems"] == [], check
    assert check["verified"] is (not check["unsupported_sentences"])
    assert all(f"## {s['question']}" in result["brief"] for s in result["sections"])


def test_coding_job_mechanics_on_a_real_vllm_server(platform: Platform) -> None:
    """The fixed coder (plan, write, test; the agent loop has its own test): the small model
    rarely writes passing code; what is checked here is the round: the model was asked, its
    answer handled, the tests ran in the sandbox and the report was kept."""
    files = {"calc.py": "def add(a, b):\n    return a - b\n",
             "test_calc.py": "from calc import add\n\n\ndef test_add():\n"
                             "    assert add(2, 3) == 5\n"}
    with httpx.Client(base_url=platform.api, headers=auth(platform.key), timeout=30) as http:
        resp = http.post("/v1/jobs", json={
            "kind": "coding", "input": {"task": "Make add() return the sum of a and b.",
                                        "files": files, "max_rounds": 1, "coder": "fixed"},
            "budget": {"step_max_tokens": {"planner": 48, "coder": 160}}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        job = wait_for_job(http, job_id, 600)
        steps = http.get(f"/v1/jobs/{job_id}/steps").json()["data"]
    assert job["status"] == "completed", job
    result = job["result"]
    assert [s["key"] for s in steps] == ["plan", "write-1", "test-1"]
    assert all(s["status"] == "completed" for s in steps)
    assert result["rounds"] == 1
    assert "passed" in result["test_report"] or "failed" in result["test_report"]
    assert result["passed"] is (result["exit_code"] == 0)
    assert job["usage"]["model_calls"] >= 2  # the planner and the coder asked the model
