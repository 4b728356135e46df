"""Tenants' corpora: documents cut into chunks for retrieval; and the files of the
OpenAI-compatible Files API."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, UTCDateTime, utcnow


class Corpus(Base):
    """A tenant's documents, cut into chunks and searched lexically (BM25)."""

    __tablename__ = "corpora"
    __table_args__ = (Index("ix_corpora_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    document_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by every change to the corpus's documents: a search index built in memory is
    # rebuilt when the revision it was built at is no longer the corpus's.
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CorpusDocument(Base):
    """One uploaded document; its extracted text lives in its chunks."""

    __tablename__ = "corpus_documents"
    __table_args__ = (
        Index("ix_corpus_documents_corpus_created", "corpus_id", "created_at", "id"),
        UniqueConstraint("corpus_id", "sha256", name="uq_corpus_documents_corpus_sha256"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(300))
    filename: Mapped[str | None] = mapped_column(String(300), nullable=True)
    # text/plain, text/markdown, text/html or application/pdf: what the text was extracted from.
    content_type: Mapped[str] = mapped_column(String(40))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    char_count: Mapped[int] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CorpusChunk(Base):
    """A passage of a document's extracted text: what retrieval returns and answers cite."""

    __tablename__ = "corpus_chunks"
    __table_args__ = (
        UniqueConstraint("document_id", "ordinal", name="uq_corpus_chunks_document_ordinal"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"),
                                           index=True)
    document_id: Mapped[str] = mapped_column(
        ForeignKey("corpus_documents.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # Where the chunk lies in the document's extracted text: text[char_start:char_end].
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)


class StoredFile(Base):
    """A file of the OpenAI-compatible Files API: an uploaded batch input (`purpose` "batch"),
    or a batch's output or error file (`batch_output`, written when its job ends; `job_id` and
    `part`, "output" or "error", say whose)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column("bytes", BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                               nullable=True, index=True)
    part: Mapped[str | None] = mapped_column(String(10), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
