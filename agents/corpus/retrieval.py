"""Lexical retrieval: Okapi BM25 (`bm25s`) over a corpus's chunks, with English stop words
removed and Snowball stemming (PyStemmer). The index of a corpus is built from its chunks on first
use and kept in this process, keyed by the corpus's revision, which every change to its documents
bumps; a query after a change rebuilds it. Search reads a corpus through a `CorpusStore`
(revision, chunks, chunk texts), so nothing here opens a database session."""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import bm25s
import numpy as np
import Stemmer

from agents.base import Passage
from core.settings import get_settings

# bm25s sets its own logger to DEBUG; its progress notes are of no use here.
logging.getLogger("bm25s").setLevel(logging.WARNING)


# --- Retrieval ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchHit:
    passage: Passage
    ordinal: int
    char_start: int
    char_end: int


_TOKEN = re.compile(r"\w\w+")
_STOPWORDS = frozenset(bm25s.stopwords.STOPWORDS_EN_PLUS)
_stemmers = threading.local()


def _stem(words: list[str]) -> list[str]:
    stemmer = getattr(_stemmers, "english", None)  # Stemmer objects are not thread-safe
    if stemmer is None:
        stemmer = _stemmers.english = Stemmer.Stemmer("english")
    return list(stemmer.stemWords(words))


def tokenize(text: str) -> list[str]:
    """Lower-cased words of two or more characters, without English stop words, stemmed."""
    return _stem([w for w in _TOKEN.findall(text.lower()) if w not in _STOPWORDS])


@dataclass(frozen=True)
class CorpusRevision:
    """What a corpus's index was built at; a change to either means it is rebuilt."""

    revision: int
    chunk_count: int


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as the index is built from it."""

    chunk_id: str
    document_id: str
    document_title: str
    text: str
    ordinal: int
    char_start: int
    char_end: int


class CorpusStore(Protocol):
    """Where search reads a corpus (`core.repositories.corpora.SessionCorpusStore`)."""

    def revision(self, corpus_id: str) -> CorpusRevision | None:
        """None when there is no such corpus (or none this store may read)."""
        ...

    def chunks(self, corpus_id: str) -> Iterable[StoredChunk]:
        """Every chunk of the corpus, in document order."""
        ...

    def texts(self, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
        """The text of these chunks of the corpus, by chunk id."""
        ...


@dataclass
class _Index:
    """A corpus's BM25 index and what locates each chunk; chunk texts stay in the store."""

    state: CorpusRevision
    bm25: Any  # bm25s.BM25, or None for a corpus without chunks
    chunk_ids: list[str] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    ordinals: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=dict)  # by document id


_cache: OrderedDict[str, _Index] = OrderedDict()
_cache_lock = threading.Lock()


def _build_index(store: CorpusStore, corpus_id: str, state: CorpusRevision) -> _Index:
    index = _Index(state, None)
    tokens: list[list[str]] = []
    for chunk in store.chunks(corpus_id):
        index.chunk_ids.append(chunk.chunk_id)
        index.document_ids.append(chunk.document_id)
        index.ordinals.append(chunk.ordinal)
        index.starts.append(chunk.char_start)
        index.ends.append(chunk.char_end)
        index.titles[chunk.document_id] = chunk.document_title
        # The title's words count as the chunk's own: they say what the document is about.
        tokens.append(tokenize(f"{chunk.document_title}\n{chunk.text}"))
    if any(tokens):
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        index.bm25 = bm25
    return index


def _get_index(store: CorpusStore, corpus_id: str) -> _Index | None:
    state = store.revision(corpus_id)
    with _cache_lock:
        if state is None:
            _cache.pop(corpus_id, None)
            return None
        index = _cache.get(corpus_id)
        if index is not None and index.state == state:
            _cache.move_to_end(corpus_id)
            return index
    index = _build_index(store, corpus_id, state)
    with _cache_lock:
        _cache[corpus_id] = index
        _cache.move_to_end(corpus_id)
        while len(_cache) > max(1, get_settings().corpus_index_cache_size):
            _cache.popitem(last=False)
    return index


def search(store: CorpusStore, corpus_id: str, query: str, k: int = 5) -> list[SearchHit]:
    """The corpus's `k` chunks that best match the query by BM25, best first; chunks that
    share no word with the query are never returned, nor is anything of a corpus the store
    does not hold."""
    if k < 1:
        return []
    index = _get_index(store, corpus_id)
    if index is None or index.bm25 is None:
        return []
    query_tokens = [t for t in tokenize(query) if t in index.bm25.vocab_dict]
    if not query_tokens:
        return []
    scores = np.asarray(index.bm25.get_scores(query_tokens), dtype=np.float64)
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # Best first; ties in document order.
    order = [i for i in sorted((int(i) for i in top), key=lambda i: (-scores[i], i))
             if scores[i] > 0]
    if not order:
        return []
    texts = store.texts(corpus_id, [index.chunk_ids[i] for i in order])
    hits: list[SearchHit] = []
    for i in order:
        text = texts.get(index.chunk_ids[i])
        if text is None:
            continue  # deleted since the index was built
        hits.append(SearchHit(
            passage=Passage(chunk_id=index.chunk_ids[i], document_id=index.document_ids[i],
                            document_title=index.titles[index.document_ids[i]], text=text,
                            score=round(float(scores[i]), 4)),
            ordinal=index.ordinals[i], char_start=index.starts[i], char_end=index.ends[i]))
    return hits


def retrieve(store: CorpusStore, corpus_id: str, query: str, k: int = 4) -> list[Passage]:
    """The `k` passages of the corpus that best answer the query (BM25), best first; none for
    a corpus the store does not hold or a query that shares no word with the corpus."""
    return [hit.passage for hit in search(store, corpus_id, query, k)]


def snippet(text: str, query: str, width: int = 240) -> str:
    """About `width` characters of the text around the first word that matches the query."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    start = 0
    stems = sorted(set(tokenize(query)), key=len, reverse=True)
    if stems:
        found = re.search(r"\b(?:" + "|".join(re.escape(s) for s in stems) + r")", text,
                          re.IGNORECASE)
        if found:
            start = max(0, min(found.start() - width // 4, len(text) - width))
    if start > 0:
        space = text.find(" ", start, start + 30)
        if space >= 0:
            start = space + 1
    end = min(len(text), start + width)
    if end < len(text):
        space = text.rfind(" ", start, end)
        if space > start:
            end = space
    return ("\u2026" if start > 0 else "") + text[start:end] + (
        "\u2026" if end < len(text) else "")
