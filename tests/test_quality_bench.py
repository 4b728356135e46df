"""The quality bench: its scoring on fixed inputs, its fixtures, and a tiny run of the whole
harness through the API against the stand-in model (one question, one effort, one task)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.quality.client import Platform
from bench.quality.fixtures import (
    Fact,
    coding_tasks,
    corpus_documents,
    questions,
)
from bench.quality.harness import Options, render, run_all
from bench.quality.report import economics_verdict
from bench.quality.scoring import brief_text, citation_score, facts_found, recall

FACTS = (Fact("founder", "Talvane"), Fact("year", "1742"), Fact("arches", r"\b(seven|7)\b"))


def test_recall_counts_the_facts_the_text_states() -> None:
    found = facts_found("Velmora was founded by idris TALVANE on seven hills.", FACTS)
    assert found == [True, False, True]
    assert recall(found) == pytest.approx(2 / 3)
    assert recall([]) is None
    assert facts_found("It has 17 arches.", FACTS)[2] is False  # whole words only


def test_the_brief_is_the_platforms_own_words_not_the_passages_it_quotes() -> None:
    result = {"answer": "Founded in 1742.",
              "sections": [{"question": "Who was Talvane?", "answer": "A cartographer [1].",
                            "citations": [1]}],
              "citations": [{"n": 1, "snippet": "Idris Talvane founded it", "document": "x"}],
              "structured": {"founder": {"value": "Idris Talvane"}}}
    text = brief_text(result)
    assert "1742" in text
    assert "cartographer" in text
    assert "Who was" not in text
    assert "founded it" not in text
    assert "Idris Talvane" in text  # a structured output's fields are the brief's words too
    assert brief_text(None) == ""


def test_citation_precision_by_document_id_or_else_by_title() -> None:
    cites: list[dict[str, Any]] = [{"n": 1, "document_id": "doc_a", "document": "A"},
             {"n": 2, "document_id": "doc_b", "document": "A"},  # the id decides
             {"n": 3, "document_id": None, "document": "A"},
             {"n": 4, "document_id": None, "document": None}]
    score = citation_score(cites, {"doc_a"}, {"A"})
    assert (score.total, score.correct) == (4, 2)
    assert score.precision == 0.5
    assert citation_score([], {"doc_a"}, {"A"}).precision is None
    assert citation_score(None, set(), set()).total == 0


def test_the_fixtures_hold_what_their_questions_expect() -> None:
    docs = corpus_documents()
    qs = questions()
    assert len(docs) >= 8
    assert len(qs) >= 12
    assert len({q.id for q in qs}) == len(qs)
    for q in qs:
        assert 1 <= len(q.documents) <= 2, q.id
        text = "\n".join(docs[d] for d in q.documents)
        assert all(facts_found(text, q.facts)), q.id  # every fact is in its documents
        assert not all(facts_found(q.question, q.facts)), q.id  # and not in the question
    tasks = coding_tasks()
    assert len(tasks) >= 10
    for t in tasks:
        assert t.task
        assert t.test_command
        assert any(p.startswith("test_") for p in t.files), t.name


def test_the_economics_verdict_says_whether_the_target_is_met() -> None:
    base: dict[str, Any] = {"naive_tokens": 1000, "medium_tokens": 300, "naive_cost": 1.0}
    met = economics_verdict(one_size=False, naive_recall=0.5, medium_recall=0.6,
                            medium_cost=0.4, **base)
    assert "MET: recall 60 % vs naive 50 % (reached); cost ratio 0.40 (within 0.40)" in met
    assert "NOT MET" not in met
    dear = economics_verdict(one_size=False, naive_recall=0.5, medium_recall=0.6,
                             medium_cost=0.41, **base)
    assert "NOT MET" in dear
    assert "cost ratio 0.41 (over 0.40)" in dear
    short = economics_verdict(one_size=False, naive_recall=0.5, medium_recall=0.4,
                              medium_cost=0.1, **base)
    assert "NOT MET: recall 40 % vs naive 50 % (not reached)" in short
    assert "NOT MET" in economics_verdict(one_size=False, naive_recall=None,
                                          medium_recall=None, medium_cost=0.1, **base)
    one = economics_verdict(one_size=True, naive_recall=0.5, medium_recall=0.5,
                            medium_cost=5.0, **base)
    assert one == ("Economics (one size class, no cost target): medium used 0.30x naive's "
                   "tokens (fewer tokens); recall 50 % vs naive 50 % (reached).")


FIX = "=== FILE: calc.py ===\ndef add(a, b):\n    return a + b\n=== END FILE ===\n"


@pytest.mark.usefixtures("worker")
def test_the_harness_runs_end_to_end_through_the_api(api_server: str, tenant_key: str,
                                                     standin: Any) -> None:
    from core.settings import Settings

    first = questions()[0]
    assert first.id == "q01"
    standin.state.replies = {
        "Sub-question:": "Velmora was founded in 1742 by the cartographer Idris Talvane.",
        "Use only the documents above.": "Idris Talvane founded Velmora in 1742.",
        "Changed files:": FIX,
    }
    # The coding loop (the default coder): write the fix, run the tests; they pass.
    standin.state.scripts = {"Fix add() so that": [
        json.dumps({"tool": "write_file", "arguments": {
            "path": "calc.py", "content": "def add(a, b):\n    return a + b\n"}}),
        json.dumps({"tool": "run_tests", "arguments": {}})]}
    platform = Platform(api_server, tenant_key, job_timeout_s=60)
    try:
        results = run_all(platform, Settings(), Options(
            efforts=["low", "medium"], questions=1, coding_tasks=1, candidates=(1, 3)))
    finally:
        platform.close()

    low, medium = results.efforts
    assert medium.label == "medium"
    assert medium.completed == 1
    assert low.label == "low"
    assert low.jobs == 1
    assert low.completed == 1
    assert low.recall == 1.0
    run = low.runs[0].run
    assert run.tokens() > 0
    assert run.calls() >= 3
    assert run.wall_s > 0
    assert low.precision is None or 0 <= low.precision <= 1

    naive = results.naive
    assert naive is not None
    assert naive.errors == 0
    assert naive.recall == 1.0
    assert naive.total_tokens > 0
    assert naive.total_cost > 0
    assert naive.models_in_catalogue == 1
    # The naive prompt holds the whole corpus, under a fresh reference line each time.
    sent = [b for b in standin.state.bodies if "Use only the documents" in str(b.get("prompt"))]
    assert len(sent) == 1
    assert all(name in sent[0]["prompt"] for name in corpus_documents())

    one, three = results.coding
    assert (one.candidates, one.tasks, one.solved) == (1, 1, 1)
    assert one.tokens_per_solved is not None
    assert one.tokens_per_solved > 0
    assert three.unavailable is None, three.unavailable  # three candidates really ran
    assert (three.candidates, three.tasks, three.solved) == (3, 1, 1)

    printed = render(results)
    print(printed)
    for heading in ("Research over the corpus", "Economics", "Coding"):
        assert heading in printed
    assert "one size class" in printed
    # With one size class the verdict compares tokens and recall, stated plainly.
    ratio = medium.total_tokens / naive.total_tokens
    verdict = next(line for line in printed.splitlines() if "Economics (one size" in line)
    assert f"medium used {ratio:.2f}x naive's tokens" in verdict
    assert f"recall {100 * (medium.recall or 0):.0f} % vs naive 100 %" in verdict
