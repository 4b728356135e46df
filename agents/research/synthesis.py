"""The brief: the synthesis of the sections and the overall answer, the critique and the
revision (at high effort), and the verifier's checks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from agents.base import AgentError, CallSpec, StepContext
from agents.citations import split_cited, verify, verify_sentences
from agents.research.brief import (
    Numbering,
    fit,
    paragraph_schema,
    read_paragraph,
    render,
    resolve,
)
from agents.research.models import (
    CRITIC,
    REVISER,
    SYNTHESISER,
    CitedSentence,
    CritiqueOutput,
    CritiquePoint,
    InvestigationOutput,
    ResearchInput,
    RevisionOutput,
    Section,
    SourcedSentence,
    SourcePassage,
    SynthesisOutput,
    VerificationOutput,
)
from agents.research.steps import _shared_prefix, investigations

SYNTHESIS_CUE = "Overall answer to the research question:"
CRITIQUE_CUE = "Points that are unsupported or missing:"
REVISION_CUE = "Revised paragraph, every sentence from the passages:"
ANSWER_SENTENCES = 3
REVISION_PASSAGES = 6
REVISION_PASSAGE_CHARS = 360


def _cited_prefix(query: str) -> str:
    return (
        "The following is a research brief written by a careful analyst from the numbered "
        "sources given. Each section answers one sub-question in a short factual paragraph "
        "and marks every claim with the number of its source, like [1] or [2].\n\n"
        f"Research question: {query.strip()}\n\n"
    )


def _notes(sections: Sequence[Section], sentences: int | None = None) -> str:
    """The sections as the synthesis reads them (each cut to its first `sentences`)."""
    def text(s: Section) -> str:
        if sentences is None or not s.sentences:
            return s.answer
        return render([(c.text, c.citations) for c in s.sentences[:sentences]])
    return "".join(f"Section: {s.question}\nAnswer: {text(s)}\n\n" for s in sections)


def _overall(ctx: StepContext, query: str, sections: Sequence[Section],
             texts: Mapping[int, str]) -> tuple[list[CitedSentence], str | None]:
    """The overall answer, as cited sentences (numbers of the brief's citations)."""
    # The whole sections where the model's context holds them, else their first sentences.
    calls = (fit(ctx, CallSpec(prompt=_cited_prefix(query) + _notes(sections, cut)
                               + SYNTHESIS_CUE,
                               json_schema=paragraph_schema(len(texts), ANSWER_SENTENCES)))
             for cut in (None, 2))
    call = next((c for c in calls if c is not None), None)
    if call is None:  # the sections fill the model's context: the fallback answer
        return [], None
    reply = ctx.complete(call)
    resolved = resolve(read_paragraph(reply.text), texts)
    return ([CitedSentence(text=t, citations=ns, how=how) for t, ns, how in resolved.sentences],
            reply.finish_reason)


def _first_sentences(sections: Sequence[Section]) -> list[CitedSentence]:
    """Each section's first sentence that no section before it said already."""
    out: list[CitedSentence] = []
    for sec in sections:
        said = {s.text for s in out}
        first = next((s for s in sec.sentences or [] if s.text not in said), None)
        if first is not None:
            out.append(first)
    return out[:ANSWER_SENTENCES]


def _brief(query: str, found: Sequence[InvestigationOutput],
           sections_found: Sequence[Sequence[SourcedSentence]], ctx: StepContext,
           answer_found: Sequence[SourcedSentence] | None = None) -> SynthesisOutput:
    """Number the sections' chunks into one list and write (or renumber) the overall answer."""
    passages: dict[str, SourcePassage] = {p.chunk_id: p for inv in found for p in inv.passages}
    numbering = Numbering(passages)
    sections = []
    for inv, got in zip(found, sections_found, strict=True):
        sec = numbering.section(inv.question, got)
        sections.append(sec if got else Section(question=inv.question, answer=inv.answer,
                                                citations=[], sentences=[]))
    finish = None
    if answer_found is None:
        texts = {numbering.order[c]: passages[c].text for c in numbering.order}
        answer, finish = _overall(ctx, query, sections, texts)
    else:
        answer = [numbering.cite(s) for s in answer_found]
    fallback = not answer
    if fallback:  # the model said nothing usable: the sections' first sentences
        answer = _first_sentences(sections)
    return SynthesisOutput(
        answer=render([(s.text, s.citations) for s in answer]) or "", sections=sections,
        answer_fallback=fallback, finish_reason=finish, citations=numbering.citations(),
        retrieved_by_section=[list(inv.retrieved) for inv in found], answer_sentences=answer)


def _sentences_of(inv: InvestigationOutput) -> list[SourcedSentence]:
    """An investigation's sentences (one stored before they were kept: read from its `[n]`
    markers)."""
    if inv.sentences is not None:
        return inv.sentences
    local = {c.n: c.chunk_id for c in inv.citations or [] if c.chunk_id is not None}
    return [SourcedSentence(text=t, chunks=[local[n] for n in ns if n in local])
            for t, ns in split_cited(inv.answer)] if local else []


def synthesise(ctx: StepContext, job_input: ResearchInput) -> SynthesisOutput:
    found = investigations(ctx.parents)
    if job_input.corpus_id:
        return _brief(job_input.query, found, [_sentences_of(inv) for inv in found], ctx)
    sections = [Section(question=inv.question, answer=inv.answer) for inv in found]
    reply = ctx.complete(CallSpec(prompt=_shared_prefix(job_input.query) + _notes(sections)
                                  + SYNTHESIS_CUE, stop=["\n"]))
    answer = reply.text.strip()
    # A model that says nothing still leaves the sections it was given.
    fallback = not answer
    if fallback:
        answer = " ".join(s.answer for s in sections if s.answer)
    return SynthesisOutput(answer=answer, sections=sections, answer_fallback=fallback,
                           finish_reason=reply.finish_reason)


def check(brief: SynthesisOutput, chunks: Mapping[str, str]) -> VerificationOutput:
    """The verifier's checks of a brief, sentence by sentence (a brief stored without its
    sentences is read from its `[n]` markers)."""
    citations = [{"n": c.n, "chunk_id": c.chunk} for c in brief.citations or []]
    retrieved = brief.retrieved_by_section or []
    if brief.answer_sentences is None:
        report = verify([s.model_dump() for s in brief.sections], citations, retrieved,
                        chunks, answer=brief.answer)
    else:
        report = verify_sentences(
            [[(s.text, s.citations) for s in sec.sentences or []] for sec in brief.sections],
            citations, retrieved, chunks,
            [(s.text, s.citations) for s in brief.answer_sentences])
    return VerificationOutput.model_validate(report)


def _chunks(ctx: StepContext, job_input: ResearchInput, brief: SynthesisOutput
            ) -> dict[str, str]:
    assert job_input.corpus_id
    ids = sorted({c.chunk for c in brief.citations or []})
    return ctx.read_passages(job_input.corpus_id, ids) if ids else {}


def final_brief(ctx: StepContext) -> SynthesisOutput:
    revised = ctx.parents.get(REVISER, "revise") if "revise" in ctx.parents else None
    return revised if revised is not None else ctx.parents.one(SYNTHESISER)


def verify_brief(ctx: StepContext, job_input: ResearchInput) -> VerificationOutput:
    if not job_input.corpus_id:
        raise AgentError("there is no corpus to verify the citations against")
    brief = final_brief(ctx)
    return check(brief, _chunks(ctx, job_input, brief))


# --- Critique and revision ---------------------------------------------------------------------

def critique(ctx: StepContext, job_input: ResearchInput) -> CritiqueOutput:
    """What the brief says without support (the verifier's checks, run early) and what the
    model finds missing."""
    brief = ctx.parents.one(SYNTHESISER)
    report = check(brief, _chunks(ctx, job_input, brief))
    points = []
    for bad in report.unsupported_sentences:
        section = None if bad.where == "answer" else int(bad.where.rsplit(" ", 1)[1])
        points.append(CritiquePoint(section=section, problem=bad.reason, sentence=bad.sentence))
    n = len(brief.sections)
    schema = {"type": "object", "properties": {"points": {
        "type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {
                "section": {"type": "integer", "minimum": 1, "maximum": max(1, n)},
                "problem": {"type": "string"}},
            "required": ["section", "problem"], "additionalProperties": False}}},
        "required": ["points"], "additionalProperties": False}
    numbered = "".join(f"Section {i + 1}: {s.question}\n{s.answer}\n\n"
                       for i, s in enumerate(brief.sections))
    prompt = (_cited_prefix(job_input.query) + numbered + "A reviewer lists, by section, the "
              "claims that no source supports and the points the sections leave out.\n"
              + CRITIQUE_CUE)
    call = fit(ctx, CallSpec(prompt=prompt, json_schema=schema))
    if call is None:  # the brief fills the model's context: its checks only
        return CritiqueOutput(points=points)
    reply = ctx.complete(call)
    for item in _points(reply.text):
        section, problem = item
        if 1 <= section <= n and problem.strip():
            points.append(CritiquePoint(section=section, problem=problem.strip()[:300]))
    return CritiqueOutput(points=points, raw=reply.text[:2000])


