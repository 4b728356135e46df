"""The `echo` job kind: `shout` asks the model for a line and upper-cases it; `echo`, which
depends on it, reads that line as a `ShoutOutput` and repeats it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from agents.base import AgentError, CallSpec, JobKind, Role, StepContext, StepOutputs, StepSpec


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=200, description="What to shout.")


class ShoutOutput(BaseModel):
    text: str


class EchoOutput(BaseModel):
    echo: str
    length: int


class EchoResult(BaseModel):
    shout: str
    echo: str
    length: int = Field(description="Characters in the shout.")


SHOUT = Role("shout", ShoutOutput, "shouting")
ECHO = Role("echo", EchoOutput, "echoing")


def echo_of(shout: str) -> str:
    return f"{shout}... {shout.lower()}..."


class Echo(JobKind[EchoInput, EchoResult]):
    name = "echo"
    input_model = EchoInput
    result_model = EchoResult
    roles = (SHOUT, ECHO)

    def initial_steps(self, job_input: EchoInput) -> list[StepSpec]:
        return [StepSpec(key="shout", role=SHOUT, max_tokens=32),
                StepSpec(key="echo", role=ECHO, max_tokens=1, depends_on=("shout",))]

    def run_step(self, ctx: StepContext, job_input: EchoInput) -> BaseModel:
        if ctx.role == SHOUT.name:
            reply = ctx.complete(CallSpec(prompt=f"Shout this: {job_input.text}\nShouted:",
                                          stop=["\n"]))
            return ShoutOutput(text=reply.text.strip().upper())
        if ctx.role == ECHO.name:
            shout = ctx.parents.one(SHOUT)
            return EchoOutput(echo=echo_of(shout.text), length=len(shout.text))
        raise AgentError(f"echo jobs have no role {ctx.role!r}")

    def result(self, job_input: EchoInput, outputs: StepOutputs) -> EchoResult:
        echoed = outputs.one(ECHO)
        return EchoResult(shout=outputs.one(SHOUT).text, echo=echoed.echo,
                          length=echoed.length)
