"""Scoring, independent of how a result was produced: which expected facts a text holds, and
how many of a brief's citations point at a document that holds the facts asked for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.quality.fixtures import Fact

# Keys whose text is not the brief's own words: passages quoted back, the questions asked,
# the verifier's report.
_NOT_BRIEF = frozenset({"citations", "snippet", "question", "verification", "sources",
                        "corpus_id", "note", "passages", "retrieved"})


def brief_text(result: Mapping[str, Any] | None) -> str:
    """The words the platform wrote: the answer and every section's text (and any structured
    output), without citation snippets or the sub-questions, so that a fact counts only where
    the brief states it."""
    if not result:
        return ""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if key not in _NOT_BRIEF:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(result)
    return "\n".join(parts)


def facts_found(text: str, facts: Sequence[Fact]) -> list[bool]:
    return [f.found_in(text) for f in facts]


def recall(found: Sequence[bool]) -> float | None:
    """The share of expected facts found; None for no facts."""
    return sum(found) / len(found) if found else None


@dataclass(frozen=True)
class CitationScore:
    total: int
    correct: int

    @property
    def precision(self) -> float | None:
        return self.correct / self.total if self.total else None


def citation_score(citations: Sequence[Mapping[str, Any]] | None,
                   expected_ids: set[str], expected_titles: set[str]) -> CitationScore:
    """How many citations point at one of the expected documents: by `document_id`, or by the
    document's title where a citation carries no id."""
    total = correct = 0
    for c in citations or []:
        total += 1
        doc_id, title = c.get("document_id"), c.get("document")
        if doc_id is not None:
            correct += doc_id in expected_ids
        elif title is not None:
            correct += str(title) in expected_titles
    return CitationScore(total=total, correct=correct)


def ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None
