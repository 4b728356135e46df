"""The one object that describes a model call, from the agent that wants it to the pool that
makes it. Nothing on the way re-lists its parameters.

A call is either a plain `prompt` (a text completion) or a conversation: `messages`, the
`tools` the model may call and the `answer` it gives when it is done. How a conversation
reaches a model is the pool's business (`inference.requests`): chat models with tool calling
get `/v1/chat/completions` with `tools`; other models choose their action under a JSON-schema
constraint (`inference.transcript`). Either way the reply's `tool_calls` say what the model
chose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Speaker = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A tool the model chose to call, with its arguments as the JSON text it wrote (parsed
    and validated by the tool, never by the pool)."""

    name: str
    arguments: str
    id: str = ""

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class ToolSchema:
    """A tool as a model sees it: its name, what it does, and the JSON schema of its
    arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "parameters": dict(self.parameters)}


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation. An assistant turn keeps the text the model wrote
    (`content`, verbatim, so a re-sent conversation starts with the very same text) and the
    tool calls it made; a tool turn answers one of them."""

    role: Speaker
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.as_json() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class PromptSize:
    """A call's prompt in tokens, before it is made: counted by the model server's tokenizer
    (`exact`), else an upper bound; and the context of the model it will run on, when known."""

    tokens: int
    context: int | None = None
    exact: bool = False


@dataclass(frozen=True)
class CallSpec:
    """One model call.

    `max_tokens` None: the step's budget (the orchestrator settles it before the call reaches
    the pool). `size`: the catalogue's size class to run on ("small", "large", ...); `model`: a
    model by name; neither: the smallest class there is. At most one of `regex`, `choice` and
    `json_schema` constrains the output (vLLM structured outputs). `validate`: when the answer
    fails it, the call is made again on the next larger size class (a cascade), as long as
    there is one; every escalation is recorded on its call.

    A conversation sets `messages` instead of `prompt`, with `tools` and `answer` (the tool
    the model calls to give its final answer); `messages` alone are a plain chat.
    `tool_choice`: "required" (a tool or the answer; the default) or the name of the one tool
    it must call.

    Accounting, not part of what determines the answer: `turn` (the call's turn in an agent
    loop, recorded in the ledger) and `fit_to_job` (when the job's budget has less room than
    `max_tokens`, send fewer; a re-run step replays the answer all the same)."""

    prompt: str = ""
    max_tokens: int | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    json_schema: Mapping[str, Any] | None = None
    stop: Sequence[str] | None = None
    size: str | None = None
    model: str | None = None
    temperature: float = 0.0
    messages: Sequence[ChatMessage] | None = None
    tools: Sequence[ToolSchema] = ()
    answer: ToolSchema | None = None
    tool_choice: str = "required"
    turn: int | None = field(default=None, compare=False)
    fit_to_job: bool = field(default=False, compare=False)
    validate: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)

    @property
    def is_conversation(self) -> bool:
        """An agent's turn: messages with tools or an answer to choose from."""
        return self.messages is not None and not self.is_chat

    @property
    def is_chat(self) -> bool:
        """Plain chat: messages with no tools and no answer tool (an OpenAI chat request);
        a chat model gets them as they are, any other model as a plain transcript."""
        return self.messages is not None and not self.tools and self.answer is None

    def settled(self, max_tokens: int, size: str | None = None) -> CallSpec:
        """This call with its `max_tokens` (and, for an escalation, its size class) settled."""
        return replace(self, max_tokens=max_tokens, size=size if size is not None else self.size)

    def prompt_key(self) -> str:
        """A digest of the prompt alone (what the model reads, wherever it runs)."""
        parts = [self.prompt, self.size, self.model]
        if self.messages is not None:
            parts.append(json.dumps({
                "messages": [m.as_json() for m in self.messages],
                "tools": [t.as_json() for t in self.tools],
                "answer": self.answer.as_json() if self.answer else None,
                "tool_choice": self.tool_choice}, sort_keys=True))
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def key(self) -> str | None:
        """What determines the answer of a deterministic (temperature 0) call, as a digest:
        identical calls of a job are answered once (the call cache), and a re-run step's call
        is matched by it. None for sampled calls."""
        if self.temperature != 0.0:
            return None
        parts: list[Any] = [self.prompt, self.max_tokens, self.size or self.model, self.regex,
                            list(self.choice) if self.choice else None,
                            dict(self.json_schema) if self.json_schema else None,
                            list(self.stop) if self.stop else None, 0.0]
        if self.messages is not None:
            parts.append({"messages": [m.as_json() for m in self.messages],
                          "tools": [t.as_json() for t in self.tools],
                          "answer": self.answer.as_json() if self.answer else None,
                          "tool_choice": self.tool_choice})
        spec = json.dumps(parts, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(spec.encode()).hexdigest()
