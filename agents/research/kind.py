"""The research job kind: its DAG and how its steps become the result.

    plan -> investigate-1..n -> synthesise [-> verify] [-> extract]

At `high` and `max` effort over a corpus, a gap analysis after the first round adds follow-up
investigators, and the brief is critiqued and revised before it is verified:

    plan -> investigate-1..n -> gaps -> followup-1..k -> synthesise -> critique -> revise
         -> verify [-> extract]

`extract` runs when the input has an `output_schema`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from agents.base import (
    AgentError,
    JobKind,
    Role,
    StepContext,
    StepOutputs,
    StepSpec,
    SubmissionContext,
)
from agents.research.brief import markdown
from agents.research.extract import extract
from agents.research.models import (
    CRITIC,
    EFFORTS,
    EXTRACTOR,
    GAP_ANALYST,
    INVESTIGATOR,
    PLANNER,
    REVISER,
    SYNTHESISER,
    VERIFIER,
    GapOutput,
    PlanOutput,
    ResearchInput,
    ResearchResult,
    SynthesisOutput,
)
from agents.research.steps import gaps, investigate_corpus, investigate_plain, investigations, plan
from agents.research.synthesis import critique, revise, synthesise, verify_brief
from core.errors import InvalidInput
from core.settings import get_settings

NOTE = "Written from the model's own knowledge; no corpus was searched."


class Research(JobKind[ResearchInput, ResearchResult]):
    name = "research"
    input_model = ResearchInput
    result_model = ResearchResult
    roles = (PLANNER, INVESTIGATOR, GAP_ANALYST, SYNTHESISER, CRITIC, REVISER, VERIFIER,
             EXTRACTOR)

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

    def _investigators(self, job_input: ResearchInput, prefix: str, questions: list[str],
                       after: str) -> list[StepSpec]:
        effort = EFFORTS[job_input.effort]
        # Over a corpus an investigator is an agent loop: its budget is all its calls'.
        loop = {"turn_limit": effort.turns} if job_input.corpus_id else {}
        tokens = effort.step_tokens if job_input.corpus_id \
            else get_settings().investigator_max_tokens
        return [StepSpec(key=f"{prefix}-{i + 1}", role=INVESTIGATOR, max_tokens=tokens,
                         depends_on=(after,), input={"question": q, **loop})
                for i, q in enumerate(questions)]

    def _tail(self, job_input: ResearchInput, waits_for: list[str],
              investigators: list[str]) -> list[StepSpec]:
        """The synthesis and what follows it."""
        settings = get_settings()
        tokens = settings.synthesiser_max_tokens
        out = [StepSpec(key="synthesise", role=SYNTHESISER, max_tokens=tokens,
                        depends_on=tuple(waits_for))]
        brief = "synthesise"
        if job_input.corpus_id and EFFORTS[job_input.effort].revise:
            out += [StepSpec(key="critique", role=CRITIC, max_tokens=tokens,
                             depends_on=("synthesise",)),
                    StepSpec(key="revise", role=REVISER, max_tokens=tokens,
                             depends_on=("synthesise", "critique", *investigators))]
            brief = "revise"
        last: tuple[str, ...] = (brief,)
        if job_input.corpus_id:
            # The verifier makes no model call; its budget is unused.
            out.append(StepSpec(key="verify", role=VERIFIER, max_tokens=1, depends_on=(brief,)))
            last = (brief, "verify")
        if job_input.output_schema is not None:
            out.append(StepSpec(key="extract", role=EXTRACTOR, max_tokens=max(tokens, 512),
                                depends_on=last))
        return out

    def expand(self, job_input: ResearchInput, step_key: str, role: Role[Any],
               output: BaseModel) -> list[StepSpec]:
        effort = EFFORTS[job_input.effort]
        if isinstance(output, PlanOutput):
            first = self._investigators(job_input, "investigate", output.subquestions,
                                        step_key)
            keys = [s.key for s in first]
            if job_input.corpus_id and effort.followups:
                return [*first, StepSpec(key="gaps", role=GAP_ANALYST,
                                         max_tokens=get_settings().planner_max_tokens,
                                         depends_on=tuple(keys))]
            return [*first, *self._tail(job_input, keys, keys)]
        if isinstance(output, GapOutput):
            more = self._investigators(job_input, "followup", output.followups, step_key)
            waits = [*output.investigators, *(s.key for s in more)]
            return [*more, *self._tail(job_input, [*waits, step_key], waits)]
        return []

    def run_step(self, ctx: StepContext, job_input: ResearchInput) -> BaseModel:
        role = ctx.role
        if role == PLANNER.name:
            return plan(ctx, job_input, self._n(job_input))
        if role == INVESTIGATOR.name:
            question = str(ctx.step_input["question"])
            if job_input.corpus_id:
                return investigate_corpus(ctx, job_input, job_input.corpus_id, question)
            return investigate_plain(ctx, job_input, question)
        if role == GAP_ANALYST.name:
            return gaps(ctx, job_input, EFFORTS[job_input.effort].followups)
        if role == SYNTHESISER.name:
            return synthesise(ctx, job_input)
        if role == CRITIC.name:
            return critique(ctx, job_input)
        if role == REVISER.name:
            return revise(ctx, job_input)
        if role == VERIFIER.name:
            return verify_brief(ctx, job_input)
        if role == EXTRACTOR.name:
            return extract(ctx, job_input)
        raise AgentError(f"research jobs have no role {ctx.role!r}")

    def result(self, job_input: ResearchInput, outputs: StepOutputs) -> ResearchResult:
        revised = outputs.get(REVISER, "revise") if "revise" in outputs else None
        brief: SynthesisOutput = revised if revised is not None else outputs.one(SYNTHESISER)
        plan_out = outputs.get(PLANNER, "plan")
        extracted = outputs.get(EXTRACTOR, "extract") if "extract" in outputs else None
        extra: dict[str, Any] = {}
        if extracted is not None:
            extra = {"output": extracted.object, "output_error": extracted.error,
                     "output_fields": extracted.fields if extracted.object is not None
                     else None}
        gap = outputs.get(GAP_ANALYST, "gaps") if "gaps" in outputs else None
        crit = outputs.get(CRITIC, "critique") if "critique" in outputs else None
        common: dict[str, Any] = {
            "answer": brief.answer, "sections": brief.sections,
            "plan_fallback": plan_out.fallback if plan_out else False,
            "brief": markdown(job_input.query, brief.sections, brief.answer),
            "followups": gap.followups if gap else None,
            "critique": crit.points if crit else None, **extra}
        if not job_input.corpus_id:
            return ResearchResult(sources="model_knowledge", note=NOTE, **common)
        return ResearchResult(sources="corpus", corpus_id=job_input.corpus_id,
                              citations=brief.citations or [],
                              verification=outputs.get(VERIFIER, "verify"), **common)

    def partial_result(self, job_input: ResearchInput, outputs: StepOutputs) -> dict[str, Any]:
        sections: list[dict[str, Any]] = []
        for inv in investigations(outputs):
            section: dict[str, Any] = {"question": inv.question, "answer": inv.answer}
            if inv.citations is not None:
                section["citations"] = [c.model_dump(mode="json") for c in inv.citations]
            sections.append(section)
        return {"partial": True, "answer": None, "sections": sections,
                "sources": "corpus" if job_input.corpus_id else "model_knowledge"}
