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


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body("unavailable", message), status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


def install(app: FastAPI) -> None:
    @app.exception_handler(AgentqError)
    async def _agentq(_: Request, exc: AgentqError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = validation_message(list(exc.errors()))
        return JSONResponse(error_body("invalid_input", message, details=details),
                            status_code=422)

    @app.exception_handler(ValidationError)
    async def _pydantic(_: Request, exc: ValidationError) -> JSONResponse:
        message, details = validation_message(list(exc.errors()))
        return JSONResponse(error_body("invalid_input", message, details=details),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8, not JSON): a 422 like
            # every other invalid input.
            return JSONResponse(error_body("invalid_input", f"body: {exc.detail}"),
                                status_code=422)
        if exc.status_code == 405:
            # Every method the path supports, not just those of the first matching route.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(OperationalError)
    async def _database_busy(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return _unavailable("the database is busy or unreachable; retry shortly")

    @app.exception_handler(PoolTimeout)
    async def _no_connection(_: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("no database connection free in time: %s", exc)
        return _unavailable("the service is overloaded: no database connection was free in "
                            "time; retry shortly")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "an internal error occurred"),
                            status_code=500)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            log.warning("database connection lost: %s", exc)
            return _unavailable("the database connection was lost; retry shortly")
        return await _unexpected(request, exc)
