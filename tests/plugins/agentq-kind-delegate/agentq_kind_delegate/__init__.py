"""The `delegate` job kind: `lead` agents that spawn `helper` sub-agents.

Each lead is an agent loop whose only tool is `spawn` (`agents.spawn`): the model hands it
topics, one `helper` step runs per topic in parallel, and their `HelperNote`s come back to the
lead, typed, once they have all finished. The lead's output keeps those notes (read as the
helper role's model from its finished children) next to its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from agents.base import (
    AgentError,
    CallSpec,
    ChatMessage,
    Child,
    JobKind,
    Role,
    StepContext,
    StepOutputs,
    StepSpec,
)
from agents.loop import Agent, run_loop
from agents.spawn import spawn_tool


class DelegateInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=300)
    rounds: int = Field(default=1, ge=1, le=3, description="Leads, one after the other.")
    parallel: bool = Field(default=False, description="The leads run at once, each on its "
                                                      "own, instead of one after the other.")


class HelperTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str = Field(min_length=1, max_length=100, description="What the helper looks into.")


class HelperNote(BaseModel):
    topic: str
    note: str


class LeadAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: str = Field(description="The answer, from the helpers' notes.")


class LeadOutput(BaseModel):
    answer: str
    notes: list[HelperNote]
    turns: int
    stopped: str


class DelegateResult(BaseModel):
    answer: str
    notes: list[HelperNote]
    leads: int


HELPER = Role("helper", HelperNote, "helping")
ASK_HELPERS = Child(HELPER, HelperTask, max_tokens=64,
                    description="Ask helpers, one per topic, to write a short note on it; "
                                "they work in parallel and you get their notes.")
LEAD = Role("lead", LeadOutput, "leading", spawns=(ASK_HELPERS,))


@dataclass
class LeadEnv:
    ctx: StepContext


def _no_answer(messages: list[ChatMessage], text: str) -> LeadAnswer:
    return LeadAnswer(answer="No answer was reached.")


AGENT: Agent[LeadEnv, LeadAnswer] = Agent(
    instructions="You lead a small team. Split the question into topics, ask helpers about "
                 "them with the spawn tool, then answer from their notes.",
    tools=(spawn_tool(ASK_HELPERS),), answer=LeadAnswer,
    answer_description="Give the final answer.", fallback=_no_answer,
    turn_max_tokens=96, final_max_tokens=96)


def lead_key(n: int) -> str:
    return f"lead-{n}"


class Delegate(JobKind[DelegateInput, DelegateResult]):
    name = "delegate"
    input_model = DelegateInput
    result_model = DelegateResult
    roles = (LEAD, HELPER)

    def initial_steps(self, job_input: DelegateInput) -> list[StepSpec]:
        return [StepSpec(key=lead_key(n), role=LEAD, max_tokens=4000,
                         depends_on=(lead_key(n - 1),) if n > 1 and not job_input.parallel
                         else (),
                         input={"round": n})
                for n in range(1, job_input.rounds + 1)]

    def run_step(self, ctx: StepContext, job_input: DelegateInput) -> BaseModel:
        if ctx.role == HELPER.name:
            task = ASK_HELPERS.task_of(ctx)
            reply = ctx.complete(CallSpec(prompt=f"Note on topic: {task.topic}\nNote:",
                                          stop=["\n"]))
            return HelperNote(topic=task.topic, note=reply.text.strip())
        if ctx.role == LEAD.name:
            n = int(ctx.step_input.get("round", 1))
            text = f"Round {n} of {job_input.rounds}. Question: {job_input.question}"
            if n > 1 and not job_input.parallel:
                text += f"\nThe answer so far: {ctx.parents.one(LEAD).answer}"
            result = run_loop(ctx, AGENT, LeadEnv(ctx), text)
            # Its finished children are among its parents, read as the helper's model.
            notes = ctx.parents.all(HELPER)
            return LeadOutput(answer=result.answer.answer, notes=notes, turns=result.turns,
                              stopped=str(result.stopped))
        raise AgentError(f"delegate jobs have no role {ctx.role!r}")

    def result(self, job_input: DelegateInput, outputs: StepOutputs) -> DelegateResult:
        leads = outputs.all(LEAD)
        return DelegateResult(answer=leads[-1].answer,
                              notes=[note for lead in leads for note in lead.notes],
                              leads=len(leads))
