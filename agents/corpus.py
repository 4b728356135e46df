"""Corpora: a tenant's documents, turned into text, cut into passages and searched with BM25.

Ingestion takes plain text, Markdown, HTML (to text with Beautiful Soup over lxml, without
scripts, styles, navigation and other page furniture) and PDF (text extraction with pypdf). The
text is cut into chunks of about 150-250 words on paragraph and sentence boundaries, with a
small overlap where a chunk ends inside a paragraph; `core.repositories.corpora` stores them.

Retrieval is lexical: Okapi BM25 (`bm25s`) over the corpus's chunks, with English stop words
removed and Snowball stemming (PyStemmer). The index of a corpus is built from its chunks on
first use and kept in this process, keyed by the corpus's revision, which every change to its
documents bumps; a query after a change rebuilds it. Search reads a corpus through a
`CorpusStore` (revision, chunks, chunk texts), so nothing here opens a database session.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple, Protocol

import bm25s
import numpy as np
import Stemmer

from agents.base import Passage
from core.errors import AgentqError, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from core.settings import get_settings

# bm25s sets its own logger to DEBUG; its progress notes are of no use here.
logging.getLogger("bm25s").setLevel(logging.WARNING)


def max_document_bytes() -> int:
    """The largest document accepted (`AGENTQ_CORPUS_MAX_DOCUMENT_BYTES`)."""
    return get_settings().corpus_max_document_bytes


# --- Document types ----------------------------------------------------------------------------

TEXT = "text/plain"
MARKDOWN = "text/markdown"
HTML = "text/html"
PDF = "application/pdf"
ACCEPTED_TYPES: tuple[str, ...] = (TEXT, MARKDOWN, HTML, PDF)
ACCEPTED_EXTENSIONS: dict[str, str] = {
    ".txt": TEXT, ".text": TEXT, ".md": MARKDOWN, ".markdown": MARKDOWN, ".html": HTML,
    ".htm": HTML, ".xhtml": HTML, ".pdf": PDF,
}
_ALIASES = {"text/x-markdown": MARKDOWN, "text/md": MARKDOWN, "application/xhtml+xml": HTML,
            "application/x-pdf": PDF}
# Declared types that say nothing: the file's extension (or its first bytes) decides.
_GENERIC = {"", "application/octet-stream", "binary/octet-stream", "application/unknown"}
_ACCEPTED_LIST = ", ".join(ACCEPTED_TYPES)


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """`text/plain; charset=utf-8` -> ("text/plain", {"charset": "utf-8"})."""
    if not value:
        return "", {}
    media, *rest = value.split(";")
    params: dict[str, str] = {}
    for part in rest:
        key, sep, val = part.partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"')
    return media.strip().lower(), params


def detect_type(declared: str | None, filename: str | None, head: bytes = b"") -> str:
    """The document's type, from its declared media type and its file name's extension (and,
    when neither tells, a PDF's signature); anything else is refused with 415."""
    media, _ = parse_content_type(declared)
    media = _ALIASES.get(media, media)
    by_extension = ACCEPTED_EXTENSIONS.get(PurePosixPath(filename or "").suffix.lower())
    if media in ACCEPTED_TYPES:
        # Markdown is sent as text/plain by many clients; its extension says more.
        if media == TEXT and by_extension == MARKDOWN:
            return MARKDOWN
        return media
    if media in _GENERIC:
        if by_extension is not None:
            return by_extension
        if head.lstrip()[:5] == b"%PDF-":
            return PDF
        raise UnsupportedMediaType(
            "cannot tell the document's type: send it with a Content-Type of "
            f"{_ACCEPTED_LIST}, or a file name ending in "
            f"{', '.join(ACCEPTED_EXTENSIONS)}")
    raise UnsupportedMediaType(f"unsupported document type {media[:100]!r}: accepted types "
                               f"are {_ACCEPTED_LIST}")


# --- Text extraction ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Extracted:
    content_type: str
    title: str | None
    text: str


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")


def normalize_text(text: str) -> str:
    """Unix line ends, no control characters, single spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Lone surrogates (a broken PDF font map can yield them) cannot be stored as UTF-8.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def clean_label(value: str | None, max_length: int = 300) -> str | None:
    """A title or file name fit to store and show: one line, printable, not too long."""
    if value is None:
        return None
    value = value.encode("utf-8", "replace").decode("utf-8")
    value = " ".join(_CONTROL.sub(" ", value).split())[:max_length].strip()
    return value or None


def _decode(data: bytes, charset: str | None) -> str:
    if charset:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            raise InvalidInput(f"unknown charset {charset[:40]!r}") from None
        try:
            return data.decode(codec)
        except LookupError:  # a codec of bytes, not of text (rot13, zlib, hex)
            raise InvalidInput(f"charset {charset[:40]!r} is not a text encoding") from None
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"the document is not valid {codec} text: {exc.reason} at "
                               f"byte {exc.start}") from None
        except UnicodeError as exc:  # punycode, idna, undefined
            raise InvalidInput(f"the document is not valid {codec} text: {exc}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the document is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "declare its encoding as `; charset=...` in its Content-Type") from None


# Markdown markup to remove. Every pattern stays linear in the input's length (no unbounded
# scan that could restart at each of many openers), since documents come from anyone.
_MD_LINE_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^ {0,3}#{1,6}[ \t]+"), ""),  # heading marks
    (re.compile(r"^[ \t]*(?:>[ \t]?)+"), ""),  # block quotes
    (re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+"), ""),  # list markers
]
_MD_INLINE_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"!\[([^\[\]\n]{0,500})\]\([^()\n]{0,2000}\)"), r"\1"),  # images
    (re.compile(r"\[([^\[\]\n]{1,500})\]\([^()\n]{0,2000}\)"), r"\1"),  # links
    (re.compile(r"\[([^\[\]\n]{1,500})\]\[[^\[\]\n]{0,500}\]"), r"\1"),  # reference links
    (re.compile(r"</?[A-Za-z][^<>\n]{0,500}>"), ""),  # inline HTML tags
    (re.compile(r"[ \t]*\|[ \t]*"), " "),  # table cells
    (re.compile(r"\*\*(?=\S)([^*\n]{1,500}?)(?<=\S)\*\*"), r"\1"),  # strong
    (re.compile(r"(?<!\w)__(?=\S)([^_\n]{1,500}?)(?<=\S)__(?!\w)"), r"\1"),
    (re.compile(r"(?<![\w*])\*(?=\S)([^*\n]{1,500}?)(?<=\S)\*(?![\w*])"), r"\1"),  # emphasis
    (re.compile(r"`+"), ""),
]
_MD_LINK_DEFINITION = re.compile(r" {0,3}\[[^\[\]\n]{1,500}\]:[ \t]+\S")
_MD_HEADING = re.compile(r" {0,3}#{1,2}[ \t]+(\S[^\n]{0,300})")


def _drop_html_comments(text: str) -> str:
    parts: list[str] = []
    pos = 0
    while True:
        start = text.find("<!--", pos)
        end = text.find("-->", start + 4) if start >= 0 else -1
        if end < 0:
            parts.append(text[pos:])
            return "".join(parts)
        parts.append(text[pos:start])
        pos = end + 3


def markdown_to_text(source: str) -> tuple[str | None, str]:
    """Markdown's text with its markup lightly removed, and its first heading as the title."""
    source = _drop_html_comments(source.replace("\r\n", "\n").replace("\r", "\n"))
    lines = source.split("\n")
    if lines and lines[0].strip() == "---":  # front matter
        for i in range(1, len(lines)):
            if lines[i].strip() in ("---", "..."):
                lines = lines[i + 1:]
                break
    title: str | None = None
    kept: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            continue  # a code fence (the code stays)
        if len(stripped) >= 3 and set(stripped) <= set("-*_ \t") and sum(
                c in "-*_" for c in stripped) >= 3:
            continue  # a rule
        if "-" in stripped and set(stripped) <= set("|:- \t") and "|" in stripped:
            continue  # a table's header separator
        if _MD_LINK_DEFINITION.match(line):
            continue
        if title is None:
            heading = _MD_HEADING.match(line)
            if heading:
                title = heading.group(1).rstrip(" \t#")
        for pattern, replacement in _MD_LINE_RULES:
            line = pattern.sub(replacement, line, count=1)
        kept.append(line)
    text = "\n".join(kept)
    for pattern, replacement in _MD_INLINE_RULES:
        text = pattern.sub(replacement, text)
    return title or None, text


# Elements that hold no document text: scripts, styles and page furniture.
_HTML_DROP_SET = frozenset({
    "script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form",
    "button", "select", "textarea", "svg", "canvas", "iframe", "object", "embed", "audio",
    "video", "map", "dialog", "menu", "head"})
_HTML_DROP_ROLES = {"navigation", "banner", "contentinfo", "search", "menu", "menubar",
                    "complementary", "dialog"}
_HTML_BLOCKS = frozenset({
    "p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul",
    "ol", "dl", "dt", "dd", "table", "tr", "blockquote", "pre", "figure", "figcaption", "hr",
    "address", "details", "summary", "caption", "body"})
_PARA_MARK = "\ue000"
_LINE_MARK = "\ue001"


def html_to_text(data: bytes, charset: str | None = None) -> tuple[str | None, str]:
    """The text a reader sees on an HTML page, without its scripts, styles and navigation; and
    its title."""
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import PreformattedString, Script, Stylesheet, TemplateString

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bs4 warns about input that looks like a URL
        soup = BeautifulSoup(data, "lxml", from_encoding=charset or None)
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if isinstance(title_tag, Tag) else None
    heading: str | None = None
    parts: list[str] = []
    # One pass over the tree with a stack of its own (pages can nest deeply), skipping what is
    # not text; block elements end paragraphs.
    stack: list[Any] = [soup]
    while stack:
        node = stack.pop()
        if isinstance(node, str) and not isinstance(node, NavigableString):
            parts.append(node)  # a mark pushed below
            continue
        if isinstance(node, NavigableString):
            if not isinstance(node, PreformattedString | Script | Stylesheet | TemplateString):
                parts.append(str(node))
            continue
        if not isinstance(node, Tag):
            continue
        name = (node.name or "").lower()
        if name in _HTML_DROP_SET:
            continue
        role = str(node.attrs.get("role") or "").lower()
        if role in _HTML_DROP_ROLES or "hidden" in node.attrs or str(
                node.attrs.get("aria-hidden") or "").lower() == "true":
            continue
        if name == "h1" and heading is None:
            heading = node.get_text(" ", strip=True)
        if name == "br":
            parts.append(_LINE_MARK)
            continue
        if name in _HTML_BLOCKS:
            parts.append(_PARA_MARK)
            stack.append(_PARA_MARK)
        elif name in ("td", "th"):
            stack.append(" ")
        stack.extend(reversed(node.contents))
    text = "".join(parts)
    # Whitespace in HTML source is one space; the marks say where lines and paragraphs end.
    text = re.sub(r"\s+", " ", text)
    text = re.sub(rf" ?{_PARA_MARK}[ {_PARA_MARK}{_LINE_MARK}]*", "\n\n", text)
    text = re.sub(rf" ?{_LINE_MARK} ?", "\n", text)
    return title or heading, text


def pdf_to_text(data: bytes, max_chars: int) -> tuple[str | None, str]:
    """The text of a PDF's pages (pypdf), and its title from the document information."""
    from pypdf import PdfReader

    if b"%PDF-" not in data[:1024]:
        raise InvalidInput("the document is not a PDF (no %PDF- header)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                opened = bool(reader.decrypt(""))
            except Exception:
                opened = False
            if not opened:
                raise InvalidInput("the PDF is encrypted; upload a copy without a password")
        pages: list[str] = []
        total = 0
        for page in reader.pages:
            text = page.extract_text() or ""
            total += len(text)
            if total > max_chars:
                raise InvalidInput(f"the document's text is longer than {max_chars} characters")
            pages.append(text)
        title: str | None = None
        try:
            meta = reader.metadata
            title = str(meta.title) if meta is not None and meta.title else None
        except Exception:
            title = None
    except AgentqError:
        raise
    except Exception as exc:  # pypdf raises many kinds of error on a damaged file
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InvalidInput(f"could not read the PDF: {detail}") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    # Words hyphenated across a line end.
    text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)
    return title, text


def _heading_line(text: str) -> str | None:
    """A plain text's first line, when it reads as a title: short, alone in its paragraph and
    not ending like a sentence."""
    match = re.match(r"\s*([^\n]{1,100})\n[ \t]*\n", text.replace("\r\n", "\n"))
    if match is None or match.group(1).rstrip()[-1:] in ".!?:;,":
        return None
    return match.group(1)


def extract_text(data: bytes, content_type: str, charset: str | None = None) -> Extracted:
    """The text of a document of an accepted type (see `detect_type`), normalized."""
    max_chars = get_settings().corpus_max_document_chars
    if content_type == PDF:
        title, text = pdf_to_text(data, max_chars)
    elif content_type == HTML:
        title, text = html_to_text(data, charset)
    elif content_type == MARKDOWN:
        title, text = markdown_to_text(_decode(data, charset))
    elif content_type == TEXT:
        text = _decode(data, charset)
        title = _heading_line(text)
    else:
        raise UnsupportedMediaType(f"unsupported document type {content_type!r}: accepted "
                                   f"types are {_ACCEPTED_LIST}")
    text = normalize_text(text)
    if len(text) > max_chars:
        raise InvalidInput(f"the document's text is longer than {max_chars} characters")
    return Extracted(content_type=content_type, title=clean_label(title), text=text)


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
