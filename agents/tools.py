"""Tools an agent loop may call: typed Python functions whose arguments are a pydantic model.

The model sees each tool's name, description and the JSON schema pydantic makes of its
argument model. A tool is called with the step's environment (anything with a `ctx`, the
`StepContext`, plus what the step keeps between turns, such as the passages it has seen) and
its validated arguments, and returns text for the model to read.

Whatever goes wrong on the model's side comes back to the model as the tool's result, and the
step goes on: a tool it named that does not exist, arguments that do not fit, a tool that
raises. Failures of the platform itself are not the model's to read and end the run as they
would anywhere: the step was stopped, or waits for the sub-agents it spawned
(`StepInterrupted`: `StepStopped`, `StepSuspended`), the budget ran out or a model call
failed (`AgentqError`), the database or Redis failed, or the agent gave up (`AgentError`).

    class SearchArgs(BaseModel):
        query: str = Field(description="What to look for.")

    def search(env: CorpusEnv, args: SearchArgs) -> str: ...

    SEARCH = Tool("search", "Search the corpus.", SearchArgs, search)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from redis import RedisError
from sqlalchemy.exc import SQLAlchemyError

from agents.base import AgentError, StepContext, ToolCall, ToolSchema
from core import tracing
from core.errors import AgentqError, StepInterrupted

log = logging.getLogger(__name__)

PLATFORM_ERRORS: tuple[type[BaseException], ...] = (
    StepInterrupted, AgentqError, AgentError, SQLAlchemyError, RedisError)


class ToolError(Exception):
    """A failure the model should read and may recover from ("there is no passage 9")."""


class ToolEnv(Protocol):
    """What a tool is called with: at least the step's context."""

    @property
    def ctx(self) -> StepContext: ...


EnvT = TypeVar("EnvT", bound=ToolEnv)
ArgsT = TypeVar("ArgsT", bound=BaseModel)


@dataclass(frozen=True)
class Tool(Generic[EnvT, ArgsT]):
    name: str
    description: str
    args: type[ArgsT]
    fn: Callable[[EnvT, ArgsT], str]

    def schema(self) -> ToolSchema:
        return ToolSchema(self.name, self.description, self.args.model_json_schema())


@dataclass(frozen=True)
class ToolResult:
    text: str
    error: bool


def describe(exc: ValidationError) -> str:
    """A validation error in a line a model can act on."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                     for e in exc.errors()[:4])


def cap(text: str, max_bytes: int) -> str:
    """`text` in at most `max_bytes` UTF-8 bytes, marked where it was cut."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    note = f"\n[cut at {max_bytes} bytes]"
    if len(note) > max_bytes:
        return data[:max_bytes].decode("utf-8", errors="ignore")
    return data[:max_bytes - len(note)].decode("utf-8", errors="ignore") + note


def run_tool(tools: Sequence[Tool[EnvT, Any]], env: EnvT, call: ToolCall,
             max_bytes: int) -> ToolResult:
    """Run the tool the model called; what went wrong on the model's side is the result.
    Traced as an `execute_tool` span (GenAI semantic conventions) when tracing is on."""
    with tracing.span(f"execute_tool {call.name}", {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id}) as span:
        result = _run_tool(tools, env, call, max_bytes)
        if result.error:
            tracing.fail(span, result.text)
        return result


def _run_tool(tools: Sequence[Tool[EnvT, Any]], env: EnvT, call: ToolCall,
              max_bytes: int) -> ToolResult:
    by_name: Mapping[str, Tool[EnvT, Any]] = {t.name: t for t in tools}
    tool = by_name.get(call.name)
    if tool is None:
        names = ", ".join(by_name) or "none"
        return ToolResult(cap(f"error: there is no tool {call.name!r}; the tools are: {names}",
                              max_bytes), True)
    try:
        args = tool.args.model_validate_json(call.arguments or "{}")
    except ValidationError as exc:
        return ToolResult(cap(f"error: the arguments of {tool.name} do not fit: "
                              f"{describe(exc)}", max_bytes), True)
    try:
        text = tool.fn(env, args)
    except ToolError as exc:
        return ToolResult(cap(f"error: {exc}", max_bytes), True)
    except PLATFORM_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - a failing tool is the model's to read
        log.warning("tool %s failed: %r", tool.name, exc)
        return ToolResult(cap(f"error: {tool.name} failed: {type(exc).__name__}: {exc}",
                              max_bytes), True)
    return ToolResult(cap(text, max_bytes), False)
