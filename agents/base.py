"""The typed contract between job kinds and the orchestrator.

A job kind is a `JobKind[InputT, ResultT]`: it parses its input, declares its roles (each a
`Role[OutputT]` with a pydantic output model), the steps it starts with, how a finished step
expands the plan, what each role does and how the finished steps become its `ResultT`.

A step reads its parents' outputs as their models, never as dictionaries looked up by string:

    plan = ctx.parents.one(PLANNER)            # a PlanOutput
    sections = ctx.parents.all(INVESTIGATOR)   # list[InvestigationOutput], in step order

Renaming a field of an output model is then a type error at every reader, not a failure at run
time. Agents never open database sessions: model calls, corpus search and passage reading all go
through the `StepContext`.

A role may spawn sub-agents: it lists the roles it may add as child steps, each with the
model of the child's task (`Role(..., spawns=(Child(WORKER, WorkerTask, ...),))`); an agent
calls `ctx.spawn(child, tasks)` (or lets its model call the `spawn` tool, `agents.spawn`),
its step waits, holding no worker, while the children run as steps of their own, and its next
run gets their outputs as `child.role`'s model.

Kinds are found through the `agentq.kinds` entry-point group (see `agents.registry`), so a
package of one's own adds a kind without editing agentq.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from core.errors import StepInterrupted
from inference.calls import CallSpec, ChatMessage, PromptSize, ToolCall, ToolSchema

__all__ = ["AgentError", "AnyKind", "CallSpec", "ChatMessage", "Child", "Deployment",
           "Document", "JobKind", "ModelReply", "Passage", "PromptSize", "Role",
           "SpawnRefused", "StepContext", "StepOutputs", "StepSpec", "StepStopped",
           "StepSuspended", "SubmissionContext", "ToolCall", "ToolSchema", "WorkerSandbox"]

InputT = TypeVar("InputT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)
TaskT = TypeVar("TaskT", bound=BaseModel)


class AgentError(Exception):
    """A step failed for a reason the agent can name (bad model output it cannot use, a tool
    that cannot run); the job fails with this message."""

    code = "agent_error"


class StepStopped(StepInterrupted):
    """The job stopped (cancelled, failed elsewhere), or the run lost its step, while it ran.
    Raised by the context's model calls, or by an agent whose long work `ctx.stopped()` ended;
    the step ends cancelled."""


class StepSuspended(StepInterrupted):
    """The step waits for the children it spawned (raised by `StepContext.spawn`; agents let
    it through). The run ends without an output: the children are added to the job's DAG,
    the step depends on them, and it runs again once they have all completed, replaying its
    finished model calls from the ledger, when `spawn` returns their outputs."""

    def __init__(self, children: Sequence[StepSpec], waiting_for: Sequence[str],
                 spawned_before: int = 0) -> None:
        super().__init__(f"waiting for {len(waiting_for)} spawned step(s)")
        self.children = tuple(children)
        self.waiting_for = tuple(waiting_for)
        # The children this step's earlier spawns (in its transcript) were given: with the
        # other steps' spawned steps, what the job's cap is checked against again as the
        # children are added.
        self.spawned_before = spawned_before


class SpawnRefused(Exception):
    """A spawn the limits forbid (too many children for the step or the job, or a budget
    without room for them); the message says which and is the model's to read."""


@dataclass(frozen=True)
class Role(Generic[OutputT]):
    """A kind of step: its name (as stored on the step), the model of its output, and the
    phase a job shows while steps of this role run. `spawns`: the children its steps may
    add to the job (see `Child`)."""

    name: str
    output: type[OutputT]
    phase: str
    spawns: tuple[Child[Any, Any], ...] = ()

    def parse(self, raw: Mapping[str, Any] | None) -> OutputT:
        return self.output.model_validate(raw or {})


@dataclass(frozen=True)
class Child(Generic[TaskT, OutputT]):
    """A role whose steps another role may spawn: the child's role, the model of the task it
    is given, its step budget (`max_tokens`, overridden by the job's `step_max_tokens` for
    its role), and what the model is told of it (the `spawn` tool's description). A child
    step reads its task with `task_of(ctx)`; `turn_limit` is its agent loop's turn limit."""

    role: Role[OutputT]
    task: type[TaskT]
    max_tokens: int
    description: str
    tool: str = "spawn"
    turn_limit: int | None = None

    def step_input(self, task: BaseModel) -> dict[str, Any]:
        """The child step's input: its task (validated against the task model)."""
        parsed = self.task.model_validate(task.model_dump(mode="json"))
        out: dict[str, Any] = {"task": parsed.model_dump(mode="json")}
        if self.turn_limit is not None:
            out["turn_limit"] = self.turn_limit
        return out

    def task_of(self, ctx: StepContext) -> TaskT:
        """In a child step: the task it was spawned with."""
        return self.task.model_validate(ctx.step_input.get("task") or {})


