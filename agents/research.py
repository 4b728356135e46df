"""Research jobs: plan into sub-questions, investigate each in parallel, synthesise a brief;
over a corpus, investigators are agent loops (`agents.investigator`) that search, read and cite
passages, and a verifier checks the citations.

`effort` sets how many sub-questions there are and, over a corpus, each investigator's turn
limit and step budget (`EFFORTS`). Without a corpus an investigator has no tool to use and
answers in one call.

Prompts are laid out prefix-stable: the shared part (instructions and the question) comes first
and the per-step part last, so the model server's prefix cache serves a job's sub-agents.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from agents.base import (
    AgentError,
    CallSpec,
    JobKind,
    Role,
    StepContext,
    StepOutputs,
    StepSpec,
    SubmissionContext,
)
from agents.citations import renumber, section_citations, verify
from agents.investigator import investigate
from agents.loop import turn_limit
from core.errors import InvalidInput
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


Effort = Literal["low", "medium", "high", "max"]


@dataclass(frozen=True)
class EffortLevel:
    """What an effort level buys. `subquestions` None: `AGENTQ_MAX_SUBQUESTIONS`. Over a corpus:
    each investigator's turn limit and step budget (the tokens of all its calls), and the
    job's budget when the request sets none."""

    subquestions: int | None
    turns: int
    step_tokens: int
    job_tokens: int | None  # None: `AGENTQ_DEFAULT_JOB_MAX_TOTAL_TOKENS`


EFFORTS: dict[str, EffortLevel] = {
    "low": EffortLevel(subquestions=3, turns=1, step_tokens=6_000, job_tokens=None),
    "medium": EffortLevel(subquestions=None, turns=4, step_tokens=16_000, job_tokens=80_000),
    "high": EffortLevel(subquestions=6, turns=8, step_tokens=32_000, job_tokens=240_000),
    "max": EffortLevel(subquestions=8, turns=12, step_tokens=64_000, job_tokens=600_000),
}


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
                                       description="Passages retrieved per search.")
    effort: Effort = Field(
        default="medium",
        description="How hard to work: the number of sub-questions and, over a corpus, each "
                    "investigator's turns and step budget (low: 3 sub-questions, one call "
                    "each; medium: 4, up to 4 turns; high: 6, up to 8; max: 8, up to 12).")


