"""Corpora in the database: corpora, their documents and chunks.

Every query on the corpus tables is here. `SessionCorpusStore` is the store that
`agents.corpus.search` and `agents.corpus.retrieve` read a corpus through.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from agents.corpus import CorpusRevision, PreparedDocument, StoredChunk
from core.errors import Conflict, NotFound
from core.ids import new_id
from core.models import Corpus, CorpusChunk, CorpusDocument, utcnow
from core.pagination import decode_cursor, encode_cursor

_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def create_corpus(session: Session, tenant_id: str, name: str,
                  description: str | None = None) -> Corpus:
    now = utcnow()
    corpus = Corpus(id=new_id("cor"), tenant_id=tenant_id, name=name, description=description,
                    document_count=0, chunk_count=0, revision=0, created_at=now, updated_at=now)
    session.add(corpus)
    session.flush()
    return corpus


def get_corpus(session: Session, tenant_id: str, corpus_id: str) -> Corpus:
    """The tenant's corpus; 404 for a corpus of another tenant, as for one that does not exist."""
    corpus = session.get(Corpus, corpus_id) if _ID.fullmatch(corpus_id) else None
    if corpus is None or corpus.tenant_id != tenant_id:
        raise NotFound(f"no corpus {corpus_id[:60]!r}")
    return corpus


def corpus_exists(session: Session, tenant_id: str, corpus_id: str) -> bool:
    """Whether the tenant has a corpus with this id."""
    if not _ID.fullmatch(corpus_id):
        return False
    return session.scalar(select(Corpus.id).where(
        Corpus.id == corpus_id, Corpus.tenant_id == tenant_id)) is not None


def list_corpora(session: Session, tenant_id: str, *, limit: int, cursor: str | None = None
                 ) -> tuple[list[Corpus], str | None]:
    """The tenant's corpora, newest first; keyset pagination with an opaque cursor."""
    query = select(Corpus).where(Corpus.tenant_id == tenant_id)
    if cursor:
        created, corpus_id = decode_cursor(cursor)
        query = query.where((Corpus.created_at < created)
                            | ((Corpus.created_at == created) & (Corpus.id < corpus_id)))
    rows = list(session.scalars(query.order_by(Corpus.created_at.desc(), Corpus.id.desc())
                                .limit(limit + 1)))
    next_cursor = (encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
                   if len(rows) > limit else None)
    return rows[:limit], next_cursor


def list_documents(session: Session, corpus_id: str) -> list[CorpusDocument]:
    return list(session.scalars(
        select(CorpusDocument).where(CorpusDocument.corpus_id == corpus_id)
        .order_by(CorpusDocument.created_at, CorpusDocument.id)))


def add_document(session: Session, tenant_id: str, corpus_id: str,
                 prepared: PreparedDocument) -> CorpusDocument:
    """Store a prepared document and its chunks; 409 if the corpus already holds the same
    bytes."""
    if not _ID.fullmatch(corpus_id):
        raise NotFound(f"no corpus {corpus_id[:60]!r}")
    # The update comes first: it locks the corpus's row, so that concurrent uploads of the same
    # document to it cannot both pass the check below.
    bumped = session.execute(
        update(Corpus)
        .where(Corpus.id == corpus_id, Corpus.tenant_id == tenant_id)
        .values(document_count=Corpus.document_count + 1,
                chunk_count=Corpus.chunk_count + len(prepared.chunks),
                revision=Corpus.revision + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False))
    if getattr(bumped, "rowcount", 0) != 1:
        raise NotFound(f"no corpus {corpus_id[:60]!r}")
    existing = session.scalar(select(CorpusDocument.id).where(
        CorpusDocument.corpus_id == corpus_id, CorpusDocument.sha256 == prepared.sha256))
    if existing is not None:
        raise Conflict(f"the corpus already holds this document, as {existing}",
                       code="duplicate_document")
    doc = CorpusDocument(
        id=new_id("doc"), corpus_id=corpus_id, title=prepared.title,
        filename=prepared.filename, content_type=prepared.content_type,
        size_bytes=prepared.size_bytes, sha256=prepared.sha256,
        char_count=prepared.char_count, chunk_count=len(prepared.chunks), created_at=utcnow())
    session.add(doc)
    session.flush()
    if prepared.chunks:
        session.execute(insert(CorpusChunk), [
            {"id": new_id("chk"), "corpus_id": corpus_id, "document_id": doc.id,
             "ordinal": n, "text": c.text, "char_start": c.start, "char_end": c.end}
            for n, c in enumerate(prepared.chunks)])
    return doc


def _lock_corpus(session: Session, tenant_id: str, corpus_id: str) -> None:
    """Bump the corpus's revision, which also locks its row until the transaction ends (writes
    to one corpus take turns); 404 when the tenant has no such corpus."""
    if not _ID.fullmatch(corpus_id):
        raise NotFound(f"no corpus {corpus_id[:60]!r}")
    bumped = session.execute(
        update(Corpus).where(Corpus.id == corpus_id, Corpus.tenant_id == tenant_id)
        .values(revision=Corpus.revision + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False))
    if getattr(bumped, "rowcount", 0) != 1:
        raise NotFound(f"no corpus {corpus_id[:60]!r}")


