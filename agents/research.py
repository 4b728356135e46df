"""Research jobs: plan into sub-questions, investigate each in parallel, synthesise a brief.

Prompts are laid out prefix-stable: the shared part (instructions and the question) comes first
and the per-step part last, so the model server's prefix cache serves a job's sub-agents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from agents.base import JobKind, StepContext, StepSpec
from agents.citations import renumber, section_citations, verify
from agents.corpus import corpus_exists, retrieve
from agents.registry import register
from core.db import session_scope
from core.errors import InvalidInput
from core.models import CorpusChunk
from core.settings import get_settings

# One sub-question: starts with a capital, ends with its question mark. Unbounded repetition keeps
# the grammar small (bounded `{8,120}` repeats make the server's regex compiler time out); the
# step's max_tokens bounds the length.
_ITEM = r'"[A-Z][^"\\\n?]{2,}\?"'

_PLAN_EXAMPLE_QUESTION = "How does a refrigerator keep food cold?"
_PLAN_EXAMPLE = [
    "What cycle does the refrigerant go through?",
    "How does the compressor move heat out of the cabinet?",
    "How is the temperature inside regulated?",
]


def plan_regex(min_items: int, max_items: int) -> str:
    """A compact JSON array of `min_items`..`max_items` questions."""
    return rf"\[{_ITEM}(, {_ITEM}){{{min_items - 1},{max_items - 1}}}\]"


def plan_prompt(query: str) -> str:
    # A fixed example first (shared by every job's planner, so it stays in the prefix cache),
    # then the question.
    return (
        "A research plan splits a question into focused sub-questions.\n\n"
        f"Question: {_PLAN_EXAMPLE_QUESTION}\n"
        f"Sub-questions: {json.dumps(_PLAN_EXAMPLE)}\n\n"
        f"Question: {query.strip()}\nSub-questions: "
    )


class ResearchInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=3, max_length=2000, description="The research question.",
                       examples=["How do honey bees make honey?"])
    max_subquestions: int | None = Field(default=None, ge=2, le=8,
                                         description="How many sub-questions to investigate.")
    corpus_id: str | None = Field(
        default=None, max_length=40,
        description="A corpus of this tenant (`POST /v1/corpora`): investigators answer from its "
                    "passages with numbered citations, and a verifier checks them. Without "
                    "one, the brief comes from the model's own knowledge.")
    passages_per_question: int = Field(default=4, ge=1, le=8,
                                       description="Passages retrieved per sub-question.")


class Section(BaseModel):
    question: str
    answer: str
    citations: list[Any] | None = Field(default=None, description="Citation numbers it uses.")


class Citation(BaseModel):
    n: int
    document: str | None
    document_id: str | None
    chunk: str
    snippet: str


class ResearchResult(BaseModel):
    answer: str | None
    sections: list[Section]
    plan_fallback: bool = False
    sources: str = Field(description="`corpus` or `model_knowledge`.")
    note: str | None = None
    corpus_id: str | None = None
    citations: list[Citation] | None = None
    verification: dict[str, Any] | None = Field(
        default=None, description="`verified`, `citations_checked`, `problems`, "
                                  "`unsupported_sentences`.")


SYNTHESIS_CUE = "Overall answer to the research question:"


def _shared_prefix(query: str) -> str:
    return (
        "The following is a research brief written by a careful analyst. Each section answers "
        "one sub-question in a short factual paragraph.\n\n"
        f"Research question: {query.strip()}\n\n"
    )


PASSAGE_CHARS = 700
NOTHING_FOUND = "No passage of the corpus answers this sub-question."


def _cited_prefix(query: str) -> str:
    return (
        "The following is a research brief written by a careful analyst from the numbered "
        "sources given. Each section answers one sub-question in a short factual paragraph "
        "and marks every claim with the number of its source, like [1] or [2].\n\n"
        f"Research question: {query.strip()}\n\n"
    )


def _snippet(text: str, width: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + "…"


def fallback_plan(query: str, n: int) -> list[str]:
    """A deterministic plan for when the model's plan is unusable."""
    q = query.strip().rstrip("?.! ")
    angles = [
        f"What is the background of: {q}?",
        f"What are the main facts and mechanisms behind: {q}?",
        f"What evidence or examples bear on: {q}?",
        f"What are the open questions or limits regarding: {q}?",
        f"What are the practical implications of: {q}?",
        f"How has understanding of this changed over time: {q}?",
        f"What do critics or alternative views say about: {q}?",
        f"What is the short answer to: {q}?",
    ]
    return angles[:n]