@dataclass(frozen=True)
class StepSpec:
    """A step to add to a job's DAG. `input` is the step's own JSON input (small: an index, a
    question); what it needs of other steps it reads from their outputs."""

    key: str
    role: Role[Any]
    max_tokens: int
    depends_on: Sequence[str] = ()
    input: Mapping[str, Any] = field(default_factory=dict)
    # The step that spawned this one (its key), for a spawned child.
    spawned_by: str | None = None


@dataclass(frozen=True)
class ModelReply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    # Answered from the ledger: a re-run step's finished call, or an identical earlier call of
    # the same job (the call cache).
    replayed: bool = False
    cached: bool = False
    model: str | None = None
    # Set when a validator was given: whether the answer passed it, and the smaller model whose
    # answer did not (the call escalated).
    valid: bool | None = None
    escalated_from: str | None = None
    # The tools the model chose to call (a conversation's turn); its final answer is a call of
    # the call's `answer` tool.
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk of a corpus. `chunk_id` is the id an answer cites."""

    chunk_id: str
    document_id: str
    document_title: str
    text: str
    score: float


@dataclass(frozen=True)
class Document:
    """A whole document of a corpus: its text as extracted, rebuilt from its chunks."""

    document_id: str
    title: str
    text: str


class StepOutputs:
    """Finished steps' outputs, read as their roles' models. Built by the orchestrator from
    the stored outputs: `{key: (role name, output JSON)}` in step order."""

    def __init__(self, stored: Mapping[str, tuple[str, Mapping[str, Any] | None]]) -> None:
        self._stored = dict(stored)
        self._parsed: dict[str, BaseModel] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._stored

    def __len__(self) -> int:
        return len(self._stored)

    def keys(self) -> list[str]:
        return list(self._stored)

    def role_of(self, key: str) -> str:
        return self._stored[key][0]

    def get(self, role: Role[OutputT], key: str) -> OutputT | None:
        """The output of step `key`, which must be of `role`; None when it has not finished."""
        found = self._stored.get(key)
        if found is None:
            return None
        if found[0] != role.name:
            raise KeyError(f"step {key!r} is a {found[0]}, not a {role.name}")
        parsed = self._parsed.get(key)
        if parsed is None:
            try:
                parsed = self._parsed[key] = role.parse(found[1])
            except ValidationError as exc:
                raise AgentError(f"the stored output of step {key!r} does not fit "
                                 f"{role.output.__name__}: {exc}") from exc
        assert isinstance(parsed, role.output)
        return parsed

    def one(self, role: Role[OutputT], key: str | None = None) -> OutputT:
        """The output of step `key` (by default, the only finished step of `role`)."""
        if key is None:
            keys = [k for k, (r, _) in self._stored.items() if r == role.name]
            if len(keys) != 1:
                raise KeyError(f"{len(keys)} finished steps of role {role.name}, not one")
            key = keys[0]
        out = self.get(role, key)
        if out is None:
            raise KeyError(f"step {key!r} has not finished")
        return out

    def all(self, role: Role[OutputT]) -> list[OutputT]:
        """The outputs of every finished step of `role`, in step order."""
        return [out for _, out in self.items(role)]

    def items(self, role: Role[OutputT]) -> Iterator[tuple[str, OutputT]]:
        for key, (r, _) in self._stored.items():
            if r == role.name:
                out = self.get(role, key)
                assert out is not None
                yield key, out

    def raw(self) -> dict[str, Mapping[str, Any] | None]:
        """The stored JSON by step key (for generic partial results)."""
        return {k: v for k, (_, v) in self._stored.items()}


class StepContext(Protocol):
    """What an agent may do while running a step. Every model call is reserved against the
    job's budget, metered, cached, recorded in the ledger and cancelled with the job."""

    @property
    def step_key(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def step_input(self) -> Mapping[str, Any]: ...

    @property
    def step_max_tokens(self) -> int: ...

    @property
    def parents(self) -> StepOutputs:
        """The outputs of the steps this step depends on."""
        ...

    def complete(self, call: CallSpec) -> ModelReply: ...

    def stopped(self) -> bool:
        """True once the job has stopped or this run lost its step: long work (a sandboxed
        command) should end and raise StepStopped."""
        ...

    def search_corpus(self, corpus_id: str, query: str, k: int) -> list[Passage]:
        """The `k` passages of the corpus that best answer the query (BM25), best first."""
        ...

    def read_passages(self, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
        """The text of these chunks of the corpus, by chunk id (unknown ids are left out)."""
        ...

    def read_document(self, corpus_id: str, document_id: str) -> Document | None:
        """A whole document of the corpus; None when the corpus holds no such document."""
        ...

    def read_file(self, file_id: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one of the tenant's files (an OpenAI batch's input file);
        empty when the tenant has no such file."""
        ...

    def prompt_size(self, call: CallSpec) -> PromptSize:
        """The call's prompt in tokens on whichever model may take it (counted by its server
        where it can, else an upper bound), and that model's context."""
        ...

    def job_tokens_left(self) -> int | None:
        """About how many tokens the job's budget has left (None: it has no token budget),
        as last seen by this step: other steps spend meanwhile, and the reservation before
        each call is what holds the budget."""
        ...

    def spawn(self, child: Child[Any, OutputT], tasks: Sequence[BaseModel]) -> list[OutputT]:
        """Run one child step of `child.role` per task, in parallel, and return their outputs
        in the order of `tasks`. The first time, the children are added to the job and
        `StepSuspended` is raised: the step ends waiting (no worker held) and runs again,
        replaying its finished calls, once they have all completed; then the same call finds
        them and returns their outputs. A child's key is `<this step's key>.<n>`. Raises
        `SpawnRefused` when the children would pass `AGENTQ_SPAWN_MAX_CHILDREN` (per step),
        `AGENTQ_SPAWN_MAX_PER_JOB` or what the job's budget has left for their step
        budgets; `child` must be one this step's role declares (else `AgentError`)."""
        ...


@dataclass(frozen=True)
class WorkerSandbox:
    """What a worker that is up said of its sandbox for untrusted commands."""

    worker: str
    mode: str  # the strongest sandbox mode it has (agents.sandbox)
    refusal: str | None  # why it refuses to run untrusted commands; None: it runs them


class Deployment(Protocol):
    """What a kind may know of the deployment, to say whether it can run now."""

    def worker_sandboxes(self) -> list[WorkerSandbox]:
        """The sandboxes of the workers that are up (empty when none has said)."""
        ...


class SubmissionContext(Deployment, Protocol):
    """What a kind may check at submission, for the submitting tenant."""

    def corpus_exists(self, corpus_id: str) -> bool: ...


class JobKind(Generic[InputT, ResultT]):
    """Base class of job kinds. Subclasses set the class attributes and implement
    `initial_steps`, `run_step` and `result`."""

    name: ClassVar[str]
    input_model: type[InputT]
    # The shape of `result(...)`, published at `GET /v1/kinds`.
    result_model: type[ResultT]
    roles: ClassVar[Sequence[Role[Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        roles = getattr(cls, "roles", None)
        if roles is None:
            return
        names = {r.name for r in roles}
        for r in roles:
            for child in r.spawns:
                if child.role.name not in names:
                    raise TypeError(f"{cls.__name__}: role {r.name!r} spawns "
                                    f"{child.role.name!r}, which is not one of its roles")

    def role(self, name: str) -> Role[Any]:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"{self.name} jobs have no role {name!r}")

    @property
    def phases(self) -> dict[str, str]:
        return {r.name: r.phase for r in self.roles}

    def parse_input(self, raw: Mapping[str, Any]) -> InputT:
        return self.input_model.model_validate(raw)

    def check(self, ctx: SubmissionContext, job_input: InputT) -> None:
        """Checks that need stored state, at submission (for example that a corpus the input
        names is the tenant's); raise `core.errors.InvalidInput` to refuse with a 422."""

    def unavailable(self, deployment: Deployment) -> str | None:
        """Why this deployment cannot run jobs of this kind now (None: it can), shown at
        `GET /v1/kinds`; a kind whose `check` refuses such jobs says the same there."""
        return None

    def default_max_total_tokens(self, job_input: InputT) -> int | None:
        """The job's token budget when the request sets none (None:
        `AGENTQ_DEFAULT_JOB_MAX_TOTAL_TOKENS`)."""
        return None

    def initial_steps(self, job_input: InputT) -> list[StepSpec]:
        raise NotImplementedError

    def expand(self, job_input: InputT, step_key: str, role: Role[Any],
               output: BaseModel) -> list[StepSpec]:
        """Steps that become known once `step_key` (of `role`) has finished; none by default."""
        return []

    def decides(self, job_input: InputT, step_key: str, role: Role[Any],
                output: BaseModel) -> bool:
        """Whether step `step_key`, just finished, decides the job (the first of parallel
        candidates to succeed): every other step of the job still to run or running is
        cancelled (a running one stops within a second, its model call aborted at the
        server) and the job ends with its result now. No by default."""
        return False

    def run_step(self, ctx: StepContext, job_input: InputT) -> BaseModel:
        """Run one step of role `ctx.role`; return an instance of that role's output model."""
        raise NotImplementedError

    def result(self, job_input: InputT, outputs: StepOutputs) -> ResultT:
        raise NotImplementedError

    def partial_result(self, job_input: InputT, outputs: StepOutputs) -> dict[str, Any]:
        """What to return when a job stops early (budget): by default, the finished steps."""
        return {"partial": True, "steps": {k: dict(v or {}) for k, v in outputs.raw().items()}}


AnyKind = JobKind[Any, Any]
