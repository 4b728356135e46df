"""Domain errors. Each carries an HTTP status and a short machine code; the API renders them as
`{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations


class AgentqError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(AgentqError):
    status_code = 404
    code = "not_found"


class Unauthorized(AgentqError):
    status_code = 401
    code = "unauthorized"


class Forbidden(AgentqError):
    status_code = 403
    code = "forbidden"


class Conflict(AgentqError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(AgentqError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(AgentqError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInput(AgentqError):
    status_code = 422
    code = "invalid_input"


class TooManyRequests(AgentqError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class StepInterrupted(Exception):
    """The platform stopped a running step (its job stopped, or its run lost the step). Agents
    let it through: a tool never hands it to the model as a tool error."""
