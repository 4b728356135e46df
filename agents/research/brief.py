"""The brief with citations by construction.

Every paragraph a model writes over a corpus is structured output: a list of sentences, each
with the numbers of the passages it rests on (`paragraph_schema`, constrained by the server).
A sentence's numbers are then checked against the passages it was shown: numbers that name no
passage are dropped, and a sentence left with none, or whose passages do not hold its words,
is attributed to the passages it shares its words with (`resolve`). A model that writes prose
with `[n]` markers instead is read the same way. The brief's text, with `[n]` markers, is
rendered from that structure (`render`), never trusted from the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agents.base import CallSpec, StepContext
from agents.citations import attribute, content_words, sentences, split_cited, supported
from agents.research.models import (
    Citation,
    CitedSentence,
    How,
    Section,
    SourcedSentence,
    SourcePassage,
)

MAX_CITES = 4  # passages one sentence may name
MAX_SENTENCES = 8  # sentences a paragraph keeps (small models repeat themselves)
MIN_WORDS = 3  # content words a sentence needs to be a claim (not a fragment like "wax")
# The fewest tokens worth asking for: a structured paragraph needs room for its JSON.
MIN_ANSWER_TOKENS = 48


def fit(ctx: StepContext, call: CallSpec) -> CallSpec | None:
    """The call with `max_tokens` (by default the step's) cut to what the model's context has
    left after the prompt; None when that is too little to be worth the call."""
    want = call.max_tokens or ctx.step_max_tokens
    size = ctx.prompt_size(call)
    room = want if size.context is None else min(want, size.context - size.tokens - 8)
    if room < min(want, MIN_ANSWER_TOKENS):
        return None
    return replace(call, max_tokens=room, fit_to_job=True)


def paragraph_schema(max_passage: int, max_sentences: int) -> dict[str, Any]:
    """The JSON schema of a cited paragraph: 1..`max_sentences` sentences, each with up to
    `MAX_CITES` passage numbers from 1 to `max_passage`."""
    numbers = {"type": "array", "maxItems": MAX_CITES,
               "items": {"type": "integer", "minimum": 1, "maximum": max(1, max_passage)}}
    item = {"type": "object", "properties": {"text": {"type": "string"}, "passages": numbers},
            "required": ["text", "passages"], "additionalProperties": False}
    return {"type": "object",
            "properties": {"sentences": {"type": "array", "minItems": 1,
                                         "maxItems": max_sentences, "items": item}},
            "required": ["sentences"], "additionalProperties": False}


def read_paragraph(text: str) -> list[tuple[str, list[int]]]:
    """A paragraph the model wrote: `{"sentences": [{"text", "passages"}]}`, else prose with
    `[n]` markers."""
    try:
        data = json.loads(text)
    except ValueError:
        if text.lstrip().startswith("{"):
            return _cut_short(text)
        return split_cited(text)
    items = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return split_cited(text)
    out: list[tuple[str, list[int]]] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            given = item.get("passages")
            numbers: list[Any] = given if isinstance(given, list) else []
            out.append((item["text"], [n for n in numbers if isinstance(n, int)]))
    return out


_ITEM = re.compile(r'\{\s*"text"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"passages"\s*:\s*'
                   r'\[([\d,\s]*)\]\s*\}')


def _cut_short(text: str) -> list[tuple[str, list[int]]]:
    """The whole sentences of a structured paragraph whose JSON was cut short (the call's
    `max_tokens` ended it): the sentence it was writing is left out, never the raw JSON."""
    out: list[tuple[str, list[int]]] = []
    for found in _ITEM.finditer(text):
        try:
            sentence = json.loads(f'"{found.group(1)}"')
        except ValueError:
            continue
        out.append((sentence, [int(n) for n in found.group(2).split(",") if n.strip()]))
    return out


@dataclass
class Resolved:
    """Sentences with the passage numbers they rest on, and the numbers dropped."""

    sentences: list[tuple[str, list[int], How]] = field(default_factory=list)
    invalid: list[int] = field(default_factory=list)


def resolve(items: Sequence[tuple[str, Sequence[int]]], passages: Mapping[int, str],
            at_most: int = MAX_SENTENCES) -> Resolved:
    """Each sentence (at most `at_most`; a fragment of fewer than `MIN_WORDS` content words,
    or a sentence said again, is left out) with the passages
    (numbers of `passages`) it rests on: those it names where they hold its words, else those
    it shares its words with."""
    out = Resolved()
    said: set[frozenset[str]] = set()
    for text, named in items:
        for piece, markers in split_cited(text):
            piece = " ".join(piece.split())
            words = frozenset(content_words(piece))
            if len(words) < MIN_WORDS or words in said or len(out.sentences) >= at_most:
                continue
            said.add(words)
            claimed = list(dict.fromkeys([*markers, *named] if markers else named))
            valid = [n for n in claimed if n in passages][:MAX_CITES]
            out.invalid += [n for n in claimed if n not in passages]
            if valid and supported(piece, [passages[n] for n in valid]):
                out.sentences.append((piece, valid, "model"))
                continue
            found = attribute(piece, {str(n): t for n, t in passages.items()})
            if found:
                out.sentences.append((piece, [int(n) for n in found], "overlap"))
            else:
                out.sentences.append((piece, valid, "model" if valid else "none"))
    out.invalid = list(dict.fromkeys(out.invalid))
    return out


def extract(question: str, passages: Mapping[int, str], at_most: int = 2
            ) -> list[tuple[str, list[int], How]]:
    """A paragraph quoted from the passages, for when the model wrote none: of the passages
    that share most words with the question, the sentence that shares most."""
    asked = content_words(question)
    best: list[tuple[int, str, int]] = []
    for n, text in passages.items():
        for sent in sentences(text):
            best.append((len(asked & content_words(sent)), " ".join(sent.split()), n))
    best.sort(key=lambda b: -b[0])
    out: list[tuple[str, list[int], How]] = []
    used: set[int] = set()
    for score, sent, n in best:
        if n not in used and content_words(sent) and (score or not out):
            out.append((sent, [n], "passage"))
            used.add(n)
        if len(out) >= at_most:
            break
    return out


def render(items: Sequence[tuple[str, Sequence[int]]]) -> str:
    """Sentences as prose, each with its `[n]` markers before its closing punctuation."""
    parts = []
    for text, numbers in items:
        text = text.strip()
        marks = "".join(f"[{n}]" for n in numbers)
        end = re.search(r"[.!?]+$", text)
        if not marks:
            parts.append(text)
        elif end:
            parts.append(f"{text[:end.start()].rstrip()} {marks}{end.group()}")
        else:
            parts.append(f"{text} {marks}")
    return " ".join(parts)


def sourced(resolved: Resolved, chunk_of: Mapping[int, str]) -> list[SourcedSentence]:
    return [SourcedSentence(text=t, chunks=[chunk_of[n] for n in ns], how=how)
            for t, ns, how in resolved.sentences]


def _snippet(text: str, width: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + "…"


@dataclass
class Numbering:
    """One numbering of the cited chunks for a whole brief, in order of first citation."""

    passages: Mapping[str, SourcePassage]
    order: dict[str, int] = field(default_factory=dict)

    def cite(self, s: SourcedSentence) -> CitedSentence:
        numbers = [self.order.setdefault(c, len(self.order) + 1) for c in s.chunks]
        return CitedSentence(text=s.text, citations=numbers, how=s.how)

    def section(self, question: str, found: Sequence[SourcedSentence]) -> Section:
        cited = [self.cite(s) for s in found]
        return Section(question=question, answer=render([(c.text, c.citations) for c in cited]),
                       citations=sorted({n for c in cited for n in c.citations}),
                       sentences=cited)

    def citations(self) -> list[Citation]:
        out = []
        for chunk, n in self.order.items():
            p = self.passages.get(chunk)
            out.append(Citation(n=n, document=p.document if p else None,
                                document_id=p.document_id if p else None, chunk=chunk,
                                snippet=_snippet(p.text if p else "")))
        return out


def markdown(query: str, sections: Sequence[Section], answer: str) -> str:
    """The brief as Markdown: the question, the overall answer, then a heading and a cited
    paragraph per section."""
    parts = [f"# {query.strip()}", "", answer.strip(), ""]
    for sec in sections:
        parts += [f"## {sec.question.strip()}", "", sec.answer.strip(), ""]
    return "\n".join(parts).rstrip() + "\n"
