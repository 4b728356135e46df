"""OpenAI's file and batch objects, as its SDK reads them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.models import StoredFile
from orchestrator.openai_batches import BatchView


def _ts(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


class FileObject(BaseModel):
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
    data: list[FileObject]


class FileDeleted(BaseModel):
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
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
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
    data: list[BatchObject]
