"""Citations for research over a corpus: numbered markers in the text, the chunks they point at,
attribution of sentences to passages by the words they share, and the verifier's checks.

An investigator sees its retrieved passages numbered [1]..[k] and cites them by number; its
section keeps, for each number, the chunk id. The synthesiser renumbers every section's
citations into one list for the whole brief. The verifier checks that every citation points at
a chunk that exists in the corpus and that the section's investigator actually retrieved, and
flags sentences that cite nothing or whose cited chunks share too few of their words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MARKER = re.compile(r"\[(\d{1,3})\]")
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")
# Words too common to count as support.
STOPWORDS = frozenset("""a an and are as at be been but by can do does for from has have how in
into is it its of on or that the their there these this those to was were what when where which
who why will with""".split())
# A sentence is supported when at least this share of its content words occur in the chunks it
# cites.
SUPPORT_THRESHOLD = 0.25


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(MARKER.sub(" ", text.lower()))
            if w not in STOPWORDS and len(w) > 2}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def section_citations(text: str, retrieved: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The section's citation numbers, each with the passage it names (`chunk_id` None when the
    number names no retrieved passage)."""
    out = []
    for n in sorted({int(m) for m in MARKER.findall(text)}):
        passage = retrieved[n - 1] if 1 <= n <= len(retrieved) else None
        out.append({"n": n, "chunk_id": passage["chunk_id"] if passage else None})
    return out


def renumber(sections: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]],
                                                             list[dict[str, Any]]]:
    """One numbering for the whole brief: sections with their markers rewritten, and the list of
    cited chunks (each once, in order of first citation). Numbers that named no passage keep a
    marker the verifier will flag (`[?n]`)."""
    order: dict[str, int] = {}
    out_sections = []
    for sec in sections:
        local = {c["n"]: c["chunk_id"] for c in sec.get("citations", [])}

        def rewrite(m: re.Match[str], local: Mapping[int, str | None] = local) -> str:
            chunk = local.get(int(m.group(1)))
            if chunk is None:
                return f"[?{m.group(1)}]"
            order.setdefault(chunk, len(order) + 1)
            return f"[{order[chunk]}]"

        text = MARKER.sub(rewrite, str(sec.get("answer", "")))
        out_sections.append({**sec, "answer": text,
                             "citations": sorted({order[c] for c in local.values()
                                                  if c is not None and c in order})})
    return out_sections, [{"n": n, "chunk_id": chunk} for chunk, n in order.items()]


def attribute(sentence: str, passages: Mapping[str, str], at_most: int = 2) -> list[str]:
    """The passages (by key) a sentence came from, by lexical overlap: of those holding at
    least `SUPPORT_THRESHOLD` of its content words, best first, each that adds words the ones
    before it do not hold; none when no passage holds enough."""
    words = content_words(sentence)
    if not words:
        return []
    held = {key: words & content_words(text) for key, text in passages.items()}
    chosen: list[str] = []
    covered: set[str] = set()
    for key in sorted(held, key=lambda k: -len(held[k])):
        if len(held[key]) / len(words) < SUPPORT_THRESHOLD or len(chosen) >= at_most:
            break
        if held[key] - covered:
            chosen.append(key)
            covered |= held[key]
    return chosen


def supported(sentence: str, texts: Iterable[str]) -> bool:
    words = content_words(sentence)
    support: set[str] = set()
    for text in texts:
        support |= content_words(text)
    return not words or len(words & support) / len(words) >= SUPPORT_THRESHOLD


def split_cited(text: str) -> list[tuple[str, list[int]]]:
    """Prose with `[n]` markers as sentences, each with the numbers it cites."""
    return [(MARKER.sub("", s).replace(" .", ".").strip(), [int(n) for n in MARKER.findall(s)])
            for s in sentences(text)]


def verify(sections: Sequence[Mapping[str, Any]], citations: Sequence[Mapping[str, Any]],
           retrieved_by_section: Sequence[Iterable[str]], chunks: Mapping[str, str],
           answer: str = "") -> dict[str, Any]:
    """Check a brief written as prose with `[n]` markers (see `verify_sentences`); a marker
    `[?n]` (a number that named no passage given) is a problem of its own."""
    texts = [str(s.get("answer", "")) for s in sections]
    cited = [split_cited(t) for t in texts]
    report = verify_sentences(cited, citations, retrieved_by_section, chunks,
                              split_cited(answer) if answer else [])
    for index, text in [*enumerate(texts), (-1, answer)]:
        where = "answer" if index < 0 else f"section {index + 1}"
        for bad in re.findall(r"\[\?(\d+)\]", text):
            report["problems"].append({
                "where": where, "citation": f"?{bad}",
                "problem": "cites a source number the investigator was not given"})
    report["unsupported_sentences"] = [u for u in report["unsupported_sentences"]
                                       if "[?" not in u["sentence"]]
    report["verified"] = not report["problems"] and not report["unsupported_sentences"]
    return report


def verify_sentences(sections: Sequence[Sequence[tuple[str, Sequence[int]]]],
                     citations: Sequence[Mapping[str, Any]],
                     retrieved_by_section: Sequence[Iterable[str]], chunks: Mapping[str, str],
                     answer: Sequence[tuple[str, Sequence[int]]] = ()) -> dict[str, Any]:
    """Check a brief's citations and support, sentence by sentence.

    `sections[i]` are section i's sentences, each with the (brief-wide) citation numbers it
    rests on; `citations` map those numbers to chunk ids; `retrieved_by_section[i]` is what
    section i's investigator retrieved; `chunks` is the text of every cited chunk that exists
    in the corpus (a missing id does not exist). The overall `answer` may cite any passage
    retrieved for any section."""
    by_n = {int(c["n"]): c["chunk_id"] for c in citations}
    problems: list[dict[str, Any]] = []
    unsupported: list[dict[str, Any]] = []
    everything: set[str] = set()
    for got in retrieved_by_section:
        everything |= set(got)
    texts = [(i, sec, set(retrieved_by_section[i]) if i < len(retrieved_by_section) else set())
             for i, sec in enumerate(sections)]
    if answer:
        texts.append((-1, answer, everything))
    checked = 0
    for index, cited_sentences, retrieved in texts:
        where = "answer" if index < 0 else f"section {index + 1}"
        for sentence, cited in cited_sentences:
            if not cited:
                if content_words(sentence):
                    unsupported.append({"where": where, "sentence": sentence,
                                        "reason": "cites no source"})
                continue
            support: list[str] = []
            for n in cited:
                checked += 1
                chunk = by_n.get(n)
                if chunk is None:
                    problems.append({"where": where, "citation": n,
                                     "problem": "no such citation in the brief"})
                elif chunk not in chunks:
                    problems.append({"where": where, "citation": n, "chunk": chunk,
                                     "problem": "the cited chunk does not exist in the corpus"})
                elif chunk not in retrieved:
                    problems.append({"where": where, "citation": n, "chunk": chunk,
                                     "problem": "the cited chunk was not among the passages "
                                                "retrieved for this section"})
                else:
                    support.append(chunks[chunk])
            if not supported(sentence, support):
                unsupported.append({"where": where, "sentence": sentence,
                                    "reason": "the cited sources do not support it"})
    return {"verified": not problems and not unsupported, "citations_checked": checked,
            "problems": problems, "unsupported_sentences": unsupported}
