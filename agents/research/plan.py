"""The research plan (sub-questions) and, at high effort, the gap analysis after the first
round of investigators (follow-up sub-questions); both are JSON arrays of questions written
under a regular-expression constraint."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from agents.research.models import InvestigationOutput

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
FOLLOWUP_CUE = "Follow-up questions:"
# Characters of each section's findings the gap analysis reads.
FINDINGS_CHARS = 400


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


def _questions(text: str) -> list[str] | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return None
    cleaned: list[str] = []
    for item in items:
        s = re.sub(r"\s+", " ", item).strip()
        if len(s) >= 8 and s.lower() not in {c.lower() for c in cleaned} \
                and s not in _PLAN_EXAMPLE:
            cleaned.append(s)
    return cleaned


def parse_plan(text: str, n_max: int) -> list[str] | None:
    cleaned = _questions(text)
    if cleaned is None or len(cleaned) < 2:
        return None
    return cleaned[:n_max]


# --- Gap analysis ------------------------------------------------------------------------------

def gap_regex(max_items: int) -> str:
    """An empty array, or 1..`max_items` questions."""
    return rf"(\[\]|{plan_regex(1, max_items)})"


def gap_prompt(query: str, found: Sequence[InvestigationOutput]) -> str:
    sections = "".join(f"Sub-question: {inv.question}\nFindings: "
                       f"{inv.answer[:FINDINGS_CHARS]}\n\n" for inv in found)
    return (
        "A research analyst reads the findings of a first round of research and names the "
        "follow-up questions that would fill its gaps: what the findings leave unanswered, "
        "or answer without sources. No follow-up repeats a sub-question already asked.\n\n"
        f"Research question: {query.strip()}\n\n{sections}{FOLLOWUP_CUE} ")


def parse_gaps(text: str, asked: Sequence[str], n_max: int) -> list[str] | None:
    """The follow-up questions, without those already asked; None when unusable."""
    cleaned = _questions(text)
    if cleaned is None:
        return None
    seen = {q.lower() for q in asked}
    return [q for q in cleaned if q.lower() not in seen][:n_max]


def weak(inv: InvestigationOutput) -> bool:
    """Findings that answer without a source: nothing found, a fallback, or uncited sentences."""
    if inv.fallback or inv.quoted or not inv.sentences:
        return True
    return any(not s.chunks for s in inv.sentences)


def fallback_gaps(found: Sequence[InvestigationOutput], n_max: int) -> list[str]:
    """Follow-ups for when the model's gap analysis is unusable: the weakest sections asked
    again in other words."""
    return [f"What else do the sources say about: {inv.question.rstrip('?')}?"
            for inv in found if weak(inv)][:n_max]