def _points(text: str) -> list[tuple[int, str]]:
    try:
        data = json.loads(text)
    except ValueError:
        return []
    items = data.get("points") if isinstance(data, dict) else None
    return [(i["section"], i["problem"]) for i in items or []
            if isinstance(i, dict) and isinstance(i.get("section"), int)
            and isinstance(i.get("problem"), str)]


def _revise_section(ctx: StepContext, query: str, inv: InvestigationOutput,
                    current: Sequence[SourcedSentence], points: Sequence[CritiquePoint]
                    ) -> list[SourcedSentence] | None:
    """The section rewritten from its passages; None when the rewrite is no better."""
    shown = inv.passages[:REVISION_PASSAGES]
    local = {p.chunk_id: i + 1 for i, p in enumerate(shown)}
    texts = {i + 1: p.text for i, p in enumerate(shown)}
    sources = "".join(f"[{i + 1}] ({p.document}) {p.text[:REVISION_PASSAGE_CHARS]}\n"
                      for i, p in enumerate(shown))
    draft = render([(s.text, [local[c] for c in s.chunks if c in local]) for s in current])
    problems = "".join(f"- {p.problem}{': ' + p.sentence if p.sentence else ''}\n"
                       for p in points)
    prompt = (f"Passages:\n{sources}\nResearch question: {query.strip()}\n"
              f"Sub-question: {inv.question}\nDraft: {draft}\nProblems:\n{problems}"
              f"{REVISION_CUE}")
    call = fit(ctx, CallSpec(prompt=prompt, json_schema=paragraph_schema(len(shown), 6)))
    if call is None:
        return None
    reply = ctx.complete(call)
    resolved = resolve(read_paragraph(reply.text), texts)
    chunk_of = {n: p.chunk_id for n, p in enumerate(shown, 1)}
    new = [SourcedSentence(text=t, chunks=[chunk_of[n] for n in ns], how=how)
           for t, ns, how in resolved.sentences]
    uncited = sum(1 for s in new if not s.chunks)
    if not any(s.chunks for s in new) or uncited > sum(1 for s in current if not s.chunks):
        return None
    return new


