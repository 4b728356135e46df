"""`/v1/files`: upload a batch's JSONL input (`purpose=batch`), read, download, delete and list
files, as OpenAI's Files API. A batch's output and error files (`purpose=batch_output`) are
listed here too."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import CurrentPrincipal, DbSession
from api.openai import MULTIPART_OVERHEAD
from api.openai.schemas import OPENAI_ERRORS, FileDeleted, FileList, FileObject, OpenAIErrorResponse
from core.db import transaction
from core.db_errors import retry_transient
from core.errors import NotFound, PayloadTooLarge
from core.repositories import files
from core.settings import get_settings
from orchestrator.openai_batches import BatchRequestError

router = APIRouter(prefix="/v1/files", tags=["openai"], responses=OPENAI_ERRORS)
PURPOSES = ("batch",)


class FileTooLarge(PayloadTooLarge):
    code = "file_too_large"


async def _read_upload(request: Request) -> tuple[bytes, str, str]:
    """The uploaded file's bytes, name and purpose, from OpenAI's multipart form."""
    limit = get_settings().batch_max_file_bytes
    too_large = FileTooLarge(f"the file is larger than {limit} bytes "
                             "(AGENTQ_BATCH_MAX_FILE_BYTES)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise too_large
    if not (request.headers.get("content-type") or "").startswith("multipart/form-data"):
        raise BatchRequestError("send the file as multipart/form-data with the fields `file` "
                                "and `purpose`", param="file")
    try:
        form = await request.form(max_files=1, max_fields=20)
    except StarletteHTTPException:
        raise
    except Exception as exc:
        raise BatchRequestError("not a valid multipart/form-data body", param="file") from exc
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise BatchRequestError("purpose: required", param="purpose")
        if purpose not in PURPOSES:
            raise BatchRequestError(f"purpose must be one of {', '.join(PURPOSES)}, not "
                                    f"{purpose[:40]!r}", param="purpose")
        if not isinstance(upload, UploadFile):
            raise BatchRequestError("file: required, as a file part", param="file")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise too_large
        if not data.strip():
            raise BatchRequestError("the file is empty", param="file")
        return data, upload.filename or "upload.jsonl", purpose
    finally:
        await form.close()


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "JSONL, one request per line"},
        "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY, responses={
    413: {"model": OpenAIErrorResponse,
          "description": "Larger than AGENTQ_BATCH_MAX_FILE_BYTES (`file_too_large`)"}})
async def upload_file(request: Request, principal: CurrentPrincipal) -> FileObject:
    """Upload a JSONL file of batch requests (`purpose=batch`). Its lines are checked when a
    batch is created from it."""
    data, filename, purpose = await _read_upload(request)

    def store() -> FileObject:
        with transaction() as s:
            return FileObject.of(files.add(s, tenant_id=principal.tenant_id, purpose=purpose,
                                           filename=filename, content=data))

    return await run_in_threadpool(retry_transient, store)


@router.get("", response_model=FileList)
def list_files(
    session: DbSession,
    principal: CurrentPrincipal,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    purpose: Annotated[str | None, Query(max_length=40)] = None,
) -> FileList:
    rows = files.list_files(session, principal.tenant_id, limit=limit + 1, after=after,
                            purpose=purpose, newest_first=order == "desc")
    data = [FileObject.of(r) for r in rows[:limit]]
    return FileList(data=data, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None, has_more=len(rows) > limit)


def _get(session: DbSession, tenant_id: str, file_id: str) -> FileObject:
    row = files.get(session, tenant_id, file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id[:60]}")
    return FileObject.of(row)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: DbSession, principal: CurrentPrincipal) -> FileObject:
    return _get(session, principal.tenant_id, file_id)


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def file_content(file_id: str, session: DbSession, principal: CurrentPrincipal) -> Response:
    """The file's bytes: for a batch's output or error file, one JSON line per request."""
    data = files.content(session, principal.tenant_id, file_id)
    if data is None:
        raise NotFound(f"No such File object: {file_id[:60]}")
    return Response(content=bytes(data), media_type="application/octet-stream")


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, principal: CurrentPrincipal) -> FileDeleted:
    def remove() -> bool:
        with transaction() as s:
            return files.delete_file(s, principal.tenant_id, file_id)

    if not retry_transient(remove):
        raise NotFound(f"No such File object: {file_id[:60]}")
    return FileDeleted(id=file_id, deleted=True)
