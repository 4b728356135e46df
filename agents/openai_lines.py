"""The lines of an OpenAI batch input file: what one request line may hold, how a file is
checked before its batch runs, how a line becomes a model call, and how its answer is written
back in OpenAI's output line shape.

A line is `{"custom_id", "method": "POST", "url", "body"}`; `url` is the batch's endpoint,
`/v1/chat/completions` (a `messages` body) or `/v1/completions` (a `prompt` body). Bodies keep
OpenAI's defaults: `temperature` 1, `max_tokens` 16 for completions and the batch's default
for chat. Parameters agentq does not use are accepted and ignored; `n` above 1 and `stream`
are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inference.calls import CallSpec, ChatMessage
from inference.transcript import MESSAGE_OVERHEAD_TOKENS

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
# OpenAI's default `max_tokens` for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
SIZE_CLASSES = ("tiny", "small", "medium", "large", "xlarge")


class LineError(BaseModel):
    """A problem with the input file, as OpenAI's `BatchError` (`line` from 1)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def stops(self) -> tuple[str, ...] | None:
        if self.stop is None:
            return None
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("a batch line takes one prompt")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class RequestLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Chunk:
    """Consecutive lines run by one step: lines [first, first + count), bytes [start, end)
    of the file, and the most tokens any of them asks for."""

    first: int
    count: int
    start: int
    end: int
    max_tokens: int


@dataclass
class Checked:
    """A whole input file checked: its lines' byte spans and the tokens each may use (its
    prompt's bound and its `max_tokens`), or what is wrong with it."""

    spans: list[tuple[int, int, int]] = field(default_factory=list)  # start, end, max_tokens
    token_bound: int = 0
    errors: list[LineError] = field(default_factory=list)


def body_of(endpoint: str, body: dict[str, Any]) -> ChatBody | CompletionBody:
    return ChatBody.model_validate(body) if endpoint == CHAT \
        else CompletionBody.model_validate(body)


def _problem(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return loc, f"{loc}: {first.get('msg', 'invalid')}" if loc else str(first.get("msg"))


def request_lines(data: bytes) -> list[tuple[int, int, bytes]]:
    """The file's request lines (blank lines skipped) with their byte spans."""
    out = []
    position = 0
    for raw in data.splitlines(keepends=True):
        start, position = position, position + len(raw)
        if raw.strip():
            out.append((start, position, raw))
    return out


def custom_id_of(raw: bytes) -> str | None:
    try:
        found = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def check_file(data: bytes, endpoint: str, max_lines: int, default_max_tokens: int,
               max_errors: int = 20) -> Checked:
    """Check every line of the file against the batch's endpoint."""
    out = Checked()
    seen: set[str] = set()
    number = 0
    for start, position, raw in request_lines(data):
        number += 1
        if number > max_lines:
            out.errors.append(LineError(code="too_many_requests", message=(
                f"the file has more than {max_lines} requests (AGENTQ_BATCH_MAX_LINES)")))
            break
        error = _check_line(raw, number, endpoint, seen, default_max_tokens, out, start,
                            position)
        if error is not None:
            out.errors.append(error)
            if len(out.errors) >= max_errors:
                break
    if number == 0 and not out.errors:
        out.errors.append(LineError(code="empty_file", message="the input file has no lines"))
    return out


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[str], default_max_tokens: int,
                out: Checked, start: int, end: int) -> LineError | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return LineError(code="invalid_json_line", line=number, message=(
            f"line {number} is not valid JSON"))
    try:
        line = RequestLine.model_validate(parsed)
    except ValidationError as exc:
        param, message = _problem(exc)
        return LineError(code="invalid_request", line=number, param=param,
                         message=f"line {number}: {message}")
    if line.url != endpoint:
        return LineError(code="mismatched_endpoint", line=number, param="url", message=(
            f"line {number}: url {line.url!r} is not the batch's endpoint {endpoint!r}"))
    if line.custom_id in seen:
        return LineError(code="duplicate_custom_id", line=number, param="custom_id", message=(
            f"line {number}: custom_id {line.custom_id!r} is used by an earlier line"))
    seen.add(line.custom_id)
    try:
        body = body_of(endpoint, line.body)
    except ValidationError as exc:
        param, message = _problem(exc)
        return LineError(code="invalid_request", line=number, param=f"body.{param}",
                         message=f"line {number}: body.{message}")
    wanted = body.wanted_tokens(_default_tokens(endpoint, default_max_tokens))
    out.spans.append((start, end, wanted))
    out.token_bound += prompt_bound(body) + wanted
    return None