class _Compact(BaseModel):
    """A model whose JSON leaves out the fields named in `_omit_none` while they are None."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self._omit_none}


class Section(_Compact):
    _omit_none = frozenset({"citations"})

    question: str
    answer: str
    citations: list[int] | None = Field(default=None, description="Citation numbers it uses.")


class Citation(BaseModel):
    n: int
    document: str | None
    document_id: str | None
    chunk: str
    snippet: str


class CitationProblem(_Compact):
    _omit_none = frozenset({"chunk"})

    where: str
    citation: int | str
    chunk: str | None = None
    problem: str


class UnsupportedSentence(BaseModel):
    where: str
    sentence: str
    reason: str


# --- Step outputs ------------------------------------------------------------------------------

class PlanOutput(BaseModel):
    subquestions: list[str]
    fallback: bool = False
    raw: str | None = Field(default=None, description="The model's unusable plan.")


class SourcePassage(BaseModel):
    """A passage given to an investigator; its number is its position, from 1."""

    chunk_id: str
    document_id: str
    document: str
    text: str


class SectionCitation(BaseModel):
    n: int
    chunk_id: str | None = Field(description="None: the number names no passage given.")


class InvestigationOutput(BaseModel):
    question: str
    answer: str
    finish_reason: str | None = None
    # Over a corpus only: the citations in the answer and the passages retrieved.
    citations: list[SectionCitation] | None = None
    retrieved: list[str] = Field(default_factory=list)
    passages: list[SourcePassage] = Field(default_factory=list)
    # Over a corpus, the agent loop: the chunks its answer says it rests on, its turns, why
    # it stopped (`answered`, `turn_limit`, `step_budget`, `job_budget`) and whether its
    # answer is the fallback (no answer of the model fitted).
    rests_on: list[str] = Field(default_factory=list)
    turns: int | None = None
    stopped: str | None = None
    fallback: bool = False


class SynthesisOutput(BaseModel):
    answer: str
    sections: list[Section]
    answer_fallback: bool = False
    finish_reason: str | None = None
    # Over a corpus only: the brief's citations and, per section, the chunks retrieved for it.
    citations: list[Citation] | None = None
    retrieved_by_section: list[list[str]] | None = None


class VerificationOutput(BaseModel):
    verified: bool
    citations_checked: int
    problems: list[CitationProblem]
    unsupported_sentences: list[UnsupportedSentence]


class ResearchResult(_Compact):
    _omit_none = frozenset({"note", "corpus_id", "citations", "verification"})

    answer: str | None
    sections: list[Section]
    plan_fallback: bool = False
    sources: str = Field(description="`corpus` or `model_knowledge`.")
    note: str | None = None
    corpus_id: str | None = None
    citations: list[Citation] | None = None
    verification: VerificationOutput | None = None


PLANNER = Role("planner", PlanOutput, "planning")
INVESTIGATOR = Role("investigator", InvestigationOutput, "investigating")
SYNTHESISER = Role("synthesiser", SynthesisOutput, "synthesising")
VERIFIER = Role("verifier", VerificationOutput, "verifying")


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


def _step_number(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def _investigations(outputs: StepOutputs) -> list[InvestigationOutput]:
    """The finished investigations, in the order of the plan."""
    found = sorted(outputs.items(INVESTIGATOR), key=lambda item: _step_number(item[0]))
    return [out for _, out in found]


class Research(JobKind[ResearchInput, ResearchResult]):
    name = "research"
    input_model = ResearchInput
    result_model = ResearchResult
    roles = (PLANNER, INVESTIGATOR, SYNTHESISER, VERIFIER)

    def check(self, ctx: SubmissionContext, job_input: ResearchInput) -> None:
        if job_input.corpus_id and not ctx.corpus_exists(job_input.corpus_id):
            raise InvalidInput(f"input.corpus_id: this tenant has no corpus "
                               f"{job_input.corpus_id!r}")

    def _n(self, job_input: ResearchInput) -> int:
        return (job_input.max_subquestions or EFFORTS[job_input.effort].subquestions
                or get_settings().max_subquestions)

    def default_max_total_tokens(self, job_input: ResearchInput) -> int | None:
        return EFFORTS[job_input.effort].job_tokens if job_input.corpus_id else None

    def initial_steps(self, job_input: ResearchInput) -> list[StepSpec]:
        return [StepSpec(key="plan", role=PLANNER,
                         max_tokens=get_settings().planner_max_tokens)]

    def expand(self, job_input: ResearchInput, step_key: str, role: Role[Any],
               output: BaseModel) -> list[StepSpec]:
        if not isinstance(output, PlanOutput):
            return []
        settings = get_settings()
        effort = EFFORTS[job_input.effort]
        # Over a corpus an investigator is an agent loop: its budget is all its calls'.
        loop = {"turn_limit": effort.turns} if job_input.corpus_id else {}
        investigate = [
            StepSpec(key=f"investigate-{i + 1}", role=INVESTIGATOR,
                     max_tokens=effort.step_tokens if job_input.corpus_id
                     else settings.investigator_max_tokens, depends_on=(step_key,),
                     input={"question": q, **loop})
            for i, q in enumerate(output.subquestions)
        ]
        synth = StepSpec(key="synthesise", role=SYNTHESISER,
                         max_tokens=settings.synthesiser_max_tokens,
                         depends_on=tuple(s.key for s in investigate))
        if not job_input.corpus_id:
            return [*investigate, synth]
        # The verifier makes no model call; its budget is unused.
        check = StepSpec(key="verify", role=VERIFIER, max_tokens=1, depends_on=("synthesise",))
        return [*investigate, synth, check]

    def run_step(self, ctx: StepContext, job_input: ResearchInput) -> BaseModel:
        if ctx.role == PLANNER.name:
            return self._plan(ctx, job_input)
        if ctx.role == INVESTIGATOR.name:
            question = str(ctx.step_input["question"])
            if job_input.corpus_id:
                return self._investigate_corpus(ctx, job_input, job_input.corpus_id, question)
            return self._investigate(ctx, job_input, question)
        if ctx.role == SYNTHESISER.name:
            return self._synthesise(ctx, job_input)
        if ctx.role == VERIFIER.name:
            return self._verify(ctx, job_input)
        raise AgentError(f"research jobs have no role {ctx.role!r}")

    def _plan(self, ctx: StepContext, job_input: ResearchInput) -> PlanOutput:
        n = self._n(job_input)
        # A plan that does not parse is asked of the next larger model, where there is one.
        reply = ctx.complete(CallSpec(prompt=plan_prompt(job_input.query),
                                      regex=plan_regex(2, n),
                                      validate=lambda text: parse_plan(text, n) is not None))
        questions = parse_plan(reply.text, n)
        if questions is None:
            return PlanOutput(subquestions=fallback_plan(job_input.query, n), fallback=True,
                              raw=reply.text[:2000])
        return PlanOutput(subquestions=questions)

    def _investigate(self, ctx: StepContext, job_input: ResearchInput,
                     question: str) -> InvestigationOutput:
        prompt = _shared_prefix(job_input.query) + f"Section: {question}\nAnswer:"
        reply = ctx.complete(CallSpec(prompt=prompt, stop=["\n"]))
        return InvestigationOutput(question=question, answer=reply.text.strip(),
                                   finish_reason=reply.finish_reason)

    def _investigate_corpus(self, ctx: StepContext, job_input: ResearchInput,
                            corpus_id: str, question: str) -> InvestigationOutput:
        found = investigate(ctx, corpus_id, job_input.query, question,
                            job_input.passages_per_question, turn_limit(ctx))
        if found is None:
            return InvestigationOutput(question=question, answer=NOTHING_FOUND, citations=[])
        passages = [SourcePassage(chunk_id=p.chunk_id, document_id=p.document_id,
                                  document=p.document_title, text=p.text[:PASSAGE_CHARS])
                    for p in found.passages]
        cited = section_citations(found.answer, [{"chunk_id": p.chunk_id} for p in passages])
        return InvestigationOutput(
            question=question, answer=found.answer,
            citations=[SectionCitation.model_validate(c) for c in cited],
            retrieved=[p.chunk_id for p in passages], passages=passages,
            rests_on=found.rests_on, turns=found.turns, stopped=str(found.stopped),
            fallback=found.fallback)

    def _synthesise(self, ctx: StepContext, job_input: ResearchInput) -> SynthesisOutput:
        investigations = _investigations(ctx.parents)
        cited = bool(job_input.corpus_id)
        citations: list[Citation] = []
        if cited:
            renumbered, numbered = renumber([
                {"question": inv.question, "answer": inv.answer,
                 "citations": [c.model_dump() for c in inv.citations or []]}
                for inv in investigations])
            sections = [Section.model_validate(sec) for sec in renumbered]
            passages = {p.chunk_id: p for inv in investigations for p in inv.passages}
            for c in numbered:
                p = passages.get(c["chunk_id"])
                citations.append(Citation(
                    n=c["n"], document=p.document if p else None,
                    document_id=p.document_id if p else None, chunk=c["chunk_id"],
                    snippet=_snippet(p.text if p else "")))
        else:
            sections = [Section(question=inv.question, answer=inv.answer)
                        for inv in investigations]
        notes = "".join(f"Section: {s.question}\nAnswer: {s.answer}\n\n" for s in sections)
        prefix = _cited_prefix(job_input.query) if cited else _shared_prefix(job_input.query)
        reply = ctx.complete(CallSpec(prompt=prefix + notes + SYNTHESIS_CUE, stop=["\n"]))
        answer = reply.text.strip()
        # A model that says nothing still leaves the sections it was given.
        fallback = not answer
        if fallback:
            answer = " ".join(s.answer for s in sections if s.answer)
        return SynthesisOutput(
            answer=answer, sections=sections, answer_fallback=fallback,
            finish_reason=reply.finish_reason, citations=citations if cited else None,
            retrieved_by_section=[list(inv.retrieved) for inv in investigations]
            if cited else None)

    def _verify(self, ctx: StepContext, job_input: ResearchInput) -> VerificationOutput:
        if not job_input.corpus_id:
            raise AgentError("there is no corpus to verify the citations against")
        synth = ctx.parents.one(SYNTHESISER)
        citations = synth.citations or []
        ids = sorted({c.chunk for c in citations})
        chunks = ctx.read_passages(job_input.corpus_id, ids) if ids else {}
        report = verify([s.model_dump() for s in synth.sections],
                        [{"n": c.n, "chunk_id": c.chunk} for c in citations],
                        synth.retrieved_by_section or [], chunks, answer=synth.answer)
        return VerificationOutput.model_validate(report)

    def result(self, job_input: ResearchInput, outputs: StepOutputs) -> ResearchResult:
        synth = outputs.one(SYNTHESISER)
        plan = outputs.get(PLANNER, "plan")
        fallback = plan.fallback if plan else False
        if not job_input.corpus_id:
            return ResearchResult(
                answer=synth.answer, sections=synth.sections, plan_fallback=fallback,
                sources="model_knowledge",
                note="Written from the model's own knowledge; no corpus was searched.")
        return ResearchResult(
            answer=synth.answer, sections=synth.sections, plan_fallback=fallback,
            sources="corpus", corpus_id=job_input.corpus_id, citations=synth.citations or [],
            verification=outputs.get(VERIFIER, "verify"))

    def partial_result(self, job_input: ResearchInput, outputs: StepOutputs) -> dict[str, Any]:
        sections: list[dict[str, Any]] = []
        for inv in _investigations(outputs):
            section: dict[str, Any] = {"question": inv.question, "answer": inv.answer}
            if inv.citations is not None:
                section["citations"] = [c.model_dump(mode="json") for c in inv.citations]
            sections.append(section)
        return {"partial": True, "answer": None, "sections": sections,
                "sources": "corpus" if job_input.corpus_id else "model_knowledge"}
