"""The `spawn` tool: an agent loop's way to run sub-agents.

A role declares the children it may spawn (`Role(..., spawns=(Child(...),))`); `spawn_tool`
makes the tool for one of them. Its arguments are a list of tasks of the child's task model
(the JSON schema the model sees comes from pydantic); the tool hands them to
`StepContext.spawn`, which runs one child step per task in parallel. The first time, the step
ends waiting for them (`StepSuspended` passes through the loop); once they have all completed
it runs again, its earlier calls replayed from the ledger, and the same tool call now returns
the children's outputs, as JSON of the child role's output model, numbered in the order of
the tasks. A spawn the limits forbid comes back to the model as the tool's error.

    HELPER = Role("helper", Note, "helping")
    ASK_HELPER = Child(HELPER, HelperTask, max_tokens=512, description="Ask a helper ...")
    LEAD = Role("lead", LeadOutput, "leading", spawns=(ASK_HELPER,))
    AGENT = Agent(..., tools=(spawn_tool(ASK_HELPER),), ...)
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, create_model

from agents.base import Child, SpawnRefused
from agents.tools import Tool, ToolEnv, ToolError

TaskT = TypeVar("TaskT", bound=BaseModel)
EnvT = TypeVar("EnvT", bound=ToolEnv)


class SpawnArgs(BaseModel, Generic[TaskT]):
    """The spawn tool's arguments: one task per child to run."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskT] = Field(min_length=1, max_length=64,
                               description="One task per sub-agent; they run in parallel.")


def args_model(child: Child[TaskT, Any]) -> type[SpawnArgs[TaskT]]:
    """The argument model of `child`'s spawn tool (named after the tool, for its schema)."""
    name = "".join(p.capitalize() for p in child.tool.replace("-", "_").split("_")) + "Args"
    generic: Any = SpawnArgs  # parametrised at run time with the child's task model
    made: Any = create_model(name, __base__=generic[child.task])
    return cast(type[SpawnArgs[TaskT]], made)


def render(outputs: list[BaseModel]) -> str:
    """What the model reads: each child's output as JSON, numbered in task order."""
    lines = [f"{len(outputs)} sub-agent(s) finished. Their answers, in the order of the tasks:"]
    lines += [f"[{n}] {out.model_dump_json()}" for n, out in enumerate(outputs, 1)]
    return "\n".join(lines)


class _Spawn(Generic[EnvT, TaskT]):
    def __init__(self, child: Child[TaskT, Any]) -> None:
        self.child = child

    def __call__(self, env: EnvT, args: SpawnArgs[TaskT]) -> str:
        try:
            outputs = env.ctx.spawn(self.child, list(args.tasks))
        except SpawnRefused as exc:
            raise ToolError(str(exc)) from exc
        return render(outputs)


def spawn_tool(child: Child[TaskT, Any]) -> Tool[Any, Any]:
    """The tool that spawns `child`'s sub-agents (named `child.tool`, `spawn` by default)."""
    fn: _Spawn[Any, TaskT] = _Spawn(child)
    return Tool(child.tool, child.description, args_model(child), fn)
