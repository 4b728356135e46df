"""The first steps of a research job: the plan, the investigators and the gap analysis."""

from __future__ import annotations

from agents.base import CallSpec, StepContext, StepOutputs
from agents.loop import turn_limit
from agents.research.brief import Resolved, fit, render, sourced
from agents.research.investigator import investigate
from agents.research.models import (
    INVESTIGATOR,
    GapOutput,
    InvestigationOutput,
    PlanOutput,
    ResearchInput,
    SectionCitation,
    SourcePassage,
)
from agents.research.plan import (
    fallback_gaps,
    fallback_plan,
    gap_prompt,
    gap_regex,
    parse_gaps,
    parse_plan,
    plan_prompt,
    plan_regex,
)

PASSAGE_CHARS = 700
NOTHING_FOUND = "No passage of the corpus answers this sub-question."


def _shared_prefix(query: str) -> str:
    return (
        "The following is a research brief written by a careful analyst. Each section answers "
        "one sub-question in a short factual paragraph.\n\n"
        f"Research question: {query.strip()}\n\n"
    )


def _order(key: str) -> tuple[int, int]:
    """First-round investigators (`investigate-n`) before follow-ups (`followup-n`)."""
    name, n = key.rsplit("-", 1)
    return (0 if name == "investigate" else 1, int(n))


def investigations(outputs: StepOutputs) -> list[InvestigationOutput]:
    """The finished investigations: the plan's in its order, then the follow-ups."""
    found = sorted(outputs.items(INVESTIGATOR), key=lambda item: _order(item[0]))
    return [out for _, out in found]


def plan(ctx: StepContext, job_input: ResearchInput, n: int) -> PlanOutput:
    # A plan that does not parse is asked of the next larger model, where there is one.
    reply = ctx.complete(CallSpec(prompt=plan_prompt(job_input.query),
                                  regex=plan_regex(2, n),
                                  validate=lambda text: parse_plan(text, n) is not None))
    questions = parse_plan(reply.text, n)
    if questions is None:
        return PlanOutput(subquestions=fallback_plan(job_input.query, n), fallback=True,
                          raw=reply.text[:2000])
    return PlanOutput(subquestions=questions)


def investigate_plain(ctx: StepContext, job_input: ResearchInput,
                      question: str) -> InvestigationOutput:
    prompt = _shared_prefix(job_input.query) + f"Section: {question}\nAnswer:"
    reply = ctx.complete(CallSpec(prompt=prompt, stop=["\n"]))
    return InvestigationOutput(question=question, answer=reply.text.strip(),
                               finish_reason=reply.finish_reason)


def investigate_corpus(ctx: StepContext, job_input: ResearchInput, corpus_id: str,
                       question: str) -> InvestigationOutput:
    found = investigate(ctx, corpus_id, job_input.query, question,
                        job_input.passages_per_question, turn_limit(ctx))
    if found is None:
        return InvestigationOutput(question=question, answer=NOTHING_FOUND, citations=[],
                                   sentences=[])
    passages = [SourcePassage(chunk_id=p.chunk_id, document_id=p.document_id,
                              document=p.document_title, text=p.text[:PASSAGE_CHARS])
                for p in found.passages]
    chunk_of = {i + 1: p.chunk_id for i, p in enumerate(passages)}
    sentences = sourced(Resolved(found.sentences, found.invalid), chunk_of)
    cited = sorted({n for _, ns, _ in found.sentences for n in ns})
    return InvestigationOutput(
        question=question, answer=render([(t, ns) for t, ns, _ in found.sentences]),
        citations=[SectionCitation(n=n, chunk_id=chunk_of[n]) for n in cited],
        retrieved=[p.chunk_id for p in passages], passages=passages,
        rests_on=[chunk_of[n] for n in cited], turns=found.turns, stopped=str(found.stopped),
        fallback=found.fallback, quoted=found.quoted, sentences=sentences,
        invalid_citations=found.invalid)


def gaps(ctx: StepContext, job_input: ResearchInput, n_max: int) -> GapOutput:
    """Follow-up sub-questions for what the first round left open."""
    found = investigations(ctx.parents)
    asked = [inv.question for inv in found]
    call = fit(ctx, CallSpec(prompt=gap_prompt(job_input.query, found), regex=gap_regex(n_max),
                             validate=lambda t: parse_gaps(t, asked, n_max) is not None))
    reply = ctx.complete(call) if call is not None else None
    followups = parse_gaps(reply.text, asked, n_max) if reply is not None else None
    keys = [k for k in ctx.parents.keys() if ctx.parents.role_of(k) == INVESTIGATOR.name]
    if followups is None:
        return GapOutput(followups=fallback_gaps(found, n_max), investigators=keys,
                         fallback=True, raw=reply.text[:2000] if reply else None)
    return GapOutput(followups=followups, investigators=keys)
