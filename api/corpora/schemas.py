"""Request and response schemas of the corpora API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_CORPUS_EXAMPLE: dict[str, Any] = {
    "id": "cor_2f6d0c1e9a7b4c3d8e5f1a2b3c4d5e6f", "name": "Pollinators",
    "description": "Field notes and papers on bees", "document_count": 3, "chunk_count": 41,
    "created_at": "2026-11-22T10:00:00Z", "updated_at": "2026-11-22T10:05:00Z",
}
_DOCUMENT_EXAMPLE: dict[str, Any] = {
    "id": "doc_8a1b2c3d4e5f40718293a4b5c6d7e8f9",
    "corpus_id": "cor_2f6d0c1e9a7b4c3d8e5f1a2b3c4d5e6f", "title": "How bees make honey",
    "filename": "honey.pdf", "content_type": "application/pdf", "size_bytes": 48213,
    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "char_count": 18230, "chunk_count": 14, "created_at": "2026-11-22T10:04:00Z",
}
_HIT_EXAMPLE: dict[str, Any] = {
    "chunk_id": "chk_0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f",
    "document_id": "doc_8a1b2c3d4e5f40718293a4b5c6d7e8f9",
    "document_title": "How bees make honey", "ordinal": 3, "char_start": 3912,
    "char_end": 5280, "score": 7.4312,
    "snippet": "…forager bees carry nectar back to the hive, where house bees pass it mouth to "
               "mouth and fan it with their wings until most of the water has evaporated…",
    "text": "Forager bees carry nectar back to the hive, where house bees pass it mouth to "
            "mouth and fan it with their wings until most of the water has evaporated.",
}


def _printable(value: str | None) -> str | None:
    if value is None:
        return None
    if any(ord(c) < 32 and c not in "\t\n" or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("must not contain control characters")
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


class CorpusCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "Pollinators", "description": "Field notes and papers on bees"}]})

    name: str = Field(min_length=1, max_length=200, description="A name to know it by.",
                      examples=["Pollinators"])
    description: str | None = Field(default=None, max_length=1000,
                                    examples=["Field notes and papers on bees"])

    @field_validator("name", "description")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        return _printable(value)


class CorpusOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_CORPUS_EXAMPLE]})

    id: str
    name: str
    description: str | None
    document_count: int
    chunk_count: int
    created_at: datetime
    updated_at: datetime


class DocumentOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_DOCUMENT_EXAMPLE]})

    id: str
    corpus_id: str
    title: str
    filename: str | None
    content_type: str = Field(description="What the text was extracted from: text/plain, "
                                          "text/markdown, text/html or application/pdf.")
    size_bytes: int = Field(description="The document's size as uploaded.")
    sha256: str = Field(description="SHA-256 of the uploaded bytes; a corpus holds each "
                                    "document once.")
    char_count: int = Field(description="Characters of extracted text.")
    chunk_count: int
    created_at: datetime


class CorpusDetail(CorpusOut):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {**_CORPUS_EXAMPLE, "documents": [_DOCUMENT_EXAMPLE]}]})

    documents: list[DocumentOut] = Field(description="Its documents, oldest first.")


class CorpusList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"data": [_CORPUS_EXAMPLE], "next_cursor": None}]})

    data: list[CorpusOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at "
                                                "the end.")


class SearchHit(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_HIT_EXAMPLE]})

    chunk_id: str = Field(description="The chunk's id: what an answer cites.")
    document_id: str
    document_title: str
    ordinal: int = Field(description="The chunk's position in its document, from 0.")
    char_start: int = Field(description="Where the chunk starts in the document's text.")
    char_end: int
    score: float = Field(description="BM25 score; higher is better.")
    snippet: str = Field(description="About 240 characters around the first matching word.")
    text: str = Field(description="The whole chunk.")


class SearchResults(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": "how do bees turn nectar into honey", "data": [_HIT_EXAMPLE]}]})

    query: str
    data: list[SearchHit] = Field(description="Best first; only chunks sharing a word with "
                                              "the query.")
