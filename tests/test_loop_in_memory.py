"""The agent loop in memory, against a scripted model: tools that raise, answers that do not
fit, more than one tool call in a turn, no room for a last call, and the step budget under the
worst tokenizer there is (one token per byte). No database, no worker, no model server: the
model's side is a script answered as a server under the action's JSON-schema constraint
would."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel, ConfigDict

from agents.base import (
    CallSpec,
    ChatMessage,
    Child,
    Document,
    ModelReply,
    Passage,
    PromptSize,
    Role,
    SpawnRefused,
    StepContext,
    StepOutputs,
    ToolCall,
)
from agents.loop import ANSWER_TOOL, NOT_AN_ACTION, ONE_ACTION, Agent, Stop, run_loop
from agents.spawn import spawn_tool
from agents.tools import Tool, ToolError
from bench.standin import constrained
from core.errors import StepInterrupted
from inference.transcript import action_schema, parse_action, plain_bound, render

OutputT = TypeVar("OutputT", bound=BaseModel)


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: str


Reply = str | tuple[ToolCall, ...]


@dataclass
class ScriptedContext:
    """A `StepContext` whose model answers from `replies` (the last repeats). Tokens are
    words, or, with `bytes_as_tokens`, bytes: the worst a tokenizer can do."""

    replies: list[Reply]
    step_max_tokens: int = 50_000
    bytes_as_tokens: bool = False
    job_left: int | None = None
    counted: bool = False  # prompt sizes counted (a server's tokenizer), else bounded
    context: int | None = None
    calls: list[CallSpec] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    step_key: str = "s"
    role: str = "tester"
    step_input: Mapping[str, Any] = field(default_factory=dict)
    parents: StepOutputs = field(default_factory=lambda: StepOutputs({}))
    # How a spawned child answers its task (None: spawns are refused).
    children: Callable[[BaseModel], dict[str, Any]] | None = None
    spawned: list[BaseModel] = field(default_factory=list)

    def _tokens(self, text: str) -> int:
        return len(text.encode()) + 1 if self.bytes_as_tokens else len(text.split()) + 1

    def stopped(self) -> bool:
        return False

    def complete(self, call: CallSpec) -> ModelReply:
        assert call.max_tokens is not None
        reply = self.replies[min(len(self.calls), len(self.replies) - 1)]
        self.calls.append(call)
        prompt = self._tokens(render(call))
        if isinstance(reply, tuple):
            return ModelReply("", "tool_calls", prompt, 10, tool_calls=reply)
        text = constrained(reply, action_schema(call))
        # A server cuts the answer at max_tokens.
        if self.bytes_as_tokens:
            text = text.encode()[:call.max_tokens].decode(errors="ignore")
        else:
            text = " ".join(text.split(" ")[:call.max_tokens])
        return ModelReply(text, "stop", prompt, min(call.max_tokens, self._tokens(text) - 1),
                          tool_calls=parse_action(text, call.answer, call.turn))

    def search_corpus(self, corpus_id: str, query: str, k: int) -> list[Passage]:
        return []

    def read_passages(self, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
        return {}

    def read_file(self, file_id: str, start: int, end: int) -> bytes:
        return self.files.get(file_id, b"")[start:end]

    def read_document(self, corpus_id: str, document_id: str) -> Document | None:
        return None

    def prompt_size(self, call: CallSpec) -> PromptSize:
        if self.counted:
            return PromptSize(self._tokens(render(call)), self.context, exact=True)
        return PromptSize(plain_bound(call), self.context)

    def job_tokens_left(self) -> int | None:
        return self.job_left

    def spawn(self, child: Child[Any, OutputT], tasks: Sequence[BaseModel]) -> list[OutputT]:
        """Children answer at once: each output made from its task by `children`."""
        if self.children is None:
            raise SpawnRefused("no sub-agents here")
        self.spawned.extend(tasks)
        return [child.role.output.model_validate(self.children(t)) for t in tasks]


@dataclass
class Env:
    ctx: StepContext
    seen: list[str] = field(default_factory=list)


def echo(env: Env, args: Args) -> str:
    env.seen.append(args.text)
    return f"echo: {args.text} " * 20


def boom(env: Env, args: Args) -> str:
    raise RuntimeError("the disk is on fire")


def refuse(env: Env, args: Args) -> str:
    raise ToolError(f"cannot do {args.text!r}")


def stop(env: Env, args: Args) -> str:
    raise StepInterrupted("the job was cancelled")


TOOLS = (Tool("echo", "Say it back.", Args, echo), Tool("boom", "Fails.", Args, boom),
         Tool("refuse", "Refuses.", Args, refuse), Tool("stop", "Stops.", Args, stop))


def fallback(messages: list[ChatMessage], text: str) -> Answer:
    return Answer(answer="fallback")


AGENT: Agent[Env, Answer] = Agent(instructions="Test things.", tools=TOOLS, answer=Answer,
                                  answer_description="Answer.", fallback=fallback,
                                  turn_max_tokens=64, final_max_tokens=64)


def call(tool: str, **arguments: Any) -> str:
    import json

    return json.dumps({"tool": tool, "arguments": arguments})


FINAL = '{"final": {"answer": "done"}}'


def tool_results(ctx: ScriptedContext) -> list[str]:
    last = ctx.calls[-1].messages or ()
    return [m.content for m in last if m.role in ("tool", "user")][1:]


def test_failing_tools_and_unknown_ones_are_results_the_model_reads() -> None:
    # (an answer with no action at all: a chat model that wrote text and called no tool)
    ctx = ScriptedContext([call("boom", text="x"), call("refuse", text="y"), call("nope"),
                           call("echo", wrong=1), (), FINAL])
    result = run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=10)
    assert result.stopped is Stop.ANSWERED
    assert result.answer == Answer(answer="done")
    assert result.turns == 6
    assert [c.turn for c in ctx.calls] == [1, 2, 3, 4, 5, 6]
    results = tool_results(ctx)
    assert results[0] == "error: boom failed: RuntimeError: the disk is on fire"
    assert results[1] == "error: cannot do 'y'"
    assert results[2].startswith("error: there is no tool 'nope'; the tools are: echo, boom")
    assert results[3].startswith("error: the arguments of echo do not fit: text: Field required")
    assert results[4] == NOT_AN_ACTION


def test_the_platform_stopping_a_step_is_not_a_tool_error() -> None:
    ctx = ScriptedContext([call("stop", text="x"), FINAL])
    with pytest.raises(StepInterrupted):
        run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=5)


def test_an_answer_that_does_not_fit_goes_back_to_the_model() -> None:
    ctx = ScriptedContext(['{"final": {"answer": 3, "extra": 1}}', FINAL])
    result = run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=5)
    assert result.answer.answer == "done"
    (bad,) = tool_results(ctx)
    assert bad.startswith("error: the answer does not fit: ")
    last = ctx.calls[-1].messages or ()
    assert [m.name for m in last if m.role == "tool"] == [ANSWER_TOOL]


def test_only_the_first_tool_call_of_a_turn_runs() -> None:
    two = (ToolCall("echo", '{"text": "a"}', "c1"), ToolCall("echo", '{"text": "b"}', "c2"))
    ctx = ScriptedContext([two, FINAL])
    env = Env(ctx)
    run_loop(ctx, AGENT, env, "Do it.", turns=5)
    assert env.seen == ["a"]
    messages = ctx.calls[-1].messages or ()
    assistant = next(m for m in messages if m.role == "assistant")
    assert [c.id for c in assistant.tool_calls] == ["c1"]
    (result,) = tool_results(ctx)
    assert result.endswith(ONE_ACTION)


def test_the_last_turn_may_only_answer_and_a_bad_last_answer_is_the_fallback() -> None:
    ctx = ScriptedContext([call("echo", text="again")])
    result = run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=3)
    assert result.stopped is Stop.TURN_LIMIT
    assert result.turns == 3
    assert [c.tool_choice for c in ctx.calls] == ["required", "required", ANSWER_TOOL]
    # the script insists on a tool; under the answer-only schema the server fits an answer
    assert result.answer.answer.startswith("Stand-in answer")
    assert result.fallback is False

    cut = ScriptedContext(['{"final": {"answer": "a long answer cut short by max_tokens"}}'])
    cut_agent = Agent(instructions="Test things.", tools=TOOLS, answer=Answer,
                      answer_description="Answer.", fallback=fallback, final_max_tokens=3)
    result = run_loop(cut, cut_agent, Env(cut), "Do it.", turns=1)
    assert result.fallback is True
    assert result.answer.answer == "fallback"


def test_no_room_for_a_last_call_leaves_the_fallback_without_a_call() -> None:
    ctx = ScriptedContext([FINAL], step_max_tokens=40)
    result = run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=5)
    assert ctx.calls == []
    assert result.fallback is True
    assert result.stopped is Stop.STEP_BUDGET


@pytest.mark.parametrize("step_budget", [900, 1500, 2500, 4000, 6000, 9000, 14000])
def test_the_step_budget_holds_under_one_token_per_byte(step_budget: int) -> None:
    ctx = ScriptedContext([call("echo", text="more please")], step_max_tokens=step_budget,
                          bytes_as_tokens=True)
    # Bytes are tokens here: room enough for a last answer's JSON.
    agent = Agent(instructions="Test things.", tools=TOOLS, answer=Answer,
                  answer_description="Answer.", fallback=fallback, turn_max_tokens=64,
                  final_max_tokens=200)
    result = run_loop(ctx, agent, Env(ctx), "Do it.", turns=100)
    assert result.tokens <= step_budget
    assert result.stopped is Stop.STEP_BUDGET
    if ctx.calls:
        assert ctx.calls[-1].tool_choice == ANSWER_TOOL
        assert result.fallback is False
    if step_budget >= 6000:  # a turn, its result (3000 bytes at most) and a last call
        assert result.turns >= 2


def test_a_job_budget_near_its_end_brings_the_last_call_forward() -> None:
    ctx = ScriptedContext([call("echo", text="more")], job_left=900)
    result = run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=10)
    assert result.stopped is Stop.JOB_BUDGET
    assert result.turns == 1
    assert ctx.calls[0].fit_to_job is True


def big(env: Env, args: Args) -> str:
    return "word " * 3000


BIG_AGENT: Agent[Env, Answer] = Agent(
    instructions="Test things.", tools=(Tool("big", "Says a lot.", Args, big),), answer=Answer,
    answer_description="Answer.", fallback=fallback, turn_max_tokens=64, final_max_tokens=64)


def test_the_models_context_holds_every_call_and_results_are_cut_to_fit() -> None:
    ctx = ScriptedContext([call("big", text="x")], counted=True, context=900)
    result = run_loop(ctx, BIG_AGENT, Env(ctx), "Do it.", turns=50)
    assert result.stopped is Stop.CONTEXT
    assert result.fallback is False
    assert result.turns >= 2
    for spec in ctx.calls:
        assert spec.max_tokens is not None
        assert ctx.prompt_size(spec).tokens + spec.max_tokens <= 900
    results = [m.content for m in ctx.calls[-1].messages or () if m.role == "tool"]
    assert results
    assert all(r.endswith("bytes]") for r in results)


def test_counted_prompts_let_the_same_budget_go_further_than_bounds() -> None:
    turns = {}
    for counted in (False, True):
        ctx = ScriptedContext([call("echo", text="more please")], step_max_tokens=5000,
                              counted=counted)
        result = run_loop(ctx, AGENT, Env(ctx), "Do it.", turns=100)
        assert result.tokens <= 5000
        assert result.stopped is Stop.STEP_BUDGET
        turns[counted] = result.turns
    assert turns[True] > turns[False] >= 1


class HelperTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str


class HelperNote(BaseModel):
    topic: str
    note: str


HELPER = Role("helper", HelperNote, "helping")
ASK = Child(HELPER, HelperTask, max_tokens=100, description="Ask helpers about topics.")
SPAWNING: Agent[Env, Answer] = Agent(
    instructions="Delegate.", tools=(spawn_tool(ASK),), answer=Answer,
    answer_description="Answer.", fallback=fallback, turn_max_tokens=64, final_max_tokens=64)


def test_the_spawn_tool_shows_the_childrens_typed_outputs_and_refusals_are_tool_errors(
        ) -> None:
    ctx = ScriptedContext(
        [call("spawn", tasks=[{"topic": "bees"}, {"topic": "wax"}]),
         call("spawn", tasks=[]), call("spawn", tasks=[{"subject": "x"}]), FINAL],
        children=lambda t: {"topic": t.model_dump()["topic"], "note": "noted"})
    result = run_loop(ctx, SPAWNING, Env(ctx), "Do it.", turns=10)
    assert result.answer == Answer(answer="done")
    assert ctx.spawned == [HelperTask(topic="bees"), HelperTask(topic="wax")]
    spawned, empty, wrong = tool_results(ctx)
    assert spawned.splitlines() == [
        "2 sub-agent(s) finished. Their answers, in the order of the tasks:",
        '[1] {"topic":"bees","note":"noted"}', '[2] {"topic":"wax","note":"noted"}']
    assert empty.startswith("error: the arguments of spawn do not fit: tasks: List should "
                            "have at least 1 item")
    assert wrong.startswith("error: the arguments of spawn do not fit: tasks.0.topic:")
    schema = ctx.calls[0].tools[0].parameters
    assert schema["properties"]["tasks"]["items"] == {"$ref": "#/$defs/HelperTask"}
    refused = ScriptedContext([call("spawn", tasks=[{"topic": "bees"}]), FINAL])
    run_loop(refused, SPAWNING, Env(refused), "Do it.", turns=5)
    assert tool_results(refused) == ["error: no sub-agents here"]
