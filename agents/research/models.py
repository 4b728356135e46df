"""Research jobs' input, efforts, step outputs, roles and result."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from agents.base import Role
from agents.research.outschema import check_output_schema

Effort = Literal["low", "medium", "high", "max"]


@dataclass(frozen=True)
class EffortLevel:
    """What an effort level buys. `subquestions` None: `AGENTQ_MAX_SUBQUESTIONS`. Over a
    corpus: each investigator's turn limit and step budget (the tokens of all its calls), the
    job's budget when the request sets none, how many follow-up investigators the gap analysis
    may add after the first round (0: no gap analysis), and whether the brief gets a
    critique-and-revise pass."""

    subquestions: int | None
    turns: int
    step_tokens: int
    job_tokens: int | None  # None: `AGENTQ_DEFAULT_JOB_MAX_TOTAL_TOKENS`
    followups: int = 0
    revise: bool = False


EFFORTS: dict[str, EffortLevel] = {
    "low": EffortLevel(subquestions=3, turns=1, step_tokens=6_000, job_tokens=None),
    "medium": EffortLevel(subquestions=None, turns=4, step_tokens=16_000, job_tokens=80_000),
    "high": EffortLevel(subquestions=6, turns=8, step_tokens=32_000, job_tokens=240_000,
                        followups=2, revise=True),
    "max": EffortLevel(subquestions=8, turns=12, step_tokens=64_000, job_tokens=600_000,
                       followups=4, revise=True),
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
                    "passages, every sentence of the brief carries the passages it rests on, "
                    "and a verifier checks them. Without one, the brief comes from the model's "
                    "own knowledge.")
    passages_per_question: int = Field(default=4, ge=1, le=8,
                                       description="Passages retrieved per search.")
    effort: Effort = Field(
        default="medium",
        description="How hard to work (see `EFFORTS`): the number of sub-questions and, over "
                    "a corpus, each investigator's turns and step budget (low: 3 sub-questions, "
                    "one call each; medium: 4, up to 4 turns; high: 6, up to 8, then a gap "
                    "analysis adding up to 2 follow-up investigators and a critique-and-revise "
                    "pass; max: 8, up to 12, up to 4 follow-ups, critique and revise).")
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON Schema of an object (`type: object` with `properties`): the result "
                    "also holds an object valid against it (`output`), each field with the "
                    "citations that support it and a confidence (`output_fields`).",
        examples=[{"type": "object", "properties": {"summary": {"type": "string"}},
                   "required": ["summary"]}])

    @field_validator("output_schema")
    @classmethod
    def _schema_is_usable(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_output_schema(schema)
        return schema


class _Compact(BaseModel):
    """A model whose JSON leaves out the fields named in `_omit_none` while they are None."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self._omit_none}


How = Literal["model", "overlap", "passage", "none"]


class CitedSentence(BaseModel):
    """A sentence of the brief and the citation numbers it rests on. `how`: the model named
    them (`model`), they were found by the words the sentence shares with the passages
    (`overlap`), the sentence is quoted from the passage (`passage`), or none was found."""

    text: str
    citations: list[int]
    how: How = "model"


class Section(_Compact):
    _omit_none = frozenset({"citations", "sentences"})

    question: str
    answer: str = Field(description="The section's paragraph, with `[n]` markers.")
    citations: list[int] | None = Field(default=None, description="Citation numbers it uses.")
    sentences: list[CitedSentence] | None = None


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


class SourcedSentence(BaseModel):
    """A sentence of an investigator's findings and the chunks it rests on."""

    text: str
    chunks: list[str]
    how: How = "model"


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
    sentences: list[SourcedSentence] | None = None
    # No sentence of the model rested on a passage: the passages' best sentences were quoted.
    quoted: bool = False
    # Passage numbers the model cited that named no passage it was shown (dropped).
    invalid_citations: list[int] = Field(default_factory=list)


class GapOutput(BaseModel):
    followups: list[str]
    investigators: list[str] = Field(default_factory=list,
                                     description="The first round's steps it read.")
    fallback: bool = False
    raw: str | None = None


class SynthesisOutput(BaseModel):
    answer: str
    sections: list[Section]
    answer_fallback: bool = False
    finish_reason: str | None = None
    # Over a corpus only: the brief's citations and, per section, the chunks retrieved for it.
    citations: list[Citation] | None = None
    retrieved_by_section: list[list[str]] | None = None
    answer_sentences: list[CitedSentence] | None = None


class CritiquePoint(BaseModel):
    section: int | None = Field(description="The section (from 1); None: the overall answer.")
    problem: str
    sentence: str | None = None


class CritiqueOutput(BaseModel):
    points: list[CritiquePoint]
    raw: str | None = None


class RevisionOutput(SynthesisOutput):
    revised: list[int] = Field(default_factory=list,
                               description="The sections (from 1) the revision rewrote.")
    kept: list[int] = Field(default_factory=list,
                            description="Sections whose rewrite was worse, so kept as they were.")


class VerificationOutput(BaseModel):
    verified: bool
    citations_checked: int
    problems: list[CitationProblem]
    unsupported_sentences: list[UnsupportedSentence]


class FieldSupport(BaseModel):
    citations: list[int]
    confidence: float = Field(ge=0, le=1)


class ExtractionOutput(_Compact):
    _omit_none = frozenset({"error"})

    object: dict[str, Any] | None
    fields: dict[str, FieldSupport] = Field(default_factory=dict)
    attempts: int
    escalated: bool = False
    error: str | None = None


class ResearchResult(_Compact):
    _omit_none = frozenset({"note", "corpus_id", "citations", "verification", "brief",
                            "output", "output_fields", "output_error", "followups",
                            "critique"})

    answer: str | None
    sections: list[Section]
    plan_fallback: bool = False
    sources: str = Field(description="`corpus` or `model_knowledge`.")
    note: str | None = None
    corpus_id: str | None = None
    brief: str | None = Field(default=None, description="The brief as Markdown: a heading and "
                                                        "a paragraph per section, cited.")
    citations: list[Citation] | None = None
    verification: VerificationOutput | None = None
    followups: list[str] | None = Field(default=None,
                                        description="The gap analysis's follow-up questions.")
    critique: list[CritiquePoint] | None = None
    output: dict[str, Any] | None = Field(default=None,
                                          description="An object valid against output_schema.")
    output_fields: dict[str, FieldSupport] | None = None
    output_error: str | None = Field(default=None,
                                     description="Why no valid object could be made.")


PLANNER = Role("planner", PlanOutput, "planning")
INVESTIGATOR = Role("investigator", InvestigationOutput, "investigating")
GAP_ANALYST = Role("gap_analyst", GapOutput, "analysing gaps")
SYNTHESISER = Role("synthesiser", SynthesisOutput, "synthesising")
CRITIC = Role("critic", CritiqueOutput, "critiquing")
REVISER = Role("reviser", RevisionOutput, "revising")
VERIFIER = Role("verifier", VerificationOutput, "verifying")
EXTRACTOR = Role("extractor", ExtractionOutput, "extracting")


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
