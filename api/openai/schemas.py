"""OpenAI's file and batch objects, as its SDK reads them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.models import StoredFile
from orchestrator.openai_batches import BatchView

FILE_ID = "file-8a4e3c0f1b2d4e6f8a9b0c1d2e3f4a5b"
BATCH_ID = "job_5f0c2b6f0e8e4a59a3f1c8d2e7b4a901"
_FILE: dict[str, Any] = {"id": FILE_ID, "object": "file", "bytes": 1204,
                         "created_at": 1796032800, "filename": "requests.jsonl",
                         "purpose": "batch", "status": "processed", "status_details": None,
                         "expires_at": None}
_COUNTS = {"total": 100, "completed": 95, "failed": 5}
_BATCH: dict[str, Any] = {
    "id": BATCH_ID, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
    "input_file_id": FILE_ID, "completion_window": "24h", "status": "completed",
    "output_file_id": "file-1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f",
    "error_file_id": "file-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b", "created_at": 1796032800,
    "in_progress_at": 1796032801, "expires_at": 1796119200, "finalizing_at": 1796033100,
    "completed_at": 1796033100, "failed_at": None, "expired_at": None, "cancelling_at": None,
    "cancelled_at": None, "request_counts": _COUNTS, "metadata": {"run": "nightly"},
    "usage": {"input_tokens": 5400, "input_tokens_details": {"cached_tokens": 0},
              "output_tokens": 2100, "output_tokens_details": {"reasoning_tokens": 0},
              "total_tokens": 7500}}
_ERROR: dict[str, Any] = {"code": "mismatched_endpoint", "line": 3, "param": "url",
                          "message": "line 3: url '/v1/completions' is not the batch's "
                                     "endpoint '/v1/chat/completions'"}


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


def _ts(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


class FileObject(BaseModel):
    model_config = _examples(_FILE)

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, row: StoredFile) -> FileObject:
        return cls(id=row.id, bytes=row.size_bytes, created_at=_ts(row.created_at) or 0,
                   filename=row.filename, purpose=row.purpose)


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileList(ListPage):
    model_config = _examples({"object": "list", "data": [_FILE], "first_id": FILE_ID,
                              "last_id": FILE_ID, "has_more": False})

    data: list[FileObject]


class FileDeleted(BaseModel):
    model_config = _examples({"id": FILE_ID, "object": "file", "deleted": True})

    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "input_file_id": "file-4f0c...", "endpoint": "/v1/chat/completions",
        "completion_window": "24h", "metadata": {"run": "nightly"}}]})

    input_file_id: str = Field(min_length=1, max_length=100)
    endpoint: str = Field(min_length=1, max_length=200)
    completion_window: str = Field(min_length=1, max_length=20)
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 pairs; keys "
                                            "up to 64 characters, values up to 512.")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 pairs")
        for k, v in value.items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError("keys are at most 64 characters, values at most 512")
        return value


class BatchError(BaseModel):
    model_config = _examples(_ERROR)

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    model_config = _examples({"object": "list", "data": [_ERROR]})

    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    model_config = _examples(_COUNTS)

    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    model_config = _examples(_BATCH)

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None
    usage: dict[str, Any]

    @classmethod
    def of(cls, v: BatchView) -> BatchObject:
        job = v.job
        ended = _ts(job.finished_at)

        def at(*statuses: str) -> int | None:
            return ended if v.status in statuses else None

        return cls(
            id=job.id, endpoint=v.input.endpoint,
            errors=BatchErrors(data=[BatchError(**e.model_dump()) for e in v.errors])
            if v.errors else None,
            input_file_id=v.input.input_file_id, completion_window=v.input.completion_window,
            status=v.status, output_file_id=v.output_file_id, error_file_id=v.error_file_id,
            created_at=_ts(job.created_at) or 0, in_progress_at=_ts(job.started_at),
            expires_at=_ts(v.expires_at), finalizing_at=at("finalizing", "completed"),
            completed_at=at("completed"), failed_at=at("failed"), expired_at=at("expired"),
            cancelling_at=_ts(v.cancelling_at), cancelled_at=at("cancelled"),
            request_counts=RequestCounts(**v.request_counts.model_dump()),
            metadata=dict(job.job_metadata) or None,
            usage={"input_tokens": job.prompt_tokens,
                   "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens": job.completion_tokens,
                   "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": job.prompt_tokens + job.completion_tokens})


class BatchList(ListPage):
    model_config = _examples({"object": "list", "data": [_BATCH], "first_id": BATCH_ID,
                              "last_id": BATCH_ID, "has_more": False})

    data: list[BatchObject]


class OpenAIErrorOut(BaseModel):
    model_config = _examples({"message": "No such File object: file-nope",
                              "type": "invalid_request_error", "param": None, "code": None})

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """Every error of the OpenAI-compatible routes, in OpenAI's shape."""

    model_config = _examples({"error": {
        "message": "endpoint must be one of /v1/chat/completions, /v1/completions",
        "type": "invalid_request_error", "param": "endpoint", "code": "invalid_value"}})

    error: OpenAIErrorOut


OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "Invalid request; `param` names the "
                                                       "field"},
    401: {"model": OpenAIErrorResponse, "description": "Missing, unknown or revoked API key"},
    404: {"model": OpenAIErrorResponse, "description": "No such file or batch for this tenant"},
    # Declared so that the default validation-error schema is not: these routes answer
    # invalid input with 400, as OpenAI's API does, never 422.
    422: {"model": OpenAIErrorResponse, "description": "Not sent: invalid input is a 400"},
    429: {"model": OpenAIErrorResponse, "description": "Rate limit reached; see Retry-After"},
}