def revise(ctx: StepContext, job_input: ResearchInput) -> RevisionOutput:
    """Each section the critique named rewritten from its passages, still sentence by
    sentence with citations; a rewrite that is worse is dropped, and the section keeps only
    its cited sentences instead."""
    brief = ctx.parents.one(SYNTHESISER)
    points = ctx.parents.one(CRITIC).points
    found = investigations(ctx.parents)
    chunk_by_n = {c.n: c.chunk for c in brief.citations or []}

    def sourced(items: Sequence[CitedSentence]) -> list[SourcedSentence]:
        return [SourcedSentence(text=s.text, chunks=[chunk_by_n[n] for n in s.citations
                                                     if n in chunk_by_n], how=s.how)
                for s in items]

    sections = [sourced(sec.sentences or []) for sec in brief.sections]
    revised, kept = [], []
    for i, inv in enumerate(found):
        mine = [p for p in points if p.section == i + 1]
        if not mine or not inv.passages:
            continue
        new = _revise_section(ctx, job_input.query, inv, sections[i], mine)
        if new is not None:
            sections[i] = new
            revised.append(i + 1)
        else:
            kept.append(i + 1)
            cited = [s for s in sections[i] if s.chunks]
            sections[i] = cited or sections[i]
    answer = sourced(brief.answer_sentences or [])
    unsupported = {p.sentence for p in points if p.section is None}
    answer = [s for s in answer if s.text not in unsupported] or answer
    out = _brief(job_input.query, found, sections, ctx, answer_found=answer)
    return RevisionOutput(**out.model_dump(), revised=revised, kept=kept)