def _default_tokens(endpoint: str, default_max_tokens: int) -> int:
    return COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == COMPLETIONS else default_max_tokens


def prompt_bound(body: ChatBody | CompletionBody) -> int:
    """More prompt tokens than the line can take however it reaches a model (a token is at
    least one byte; each message adds a few under a chat template or in a transcript)."""
    if isinstance(body, ChatBody):
        texts = [m.text() for m in body.messages]
    else:
        texts = [body.text()]
    return sum(len(t.encode()) + 16 for t in texts) + MESSAGE_OVERHEAD_TOKENS * 2 + 16


def chunks(spans: list[tuple[int, int, int]], lines_per_step: int) -> list[Chunk]:
    out = []
    for first in range(0, len(spans), lines_per_step):
        part = spans[first:first + lines_per_step]
        out.append(Chunk(first=first, count=len(part), start=part[0][0], end=part[-1][1],
                         max_tokens=max(s[2] for s in part)))
    return out


def lines_per_step(total: int, target_steps: int, max_lines_per_step: int) -> int:
    """Lines per step: one step per line up to `target_steps` lines (all in parallel), then
    more lines per step so a batch stays near `target_steps` steps, but never more than
    `max_lines_per_step` (a big batch then has more steps, for more workers to share)."""
    per = -(-total // max(1, target_steps))
    return max(1, min(per, max_lines_per_step))


def call_of(endpoint: str, raw: bytes, default_max_tokens: int) -> tuple[str, CallSpec]:
    """A checked line as its custom id and model call."""
    line = RequestLine.model_validate_json(raw)
    body = body_of(endpoint, line.body)
    wanted = body.wanted_tokens(_default_tokens(endpoint, default_max_tokens))
    target: dict[str, str] = ({"size": body.model} if body.model in SIZE_CLASSES
                              else {"model": body.model})
    common: dict[str, Any] = {"max_tokens": wanted, "temperature": body.temperature,
                              "stop": body.stops(), **target}
    if isinstance(body, ChatBody):
        messages = tuple(ChatMessage("system" if m.role == "developer" else m.role, m.text())
                         for m in body.messages)
        return line.custom_id, CallSpec(messages=messages, **common)
    return line.custom_id, CallSpec(prompt=body.text(), **common)


class LineResult(BaseModel):
    """How one line ended: its answer, or the error the call met."""

    line: int = Field(description="The line's position among the file's requests, from 0.")
    custom_id: str
    status_code: int
    created: int
    text: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200


def _id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()
    return f"{prefix}{digest[:32]}"


def output_record(batch_id: str, endpoint: str, r: LineResult) -> dict[str, Any]:
    """The line as OpenAI writes it to a batch's output or error file."""
    request_id = _id("req_", batch_id, r.line)
    if not r.ok:
        body: dict[str, Any] = {"error": {"message": r.error_message or "", "type":
                                          r.error_type or "server_error", "param": None,
                                          "code": None}}
        return {"id": _id("batch_req_", batch_id, r.line), "custom_id": r.custom_id,
                "response": {"status_code": r.status_code, "request_id": request_id,
                             "body": body}, "error": None}
    usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
             "total_tokens": r.prompt_tokens + r.completion_tokens}
    if endpoint == CHAT:
        body = {"id": _id("chatcmpl-", batch_id, r.line), "object": "chat.completion",
                "created": r.created, "model": r.model, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": r.text,
                                            "refusal": None},
                    "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": usage, "system_fingerprint": None}
    else:
        body = {"id": _id("cmpl-", batch_id, r.line), "object": "text_completion",
                "created": r.created, "model": r.model, "choices": [{
                    "index": 0, "text": r.text, "logprobs": None,
                    "finish_reason": r.finish_reason}],
                "usage": usage, "system_fingerprint": None}
    return {"id": _id("batch_req_", batch_id, r.line), "custom_id": r.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}


def unrun_record(batch_id: str, line: int, custom_id: str, code: str, message: str
                 ) -> dict[str, Any]:
    """A line the batch never ran (cancelled, or past its completion window)."""
    return {"id": _id("batch_req_", batch_id, line), "custom_id": custom_id,
            "response": None, "error": {"code": code, "message": message}}