def parse_plan(text: str, n_max: int) -> list[str] | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    cleaned: list[str] = []
    for item in items:
        if not isinstance(item, str):
            return None
        s = re.sub(r"\s+", " ", item).strip()
        if len(s) >= 8 and s.lower() not in {c.lower() for c in cleaned} \
                and s not in _PLAN_EXAMPLE:
            cleaned.append(s)
    if len(cleaned) < 2:
        return None
    return cleaned[:n_max]


@register
class Research(JobKind):
    name = "research"
    input_model = ResearchInput
    result_model = ResearchResult
    phases = {"planner": "planning", "investigator": "investigating",
              "synthesiser": "synthesising", "verifier": "verifying"}

    def check(self, session: Session, tenant_id: str, job_input: BaseModel) -> None:
        assert isinstance(job_input, ResearchInput)
        if job_input.corpus_id and not corpus_exists(session, tenant_id, job_input.corpus_id):
            raise InvalidInput(f"input.corpus_id: this tenant has no corpus "
                               f"{job_input.corpus_id!r}")

    def _n(self, job_input: ResearchInput) -> int:
        return job_input.max_subquestions or get_settings().max_subquestions

    def initial_steps(self, job_input: BaseModel) -> list[StepSpec]:
        return [StepSpec(key="plan", role="planner",
                         max_tokens=get_settings().planner_max_tokens)]

    def expand(
        self, job_input: BaseModel, step_key: str, output: Mapping[str, Any]
    ) -> list[StepSpec]:
        if step_key != "plan":
            return []
        settings = get_settings()
        questions: list[str] = list(output["subquestions"])
        investigate = [
            StepSpec(key=f"investigate-{i + 1}", role="investigator",
                     max_tokens=settings.investigator_max_tokens, depends_on=("plan",),
                     input={"question": q})
            for i, q in enumerate(questions)
        ]
        synth = StepSpec(key="synthesise", role="synthesiser",
                         max_tokens=settings.synthesiser_max_tokens,
                         depends_on=tuple(s.key for s in investigate))
        assert isinstance(job_input, ResearchInput)
        if not job_input.corpus_id:
            return [*investigate, synth]
        # The verifier makes no model call; its budget is unused.
        check = StepSpec(key="verify", role="verifier", max_tokens=1,
                         depends_on=("synthesise",))
        return [*investigate, synth, check]

    def run_step(
        self,
        ctx: StepContext,
        job_input: BaseModel,
        role: str,
        step_input: Mapping[str, Any],
        deps: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        assert isinstance(job_input, ResearchInput)
        if role == "planner":
            return self._plan(ctx, job_input)
        if role == "investigator":
            return self._investigate(ctx, job_input, str(step_input["question"]))
        if role == "synthesiser":
            return self._synthesise(ctx, job_input, deps)
        if role == "verifier":
            return self._verify(job_input, deps["synthesise"])
        raise ValueError(f"research jobs have no role {role!r}")

    def _plan(self, ctx: StepContext, job_input: ResearchInput) -> dict[str, Any]:
        n = self._n(job_input)
        # A plan that does not parse is asked of the next larger model, where there is one.
        reply = ctx.complete(plan_prompt(job_input.query), regex=plan_regex(2, n),
                             validate=lambda text: parse_plan(text, n) is not None)
        questions = parse_plan(reply.text, n)
        if questions is None:
            return {"subquestions": fallback_plan(job_input.query, n), "fallback": True,
                    "raw": reply.text[:2000]}
        return {"subquestions": questions, "fallback": False}

    def _investigate(self, ctx: StepContext, job_input: ResearchInput,
                     question: str) -> dict[str, Any]:
        if job_input.corpus_id:
            return self._investigate_corpus(ctx, job_input, job_input.corpus_id, question)
        prompt = _shared_prefix(job_input.query) + f"Section: {question}\nAnswer:"
        reply = ctx.complete(prompt, stop=["\n"])
        return {"question": question, "answer": reply.text.strip(),
                "finish_reason": reply.finish_reason}

    def _investigate_corpus(self, ctx: StepContext, job_input: ResearchInput,
                            corpus_id: str, question: str) -> dict[str, Any]:
        with session_scope() as s:
            found = retrieve(s, corpus_id, question, k=job_input.passages_per_question)
        passages = [{"chunk_id": p.chunk_id, "document_id": p.document_id,
                     "document": p.document_title, "text": p.text[:PASSAGE_CHARS]}
                    for p in found]
        if not passages:
            return {"question": question, "answer": NOTHING_FOUND, "citations": [],
                    "retrieved": [], "passages": []}
        sources = "".join(f"[{i + 1}] {p['text']}\n" for i, p in enumerate(passages))
        prompt = (_cited_prefix(job_input.query) + f"Sources:\n{sources}\n"
                  f"Section: {question}\nAnswer:")
        reply = ctx.complete(prompt, stop=["\n"])
        answer = reply.text.strip()
        return {"question": question, "answer": answer,
                "citations": section_citations(answer, passages),
                "retrieved": [p["chunk_id"] for p in passages], "passages": passages,
                "finish_reason": reply.finish_reason}

    @staticmethod
    def _investigations(deps: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        keys = sorted((k for k in deps if k.startswith("investigate-")),
                      key=lambda k: int(k.rsplit("-", 1)[1]))
        return [deps[k] for k in keys]

    def _sections(self, deps: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{"question": d["question"], "answer": d["answer"],
                 **({"citations": d["citations"]} if "citations" in d else {})}
                for d in self._investigations(deps)]

    def _synthesise(self, ctx: StepContext, job_input: ResearchInput,
                    deps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        sections = self._sections(deps)
        cited = bool(job_input.corpus_id)
        citations: list[dict[str, Any]] = []
        if cited:
            sections, citations = renumber(sections)
            passages = {p["chunk_id"]: p for d in self._investigations(deps)
                        for p in d.get("passages", [])}
            for c in citations:
                p = passages.get(c["chunk_id"], {})
                c.update(document=p.get("document"), document_id=p.get("document_id"),
                         chunk=c["chunk_id"], snippet=_snippet(str(p.get("text", ""))))
        notes = "".join(f"Section: {s['question']}\nAnswer: {s['answer']}\n\n" for s in sections)
        prefix = _cited_prefix(job_input.query) if cited else _shared_prefix(job_input.query)
        prompt = prefix + notes + SYNTHESIS_CUE
        reply = ctx.complete(prompt, stop=["\n"])
        answer = reply.text.strip()
        # A model that says nothing still leaves the sections it was given.
        fallback = not answer
        if fallback:
            answer = " ".join(s["answer"] for s in sections if s["answer"])
        out: dict[str, Any] = {"answer": answer, "sections": sections,
                               "answer_fallback": fallback,
                               "finish_reason": reply.finish_reason}
        if cited:
            out["citations"] = citations
            out["retrieved_by_section"] = [list(d.get("retrieved", []))
                                           for d in self._investigations(deps)]
        return out

    def _verify(self, job_input: ResearchInput, synth: Mapping[str, Any]) -> dict[str, Any]:
        citations = list(synth.get("citations", []))
        ids = {str(c["chunk_id"]) for c in citations}
        with session_scope() as s:
            chunks = {cid: text for cid, text in s.execute(
                select(CorpusChunk.id, CorpusChunk.text).where(
                    CorpusChunk.id.in_(ids), CorpusChunk.corpus_id == job_input.corpus_id))
            } if ids else {}
        return verify(synth["sections"], citations, synth.get("retrieved_by_section", []),
                      chunks, answer=str(synth.get("answer", "")))

    def result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        assert isinstance(job_input, ResearchInput)
        synth = outputs["synthesise"]
        out: dict[str, Any] = {
            "answer": synth["answer"],
            "sections": synth["sections"],
            "plan_fallback": bool(outputs.get("plan", {}).get("fallback", False)),
        }
        if job_input.corpus_id:
            out.update(
                sources="corpus", corpus_id=job_input.corpus_id,
                citations=[{k: c.get(k) for k in ("n", "document", "document_id", "chunk",
                                                  "snippet")}
                           for c in synth.get("citations", [])],
                verification=dict(outputs.get("verify", {})))
        else:
            out.update(sources="model_knowledge",
                       note="Written from the model's own knowledge; no corpus was searched.")
        return out

    def partial_result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        assert isinstance(job_input, ResearchInput)
        sections = self._sections(outputs)
        return {"partial": True, "answer": None, "sections": sections,
                "sources": "corpus" if job_input.corpus_id else "model_knowledge"}
