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

__all__ = ["AgentError", "AnyKind", "CallSpec", "ChatMessage", "Deployment", "Document",
           "JobKind", "ModelReply", "Passage", "PromptSize", "Role", "StepContext",
           "StepOutputs", "StepSpec", "StepStopped", "SubmissionContext", "ToolCall",
           "ToolSchema", "WorkerSandbox"]

InputT = TypeVar("InputT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)


class AgentError(Exception):
    """A step failed for a reason the agent can name (bad model output it cannot use, a tool
    that cannot run); the job fails with this message."""

    code = "agent_error"


class StepStopped(StepInterrupted):
    """The job stopped (cancelled, failed elsewhere), or the run lost its step, while it ran.
    Raised by the context's model calls, or by an agent whose long work `ctx.stopped()` ended;
    the step ends cancelled."""


@dataclass(frozen=True)
class Role(Generic[OutputT]):
    """A kind of step: its name (as stored on the step), the model of its output, and the
    phase a job shows while steps of this role run."""

    name: str
    output: type[OutputT]
    phase: str

    def parse(self, raw: Mapping[str, Any] | None) -> OutputT:
        return self.output.model_validate(raw or {})


@dataclass(frozen=True)
class StepSpec:
    """A step to add to a job's DAG. `input` is the step's own JSON input (small: an index, a
    question); what it needs of other steps it reads from their outputs."""

    key: str
    role: Role[Any]
    max_tokens: int
    depends_on: Sequence[str] = ()
    input: Mapping[str, Any] = field(default_factory=dict)


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

    def run_step(self, ctx: StepContext, job_input: InputT) -> BaseModel:
        """Run one step of role `ctx.role`; return an instance of that role's output model."""
        raise NotImplementedError

    def result(self, job_input: InputT, outputs: StepOutputs) -> ResultT:
        raise NotImplementedError

    def partial_result(self, job_input: InputT, outputs: StepOutputs) -> dict[str, Any]:
        """What to return when a job stops early (budget): by default, the finished steps."""
        return {"partial": True, "steps": {k: dict(v or {}) for k, v in outputs.raw().items()}}


AnyKind = JobKind[Any, Any]
