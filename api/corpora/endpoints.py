"""`/v1/corpora`: create corpora, upload documents (text, Markdown, HTML, PDF), search them.

HTTP only: extraction, chunking and BM25 retrieval are in `agents.corpus` (a document is
parsed in a child process under time and memory limits, `agents.parsing`), the queries in
`core.repositories.corpora`.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents import corpus as corpus_service
from agents import parsing
from agents.corpus import parse_content_type
from api.corpora import MULTIPART_OVERHEAD
from api.corpora.schemas import (
    CorpusCreate,
    CorpusDetail,
    CorpusList,
    CorpusOut,
    DocumentOut,
    SearchHit,
    SearchResults,
)
from api.deps import CurrentPrincipal, DbSession
from api.jobs.schemas import ErrorResponse
from api.responses import ERRORS, link
from core.db import read_session_factory, transaction
from core.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, UnsupportedMediaType
from core.models import Corpus, CorpusDocument
from core.repositories import corpora as corpus_repo
from core.repositories.corpora import SessionCorpusStore
from core.settings import get_settings

router = APIRouter(prefix="/v1/corpora", tags=["corpora"], responses=ERRORS)

_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "description": "The document: either a multipart/form-data upload (field `file`, "
                   "optional field `title`), or the raw bytes with the document's own "
                   "Content-Type. Its type is taken from the declared media type and the file "
                   "name's extension (.txt, .md, .html, .htm, .pdf); at most "
                   "AGENTQ_CORPUS_MAX_DOCUMENT_BYTES (10 MiB by default).",
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "The document, with its file name."},
                "title": {"type": "string", "maxLength": 300,
                          "description": "A title (default: the document's own, or its "
                                         "file name)."}}}},
        "text/plain": {"schema": {"type": "string"}},
        "text/markdown": {"schema": {"type": "string"}},
        "text/html": {"schema": {"type": "string"}},
        "application/pdf": {"schema": {"type": "string", "format": "binary"}},
    },
}


_CORPUS_LINKS = [
    ("GetCorpus", "/v1/corpora/{corpus_id}", "get", "Read the corpus"),
    ("UploadDocument", "/v1/corpora/{corpus_id}/documents", "post", "Add a document"),
    ("SearchCorpus", "/v1/corpora/{corpus_id}/search", "get", "Search the corpus"),
    ("DeleteCorpus", "/v1/corpora/{corpus_id}", "delete", "Delete the corpus"),
]


def _corpus_out(c: Corpus) -> CorpusOut:
    return CorpusOut(id=c.id, name=c.name, description=c.description,
                     document_count=c.document_count, chunk_count=c.chunk_count,
                     created_at=c.created_at, updated_at=c.updated_at)


def _document_out(d: CorpusDocument) -> DocumentOut:
    return DocumentOut(id=d.id, corpus_id=d.corpus_id, title=d.title, filename=d.filename,
                       content_type=d.content_type, size_bytes=d.size_bytes, sha256=d.sha256,
                       char_count=d.char_count, chunk_count=d.chunk_count,
                       created_at=d.created_at)


@router.post("", status_code=201, response_model=CorpusOut, responses={201: {
    "headers": {"Location": {"description": "The corpus's URL"}},
    "links": {name: link(path, method, text, corpus_id="$response.body#/id")
              for name, path, method, text in _CORPUS_LINKS}}})
def create_corpus(body: CorpusCreate, principal: CurrentPrincipal,
                  response: Response) -> CorpusOut:
    """Create an empty corpus; add documents with `POST /v1/corpora/{id}/documents`."""
    with transaction() as s:
        out = _corpus_out(corpus_repo.create_corpus(s, principal.tenant_id, body.name,
                                                    body.description))
    response.headers["Location"] = f"/v1/corpora/{out.id}"
    return out


@router.get("", response_model=CorpusList)
def list_corpora(
    session: DbSession,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> CorpusList:
    """The tenant's corpora, newest first."""
    rows, next_cursor = corpus_repo.list_corpora(session, principal.tenant_id, limit=limit,
                                                 cursor=cursor)
    return CorpusList(data=[_corpus_out(c) for c in rows], next_cursor=next_cursor)


@router.get("/{corpus_id}", response_model=CorpusDetail)
def get_corpus(corpus_id: str, session: DbSession, principal: CurrentPrincipal) -> CorpusDetail:
    """A corpus and its documents."""
    c = corpus_repo.get_corpus(session, principal.tenant_id, corpus_id)
    return CorpusDetail(**_corpus_out(c).model_dump(),
                        documents=[_document_out(d)
                                   for d in corpus_repo.list_documents(session, c.id)])


@router.delete("/{corpus_id}", status_code=204)
def delete_corpus(corpus_id: str, principal: CurrentPrincipal) -> Response:
    """Delete a corpus with all of its documents."""
    with transaction() as s:
        corpus_repo.delete_corpus(s, principal.tenant_id, corpus_id)
    return Response(status_code=204)


@dataclass(frozen=True)
class _Upload:
    data: bytes
    content_type: str | None
    filename: str | None
    title: str | None


def _content_length(request: Request) -> int | None:
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        return None


