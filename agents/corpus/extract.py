"""Documents turned into text: content types, and extraction from plain text, Markdown, HTML
(Beautiful Soup over lxml, without scripts, styles, navigation and other page furniture) and PDF
(pypdf)."""

from __future__ import annotations

import codecs
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from core.errors import AgentqError, InvalidInput, UnsupportedMediaType
from core.settings import get_settings


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
