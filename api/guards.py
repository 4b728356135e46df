"""Refuse, with a 422 that names the problem, request input that Python parses but the database
cannot store or the serialisers cannot handle.

- A URL holding a NUL character: no database text column takes one (in the path it names
  nothing: 404; in the query string: 422).
- A JSON body nested deeper than `AGENTQ_MAX_JSON_DEPTH` levels, or holding a string (or object
  key) with a NUL character or a lone UTF-16 surrogate (`"\\ud800"`), or a number that is not
  finite (`NaN`, `Infinity`, `1e400`): free-form fields (`input`, `metadata`) would carry them
  to the database or to the response encoder, which fail on them.

Bodies that are not JSON, or not valid JSON, pass through: the endpoints answer those.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.corpora import upload_body_limit
from api.openai.errors import is_openai_path, openai_error, status_for
from core.settings import get_settings

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class InputProblem(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _not_finite(value: str) -> float:
    raise InputProblem("body", f"{value} is not a JSON number; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputProblem("body", f"the number {text[:40]} is out of range (must be finite)")
    return value


def _bad_string(value: str) -> str | None:
    """What is wrong with a string for storage, or None."""
    if "\x00" in value:
        return "strings must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "strings must be valid Unicode (a lone surrogate such as \\ud800 is not)"
    return None


def _field(path: list[str | int]) -> str:
    field = ".".join(["body", *(str(p) for p in path)])
    return field if len(field) <= 120 else field[:117] + "..."


def check_json(document: Any, max_depth: int) -> None:
    """Raise InputProblem for the first value of a parsed JSON document that may not be stored;
    iterative, so that depth alone never exhausts the stack."""
    stack: list[tuple[Any, list[str | int]]] = [(document, [])]
    while stack:
        value, path = stack.pop()
        if len(path) > max_depth:
            raise InputProblem(_field(path[:max_depth]),
                               f"nested too deeply (at most {max_depth} levels)")
        if isinstance(value, str):
            problem = _bad_string(value)
            if problem:
                raise InputProblem(_field(path), problem)
        elif isinstance(value, dict):
            for key, item in value.items():
                problem = _bad_string(key)
                if problem:
                    raise InputProblem(_field(path), f"object keys: {problem}")
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(value))


def parse_json(body: bytes, max_depth: int) -> None:
    """Check a JSON body; returns quietly when it is fine or is not JSON at all."""
    try:
        document = json.loads(body, parse_constant=_not_finite, parse_float=_finite_float)
    except InputProblem:
        raise
    except RecursionError:
        raise InputProblem("body", f"nested too deeply (at most {max_depth} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):  # not JSON: the endpoint says so
        return
    except ValueError:  # Python's limit on the digits of an integer
        raise InputProblem("body", "a number has too many digits") from None
    check_json(document, max_depth)


def _is_json(scope: Scope) -> bool:
    content_type = ""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            content_type = value.decode("latin-1").split(";", 1)[0].strip().lower()
    # FastAPI reads a body without a Content-Type as JSON too.
    return content_type in ("", "application/json") or (
        content_type.startswith("application/") and content_type.endswith("+json"))


async def _refuse(send: Send, field: str, message: str, *, path: str, status: int = 422,
                  code: str = "invalid_input") -> None:
    if is_openai_path(path):
        status = status_for(status)
        error = openai_error(status, f"{field}: {message}", code, field)
    else:
        error = {"error": {"code": code, "message": f"{field}: {message}",
                           "details": [{"field": field, "message": message}]}}
    body = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class InputGuard:
    """ASGI middleware: see the module's docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope.get("path", ""):  # names nothing, as an id of the wrong shape
            await _refuse(send, "path", "no resource has a NUL character (%00) in its path",
                          path=scope.get("path", ""), status=404, code="not_found")
            return
        if b"%00" in scope.get("query_string", b""):
            await _refuse(send, "query", "must not contain NUL characters (%00)",
                          path=scope.get("path", ""))
            return
        method = scope.get("method", "")
        if (method not in _BODY_METHODS or not _is_json(scope)
                or upload_body_limit(method, scope.get("path", "")) is not None):
            await self.app(scope, receive, send)
            return
        pieces: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            pieces.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(pieces)
        if body:
            try:
                parse_json(body, get_settings().max_json_depth)
            except InputProblem as exc:
                await _refuse(send, exc.field, exc.message, path=scope.get("path", ""))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
