"""Text cut into chunks of about 150-250 words on paragraph and sentence boundaries, with a small
overlap where a chunk ends inside a paragraph; and an uploaded document checked, extracted and
chunked, ready to store."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

from agents.corpus.extract import (
    PDF,
    clean_label,
    detect_type,
    extract_text,
    max_document_bytes,
    parse_content_type,
)
from core.errors import InvalidInput, PayloadTooLarge

# --- Chunking ----------------------------------------------------------------------------------

CHUNK_MIN_WORDS = 150  # a chunk may end at a paragraph's end once it has this many words
CHUNK_TARGET_WORDS = 200  # ... and ends at the next sentence's end past this many
CHUNK_MAX_WORDS = 250  # never more
CHUNK_OVERLAP_WORDS = 40  # sentences repeated from a chunk that ended inside a paragraph
CHUNK_TAIL_WORDS = 50  # a document's last words, fewer than this, join the chunk before them


@dataclass(frozen=True)
class ChunkSpan:
    start: int
    end: int
    text: str


class _Unit(NamedTuple):
    start: int
    end: int
    words: int
    paragraph_end: bool


_WORDS = re.compile(r"\S+")
# A run of sentence-ending marks is tried once, from its start (linear on long runs).
_SENTENCE_END = re.compile(r"(?<![.!?\u2026])[.!?\u2026]++[\"'\u201d\u2019)\]]*+(?=\s)")


def _units(text: str) -> list[_Unit]:
    """Sentences (or runs of at most the target size of a very long one), with their spans."""
    units: list[_Unit] = []
    bounds = [0] + [p for m in re.finditer(r"\n\s*\n", text) for p in (m.start(), m.end())]
    bounds.append(len(text))
    for ps, pe in zip(bounds[0::2], bounds[1::2], strict=True):
        words = [(m.start(), m.end()) for m in _WORDS.finditer(text, ps, pe)]
        if not words:
            continue
        ends = {m.end() for m in _SENTENCE_END.finditer(text, ps, pe)}
        sentences: list[list[tuple[int, int]]] = [[]]
        for w in words:
            sentences[-1].append(w)
            if w[1] in ends:
                sentences.append([])
        sentences = [s for s in sentences if s]
        for si, sentence in enumerate(sentences):
            last_sentence = si == len(sentences) - 1
            pieces = [sentence[i:i + CHUNK_TARGET_WORDS]
                      for i in range(0, len(sentence), CHUNK_TARGET_WORDS)]
            for pi, piece in enumerate(pieces):
                units.append(_Unit(piece[0][0], piece[-1][1], len(piece),
                                   last_sentence and pi == len(pieces) - 1))
    return units


def chunk_text(text: str) -> list[ChunkSpan]:
    """Cut text into chunks of about 150-250 words at paragraph or sentence ends; a chunk that
    ends inside a paragraph repeats its last sentence or two at the start of the next one."""
    chunks: list[ChunkSpan] = []
    current: list[_Unit] = []
    words = 0
    fresh = 0  # units in `current` not already in the previous chunk

    def emit() -> None:
        nonlocal current, words, fresh
        start, end = current[0].start, current[-1].end
        chunks.append(ChunkSpan(start, end, text[start:end]))
        carried: list[_Unit] = []
        if not current[-1].paragraph_end:
            for unit in reversed(current[1:]):
                if sum(u.words for u in carried) + unit.words > CHUNK_OVERLAP_WORDS:
                    break
                carried.insert(0, unit)
        current, words, fresh = carried, sum(u.words for u in carried), 0

    units = _units(text)
    # Words after each unit: a short tail joins the chunk before it rather than stand alone.
    left = [0] * len(units)
    for i in range(len(units) - 2, -1, -1):
        left[i] = left[i + 1] + units[i + 1].words
    for i, unit in enumerate(units):
        if current and words + unit.words > CHUNK_MAX_WORDS:
            if fresh:
                emit()
            if words + unit.words > CHUNK_MAX_WORDS:
                current, words = [], 0
        current.append(unit)
        words += unit.words
        fresh += 1
        short_tail = 0 < left[i] < CHUNK_TAIL_WORDS and words + left[i] <= CHUNK_MAX_WORDS
        if (words >= CHUNK_TARGET_WORDS or (unit.paragraph_end and words >= CHUNK_MIN_WORDS)
                ) and not short_tail:
            emit()
    if fresh:
        emit()
    return chunks


# --- Ingestion ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedDocument:
    """A document turned into chunks, ready to store."""

    title: str
    filename: str | None
    content_type: str
    size_bytes: int
    sha256: str
    char_count: int
    chunks: list[ChunkSpan]


def prepare_document(data: bytes, *, declared_type: str | None, filename: str | None = None,
                     title: str | None = None) -> PreparedDocument:
    """Check, extract and chunk an uploaded document (no database work): 413 when too large,
    415 for a type not accepted, 422 when empty, undecodable or without text."""
    limit = max_document_bytes()
    if len(data) > limit:
        raise PayloadTooLarge(f"the document is larger than {limit} bytes")
    if not data:
        raise InvalidInput("the document is empty")
    filename = clean_label(filename)
    content_type = detect_type(declared_type, filename, data[:1024])
    _, params = parse_content_type(declared_type)
    extracted = extract_text(data, content_type, params.get("charset"))
    if not extracted.text:
        raise InvalidInput("no text found in the document"
                           + (" (a scanned PDF needs OCR first)" if content_type == PDF else ""))
    chunks = chunk_text(extracted.text)
    name = clean_label(title) or extracted.title or (
        clean_label(PurePosixPath(filename).stem) if filename else None) or clean_label(
        extracted.text.split("\n", 1)[0], 80) or "Untitled"
    return PreparedDocument(
        title=name, filename=filename, content_type=content_type, size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), char_count=len(extracted.text), chunks=chunks)