def delete_document(session: Session, tenant_id: str, corpus_id: str, document_id: str) -> None:
    """Remove a document and its chunks from the tenant's corpus."""
    _lock_corpus(session, tenant_id, corpus_id)
    doc = session.execute(
        select(CorpusDocument.id, CorpusDocument.chunk_count)
        .where(CorpusDocument.id == document_id, CorpusDocument.corpus_id == corpus_id)
    ).first() if _ID.fullmatch(document_id) else None
    if doc is None:
        raise NotFound(f"no document {document_id[:60]!r} in corpus {corpus_id}")
    session.execute(delete(CorpusChunk).where(CorpusChunk.document_id == doc[0])
                    .execution_options(synchronize_session=False))
    session.execute(delete(CorpusDocument).where(CorpusDocument.id == doc[0])
                    .execution_options(synchronize_session=False))
    session.execute(
        update(Corpus).where(Corpus.id == corpus_id)
        .values(document_count=Corpus.document_count - 1,
                chunk_count=Corpus.chunk_count - int(doc[1]))
        .execution_options(synchronize_session=False))


def delete_corpus(session: Session, tenant_id: str, corpus_id: str) -> None:
    """Delete the tenant's corpus with all of its documents and chunks."""
    _lock_corpus(session, tenant_id, corpus_id)
    for table in (CorpusChunk, CorpusDocument):
        session.execute(delete(table).where(table.corpus_id == corpus_id)
                        .execution_options(synchronize_session=False))
    session.execute(delete(Corpus).where(Corpus.id == corpus_id)
                    .execution_options(synchronize_session=False))



def corpus_revision(session: Session, corpus_id: str, tenant_id: str | None = None
                    ) -> CorpusRevision | None:
    """The corpus's revision and chunk count; None when there is no such corpus (of this
    tenant, when one is given)."""
    if not _ID.fullmatch(corpus_id):
        return None
    query = select(Corpus.revision, Corpus.chunk_count).where(Corpus.id == corpus_id)
    if tenant_id is not None:
        query = query.where(Corpus.tenant_id == tenant_id)
    row = session.execute(query).first()
    return None if row is None else CorpusRevision(int(row[0]), int(row[1]))


def corpus_chunks(session: Session, corpus_id: str) -> Iterator[StoredChunk]:
    """Every chunk of the corpus with its document's title, in document order."""
    rows = session.execute(
        select(CorpusChunk.id, CorpusChunk.document_id, CorpusDocument.title, CorpusChunk.text,
               CorpusChunk.ordinal, CorpusChunk.char_start, CorpusChunk.char_end)
        .join(CorpusDocument, CorpusDocument.id == CorpusChunk.document_id)
        .where(CorpusChunk.corpus_id == corpus_id)
        .order_by(CorpusDocument.created_at, CorpusDocument.id, CorpusChunk.ordinal)
        .execution_options(yield_per=2000))
    for chunk_id, document_id, title, text, ordinal, start, end in rows:
        yield StoredChunk(chunk_id=chunk_id, document_id=document_id, document_title=title,
                          text=text, ordinal=ordinal, char_start=start, char_end=end)


def chunk_texts(session: Session, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
    """The text of these chunks of the corpus, by chunk id; ids not in it are left out."""
    if not chunk_ids:
        return {}
    return {chunk_id: text for chunk_id, text in session.execute(
        select(CorpusChunk.id, CorpusChunk.text).where(
            CorpusChunk.corpus_id == corpus_id, CorpusChunk.id.in_(set(chunk_ids))))}


def document_text(session: Session, corpus_id: str, document_id: str
                  ) -> tuple[str, str] | None:
    """A document of the corpus as its title and extracted text, rebuilt from its chunks
    (which overlap a little where a chunk ends inside a paragraph); None when the corpus holds
    no such document."""
    if not _ID.fullmatch(document_id):
        return None
    title = session.scalar(select(CorpusDocument.title).where(
        CorpusDocument.id == document_id, CorpusDocument.corpus_id == corpus_id))
    if title is None:
        return None
    parts: list[str] = []
    end = 0
    for text, start, stop in session.execute(
            select(CorpusChunk.text, CorpusChunk.char_start, CorpusChunk.char_end)
            .where(CorpusChunk.document_id == document_id).order_by(CorpusChunk.ordinal)):
        if start >= end:
            # What lay between two chunks was white space: a paragraph break or a space.
            gap = "" if not parts else " " if start - end <= 1 else "\n\n"
            parts.append(gap + text)
        elif stop > end:  # the overlap is there already
            parts.append(text[end - start:])
        end = max(end, stop)
    return str(title), "".join(parts)


class SessionCorpusStore:
    """`agents.corpus.CorpusStore` over a session. With a `tenant_id`, only that tenant's
    corpora can be read: another's is as one that does not exist."""

    def __init__(self, session: Session, tenant_id: str | None = None) -> None:
        self._session = session
        self._tenant_id = tenant_id
        self._readable: dict[str, bool] = {}

    def _may_read(self, corpus_id: str) -> bool:
        if self._tenant_id is None:
            return True
        known = self._readable.get(corpus_id)
        if known is None:
            known = self._readable[corpus_id] = corpus_exists(self._session, self._tenant_id,
                                                              corpus_id)
        return known

    def revision(self, corpus_id: str) -> CorpusRevision | None:
        return corpus_revision(self._session, corpus_id, self._tenant_id)

    def chunks(self, corpus_id: str) -> Iterator[StoredChunk]:
        if self._may_read(corpus_id):
            yield from corpus_chunks(self._session, corpus_id)

    def texts(self, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
        if not self._may_read(corpus_id):
            return {}
        return chunk_texts(self._session, corpus_id, chunk_ids)

    def document(self, corpus_id: str, document_id: str) -> tuple[str, str] | None:
        if not self._may_read(corpus_id):
            return None
        return document_text(self._session, corpus_id, document_id)
