"""The agent loop: a step that calls the model, runs the tool it chose, shows it the result and
calls it again, until it gives its final answer or its step budget or turn limit runs out.

- An `Agent` declares its instructions, its tools and the model of its final answer. The
  final answer is one more tool (`answer`), validated against that model; an answer that does
  not fit goes back to the model as the tool's error, like any other.
- The step budget counts the tokens (prompt and completion) of every call of the step. Before
  each turn the loop makes sure that what is left pays for the turn and, after it, for one last
  short call (`final_max_tokens`) in which the agent answers with what it has; the model's
  context must hold that last call too. When it does not, or when the turn limit comes, that
  last call is made now: the model is told it has no turns left and may only answer. A tool's
  result is cut to what leaves room for the last call. Each call's `max_tokens` is cut to what
  the step, the model's context and the job have left.
- A prompt's tokens are counted before the call by the model server's tokenizer where it has
  one (`ctx.prompt_size`); else bounded: the first call's by its bytes (no token is shorter
  than a byte), each later one's by the previous call's real prompt and completion tokens plus
  the bytes of what was added since. The sum of the step's ledger rows never passes its
  budget.
- One action per turn: a second tool call in the same answer is not run (the model is told).
- Every call goes through `ctx.complete`: reserved, metered, cached, cancelled and recorded
  with its turn number. A re-run step replays its finished calls from the ledger: at
  temperature 0 with deterministic tools the same transcript forms again, call by call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from agents.base import (
    CallSpec,
    ChatMessage,
    ModelReply,
    PromptSize,
    StepContext,
    ToolCall,
    ToolSchema,
)
from agents.tools import EnvT, Tool, cap, describe, run_tool
from core.settings import get_settings

log = logging.getLogger(__name__)

AnswerT = TypeVar("AnswerT", bound=BaseModel)

ANSWER_TOOL = "final_answer"
# Tokens a message adds beyond its own text (role markers, labels, a chat template's wrapping).
MESSAGE_SLACK = 32
# A turn is made only if its tool's result can show at least this many tokens (bytes).
MIN_RESULT_TOKENS = 128
LAST_TURN = ("You have no turns left. Give your final answer now, from what you have found: "
             "call " + ANSWER_TOOL + ".")
NOT_AN_ACTION = ("error: your reply was not an action. Reply with one tool call, or call "
                 + ANSWER_TOOL + " with your final answer.")
ONE_ACTION = "\n(Only the first tool call of a turn is run.)"


class Stop(StrEnum):
    ANSWERED = "answered"  # the agent answered before any limit
    TURN_LIMIT = "turn_limit"  # its last turn came: it was told to answer
    STEP_BUDGET = "step_budget"  # its step budget had room only for the last call
    CONTEXT = "context"  # the model's context had room only for the last call
    JOB_BUDGET = "job_budget"  # the job's budget had room only for the last call
    DONE = "done"  # a tool's result finished the work (`Agent.finished`): no answer needed


@dataclass(frozen=True)
class Agent(Generic[EnvT, AnswerT]):
    """A role's agent loop. `instructions` come first in every prompt and never change (the
    model server's prefix cache keeps them, with the tools' descriptions). `fallback` makes an
    answer when the last call gave none that fits (it sees the loop's messages and the last
    reply's text). `finished`, when set, is asked after each tool call whether the work is
    done (a coder's tests pass): its answer ends the loop without another call. `temperature`
    and `size` are those of every call (a size class of the catalogue; None: the smallest)."""

    instructions: str
    tools: Sequence[Tool[EnvT, Any]]
    answer: type[AnswerT]
    answer_description: str
    fallback: Callable[[list[ChatMessage], str], AnswerT]
    turn_max_tokens: int = 256
    final_max_tokens: int = 256
    size: str | None = None
    temperature: float = 0.0
    finished: Callable[[EnvT], AnswerT | None] | None = None

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names) or ANSWER_TOOL in names:
            raise ValueError(f"an agent's tools need names of their own, not {ANSWER_TOOL!r}: "
                             f"{names}")

    def answer_schema(self) -> ToolSchema:
        return ToolSchema(ANSWER_TOOL, self.answer_description, self.answer.model_json_schema())


@dataclass
class LoopResult(Generic[AnswerT]):
    answer: AnswerT
    stopped: Stop
    turns: int  # model calls made (or replayed)
    tokens: int  # their prompt and completion tokens, as billed
    fallback: bool = False  # no answer of the model fitted: `Agent.fallback` made this one
    messages: list[ChatMessage] = field(default_factory=list)


def turn_limit(ctx: StepContext) -> int:
    """The step's turn limit: its kind's choice (`turn_limit` in the step's input), else
    `AGENTQ_LOOP_TURN_LIMIT`; capped per role by `AGENTQ_LOOP_TURN_LIMITS`."""
    settings = get_settings()
    asked = ctx.step_input.get("turn_limit")
    limit = int(asked) if asked else settings.loop_turn_limit
    role_cap = settings.loop_turn_limits.get(ctx.role)
    return max(1, min(limit, role_cap) if role_cap else limit)


def _message_bound(message: ChatMessage) -> int:
    """Tokens a message adds to a prompt, at most: its text in bytes, plus slack."""
    size = len(message.content.encode("utf-8"))
    size += sum(len(c.name) + len(c.arguments.encode("utf-8")) for c in message.tool_calls)
    return size + MESSAGE_SLACK


class _Loop(Generic[EnvT, AnswerT]):
    def __init__(self, ctx: StepContext, agent: Agent[EnvT, AnswerT], env: EnvT, task: str,
                 turns: int) -> None:
        self.ctx, self.agent, self.env, self.turns = ctx, agent, env, turns
        self.messages = [ChatMessage("system", agent.instructions), ChatMessage("user", task)]
        self.tools = [t.schema() for t in agent.tools]
        self.answer_tool = agent.answer_schema()
        self.result_bytes = get_settings().loop_tool_result_bytes
        self.spent = 0
        self.made = 0
        # An upper bound of the prompt so far in tokens, once a call has told its real size.
        self.known: int | None = None
        self.context: int | None = None  # the model's, as last measured

    # -- budget -----------------------------------------------------------------------------

    def add(self, message: ChatMessage) -> None:
        self.messages.append(message)
        if self.known is not None:
            self.known += _message_bound(message)

    def call(self, max_tokens: int, final: bool) -> CallSpec:
        return CallSpec(messages=tuple(self.messages), tools=tuple(self.tools),
                        answer=self.answer_tool,
                        tool_choice=ANSWER_TOOL if final else "required",
                        max_tokens=max_tokens, size=self.agent.size,
                        temperature=self.agent.temperature, turn=self.made + 1,
                        fit_to_job=True)

    def measure(self, call: CallSpec) -> PromptSize:
        """The call's prompt size: counted, or the tighter of two bounds."""
        size = self.ctx.prompt_size(call)
        self.context = size.context
        if not size.exact and self.known is not None:
            return replace(size, tokens=min(size.tokens, self.known + MESSAGE_SLACK))
        return size

    def step_left(self) -> int:
        return self.ctx.step_max_tokens - self.spent

    def plan_turn(self) -> Stop | None:
        """Why the last call comes now instead of a regular turn, if it does: the turn and,
        after it, the last call must fit what the step, the model's context and the job have
        left (the last call's prompt: this one, the turn's answer, a result of at least
        `MIN_RESULT_TOKENS`, the last-turn note)."""
        if self.made + 1 >= self.turns:
            return Stop.TURN_LIMIT
        turn, final = self.agent.turn_max_tokens, self.agent.final_max_tokens
        size = self.measure(self.call(turn, final=False))
        last = size.tokens + turn + MIN_RESULT_TOKENS + len(LAST_TURN) + MESSAGE_SLACK * 4
        if size.tokens + turn + last + final > self.step_left():
            return Stop.STEP_BUDGET
        if size.context is not None and last + final > size.context:
            return Stop.CONTEXT
        job_left = self.ctx.job_tokens_left()
        if job_left is not None and size.tokens + turn + last + final > job_left:
            return Stop.JOB_BUDGET
        return None

    def result_bytes_left(self) -> int:
        """The most bytes the turn's tool result may take so that the last call still fits
        (the prompt so far, the result, the last-turn note, the answer)."""
        prompt = self.known if self.known is not None else \
            self.measure(self.call(1, final=True)).tokens
        room = self.step_left() if self.context is None else min(self.step_left(), self.context)
        room -= prompt + len(LAST_TURN) + MESSAGE_SLACK * 3 + self.agent.final_max_tokens
        return max(0, min(self.result_bytes, room))

    # -- turns ------------------------------------------------------------------------------

    def complete(self, call: CallSpec) -> ModelReply:
        reply = self.ctx.complete(call)
        self.made += 1
        self.spent += reply.prompt_tokens + reply.completion_tokens
        # A call answered from the job's call cache tells no size: bound by bytes again.
        self.known = reply.prompt_tokens + reply.completion_tokens + MESSAGE_SLACK \
            if reply.prompt_tokens > 0 else None
        calls = reply.tool_calls[:1]
        self.messages.append(ChatMessage("assistant", reply.text, calls))
        return reply

    def read_answer(self, call: ToolCall) -> AnswerT | str:
        try:
            return self.agent.answer.model_validate_json(call.arguments or "{}")
        except ValidationError as exc:
            return f"error: the answer does not fit: {describe(exc)}"

    def run(self) -> LoopResult[AnswerT]:
        while True:
            stop = self.plan_turn()
            if stop is not None:
                return self.last(stop)
            reply = self.complete(self.call(self.agent.turn_max_tokens, final=False))
            if not reply.tool_calls:
                self.add(ChatMessage("user", NOT_AN_ACTION))
                continue
            chosen = reply.tool_calls[0]
            extra = ONE_ACTION if len(reply.tool_calls) > 1 else ""
            if chosen.name == ANSWER_TOOL:
                answer = self.read_answer(chosen)
                if not isinstance(answer, str):
                    return self.result(answer, Stop.ANSWERED)
                text = cap(answer, self.result_bytes_left())
            else:
                room = self.result_bytes_left()
                text = run_tool(self.agent.tools, self.env, chosen,
                                max(0, room - len(extra))).text
                text = cap(text + extra, room)
            self.add(ChatMessage("tool", text, tool_call_id=chosen.id, name=chosen.name))
            done = self.agent.finished(self.env) if self.agent.finished is not None else None
            if done is not None:
                return self.result(done, Stop.DONE)

    def last(self, stop: Stop) -> LoopResult[AnswerT]:
        """The last, short call: the agent may only answer."""
        self.add(ChatMessage("user", LAST_TURN))
        size = self.measure(self.call(1, final=True))
        room = self.step_left() if size.context is None else min(self.step_left(), size.context)
        max_tokens = min(self.agent.final_max_tokens, room - size.tokens)
        if max_tokens < 1:
            log.info("step %s: no room for a last call; the answer is the fallback",
                     self.ctx.step_key)
            return self.result(self.agent.fallback(self.messages, ""), stop, fallback=True)
        reply = self.complete(self.call(max_tokens, final=True))
        for chosen in reply.tool_calls:
            if chosen.name == ANSWER_TOOL:
                answer = self.read_answer(chosen)
                if not isinstance(answer, str):
                    return self.result(answer, stop)
        return self.result(self.agent.fallback(self.messages, reply.text), stop, fallback=True)

    def result(self, answer: AnswerT, stop: Stop, fallback: bool = False) -> LoopResult[AnswerT]:
        return LoopResult(answer, stop, self.made, self.spent, fallback, list(self.messages))


def run_loop(ctx: StepContext, agent: Agent[EnvT, AnswerT], env: EnvT, task: str,
             turns: int | None = None) -> LoopResult[AnswerT]:
    """Run the step as an agent loop on `task` (the step's own text, after the agent's
    instructions) under the step's budget (`ctx.step_max_tokens`, the tokens of all its
    calls) and turn limit (`turns`, by default `turn_limit(ctx)`)."""
    return _Loop(ctx, agent, env, task, turns if turns is not None else turn_limit(ctx)).run()
