"""One error shape for every failure: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from api.openai.errors import is_openai_path, openai_error, status_for
from core.errors import AgentqError, TooManyRequests, Unauthorized

log = logging.getLogger(__name__)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _loc(parts: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in parts if p not in ("body",)) or "body"


def validation_message(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    details = [{"field": _loc(e.get("loc", ())), "message": e.get("msg", "invalid")}
               for e in errors]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return message, details


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route | APIRoute):
            match, _ = route.matches(request.scope)
            if match in (Match.FULL, Match.PARTIAL) and route.methods:
                methods |= set(route.methods)
    return sorted(methods)


RETRY_AFTER_S = 2


def _respond(request: Request, status: int, code: str, message: str,
             headers: dict[str, str] | None = None, param: str | None = None,
             **extra: Any) -> JSONResponse:
    """The error in agentq's shape, or in OpenAI's on the routes OpenAI's SDK calls."""
    if is_openai_path(request.url.path):
        status = status_for(status)
        return JSONResponse(openai_error(status, message, code, param), status_code=status,
                            headers=headers)
    return JSONResponse(error_body(code, message, **extra), status_code=status,
                        headers=headers)


def _unavailable(request: Request, message: str) -> JSONResponse:
    return _respond(request, 503, "unavailable", message,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def install(app: FastAPI) -> None:
    @app.exception_handler(AgentqError)
    async def _agentq(request: Request, exc: AgentqError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after)}
        return _respond(request, exc.status_code, exc.code, exc.message, headers=headers,
                        param=getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = validation_message(list(exc.errors()))
        return _respond(request, 422, "invalid_input", message,
                        param=details[0]["field"] if details else None, details=details)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        message, details = validation_message(list(exc.errors()))
        return _respond(request, 422, "invalid_input", message,
                        param=details[0]["field"] if details else None, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8, not JSON): a 422 like
            # every other invalid input.
            return _respond(request, 422, "invalid_input", f"body: {exc.detail}")
        if exc.status_code == 405:
            # Every method the path supports, not just those of the first matching route.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _respond(request, exc.status_code, code, str(exc.detail),
                        headers=headers or None)

    @app.exception_handler(OperationalError)
    async def _database_busy(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return _unavailable(request, "the database is busy or unreachable; retry shortly")

    @app.exception_handler(PoolTimeout)
    async def _no_connection(request: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("no database connection free in time: %s", exc)
        return _unavailable(request, "the service is overloaded: no database connection was "
                                     "free in time; retry shortly")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _respond(request, 500, "internal_error", "an internal error occurred")

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            log.warning("database connection lost: %s", exc)
            return _unavailable(request, "the database connection was lost; retry shortly")
        return await _unexpected(request, exc)
