"""Corpora: a tenant's documents, turned into text, cut into passages and searched with BM25.

- `agents.corpus.extract`: content types, and text from plain text, Markdown, HTML and PDF;
- `agents.corpus.chunks`: chunks of about 150-250 words on paragraph and sentence boundaries,
  and `prepare_document` (check, extract, chunk an upload; `core.repositories.corpora` stores it);
- `agents.corpus.retrieval`: Okapi BM25 over a corpus's chunks, read through a `CorpusStore`, so
  nothing here opens a database session.
"""

from agents.corpus.chunks import ChunkSpan, PreparedDocument, chunk_text, prepare_document
from agents.corpus.extract import (
    ACCEPTED_TYPES,
    Extracted,
    detect_type,
    extract_text,
    max_document_bytes,
    normalize_text,
    parse_content_type,
)
from agents.corpus.retrieval import (
    CorpusRevision,
    CorpusStore,
    SearchHit,
    StoredChunk,
    retrieve,
    search,
    snippet,
    tokenize,
)

__all__ = ["ACCEPTED_TYPES", "ChunkSpan", "CorpusRevision", "CorpusStore", "Extracted",
           "PreparedDocument", "SearchHit", "StoredChunk", "chunk_text", "detect_type",
           "extract_text", "max_document_bytes", "normalize_text", "parse_content_type",
           "prepare_document", "retrieve", "search", "snippet", "tokenize"]