async def _read_upload(request: Request) -> _Upload:
    """The uploaded document, from a multipart form or from the raw body; 413 past the limit."""
    limit = corpus_service.max_document_bytes()
    too_large = PayloadTooLarge(f"the document is larger than {limit} bytes")
    declared = request.headers.get("content-type")
    media, _ = parse_content_type(declared)
    length = _content_length(request)
    if media == "multipart/form-data":
        if length is not None and length > limit + MULTIPART_OVERHEAD:
            raise too_large
        try:
            form = await request.form(max_files=1, max_fields=10)
        except StarletteHTTPException:
            raise
        except Exception as exc:
            raise InvalidInput("body: not a valid multipart/form-data body") from exc
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise InvalidInput("file: required: send the document as the multipart "
                                   "file field `file`, with a file name (curl -F "
                                   "file=@notes.md)")
            data = await file.read(limit + 1)
            if len(data) > limit:
                raise too_large
            title = form.get("title")
            return _Upload(data=data, content_type=file.content_type, filename=file.filename,
                           title=title if isinstance(title, str) else None)
        finally:
            await form.close()
    if media == "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(
            "send the document as multipart/form-data (field `file`) or as the raw body with "
            f"a Content-Type of {', '.join(corpus_service.ACCEPTED_TYPES)}")
    if length is not None and length > limit:
        raise too_large
    pieces: list[bytes] = []
    size = 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise too_large
        pieces.append(piece)
    return _Upload(data=b"".join(pieces), content_type=declared, filename=None, title=None)


def _check_corpus(tenant_id: str, corpus_id: str) -> None:
    with read_session_factory()() as s:
        if not corpus_repo.corpus_exists(s, tenant_id, corpus_id):
            raise NotFound(f"no corpus {corpus_id[:60]!r}")


_parse_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary())


def _parse_limiter() -> anyio.CapacityLimiter:
    """The running event loop's limit on parses at once (a limiter belongs to one loop)."""
    loop = asyncio.get_running_loop()
    total = get_settings().corpus_parse_concurrency
    limiter = _parse_limiters.get(loop)
    if limiter is None:
        limiter = _parse_limiters[loop] = anyio.CapacityLimiter(total)
    elif limiter.total_tokens != total:
        limiter.total_tokens = total
    return limiter


def _store(tenant_id: str, corpus_id: str,
           prepared: corpus_service.PreparedDocument) -> DocumentOut:
    try:
        with transaction() as s:
            out = _document_out(corpus_repo.add_document(s, tenant_id, corpus_id, prepared))
    except IntegrityError as exc:  # the same document uploaded twice at once
        raise Conflict("the corpus already holds this document",
                       code="duplicate_document") from exc
    return out


@router.post(
    "/{corpus_id}/documents", status_code=201, response_model=DocumentOut,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={201: {"headers": {"Location": {"description": "The corpus's URL"}},
                     "links": {"DeleteDocument": link(
                         "/v1/corpora/{corpus_id}/documents/{document_id}", "delete",
                         "Remove the document", corpus_id="$response.body#/corpus_id",
                         document_id="$response.body#/id")}},
               409: {"model": ErrorResponse,
                     "description": "The corpus already holds this document"},
               413: {"model": ErrorResponse,
                     "description": "The document is too large, or needs more memory to "
                                    "parse than the server allows"},
               415: {"model": ErrorResponse,
                     "description": "Not a document type accepted: text/plain, "
                                    "text/markdown, text/html, application/pdf"}})
async def upload_document(
    corpus_id: str,
    request: Request,
    response: Response,
    principal: CurrentPrincipal,
    title: Annotated[str | None, Query(
        max_length=300, description="A title (default: the document's own title, or its "
                                    "file name).")] = None,
    filename: Annotated[str | None, Query(
        max_length=300, description="The file name, for a raw-body upload; its extension "
                                    "tells the type when the Content-Type does not.")] = None,
) -> DocumentOut:
    """Add a document to a corpus: its text is extracted (HTML without scripts and navigation,
    PDF with pypdf), cut into passages of about 200 words and indexed for search. Parsing runs
    under a time and a memory limit: past them the answer is 422 (`parse_time_limit`) or 413
    (`parse_memory_limit`)."""
    await run_in_threadpool(_check_corpus, principal.tenant_id, corpus_id)
    upload = await _read_upload(request)
    # Parsed in a child process under time and memory limits, on a thread of its own: at
    # most AGENTQ_CORPUS_PARSE_CONCURRENCY at once, the rest wait without holding a thread.
    prepared = await anyio.to_thread.run_sync(partial(
        parsing.prepare_document_bounded, upload.data, declared_type=upload.content_type,
        filename=upload.filename or filename, title=upload.title or title),
        limiter=_parse_limiter())
    out = await run_in_threadpool(_store, principal.tenant_id, corpus_id, prepared)
    response.headers["Location"] = f"/v1/corpora/{corpus_id}"
    return out


@router.delete("/{corpus_id}/documents/{document_id}", status_code=204)
def delete_document(corpus_id: str, document_id: str, principal: CurrentPrincipal) -> Response:
    """Remove a document and its passages from a corpus."""
    with transaction() as s:
        corpus_repo.delete_document(s, principal.tenant_id, corpus_id, document_id)
    return Response(status_code=204)


@router.get("/{corpus_id}/search", response_model=SearchResults)
def search_corpus(
    corpus_id: str,
    session: DbSession,
    principal: CurrentPrincipal,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="The query.")],
    k: Annotated[int, Query(ge=1, le=50, description="How many passages at most.")] = 5,
) -> SearchResults:
    """The corpus's passages that best match the query (BM25), best first."""
    c = corpus_repo.get_corpus(session, principal.tenant_id, corpus_id)
    hits = corpus_service.search(SessionCorpusStore(session), c.id, q, k)
    return SearchResults(query=q, data=[
        SearchHit(chunk_id=h.passage.chunk_id, document_id=h.passage.document_id,
                  document_title=h.passage.document_title, ordinal=h.ordinal,
                  char_start=h.char_start, char_end=h.char_end, score=h.passage.score,
                  snippet=corpus_service.snippet(h.passage.text, q), text=h.passage.text)
        for h in hits])
