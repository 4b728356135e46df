"""Errors as OpenAI's API writes them, for the routes its SDK calls:
`{"error": {"message", "type", "param", "code"}}`. Invalid requests are 400 there (the SDK's
`BadRequestError`), not 422."""

from __future__ import annotations

from typing import Any

PREFIXES = ("/v1/files", "/v1/batches")
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error"}
CODES = {401: "invalid_api_key"}


def is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


def status_for(status: int) -> int:
    """OpenAI answers a request it cannot read with 400."""
    return 400 if status == 422 else status


def openai_error(status: int, message: str, code: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "param": param, "code": CODES.get(status, code)}}
