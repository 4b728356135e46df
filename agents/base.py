"""What every job kind declares, and the interface a step uses to call models.

A job kind is a module in `agents/` that defines a `JobKind` subclass and registers it. It declares
its input schema, the steps it starts with, how a finished step expands the plan (new steps and
their dependencies), what each role does, and how step outputs become the result. The API,
orchestrator and workers find kinds through the registry and need no edits for a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class StepSpec:
    """A step to add to a job's DAG."""

    key: str
    role: str
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


class StepContext(Protocol):
    """What an agent may do while running a step: call models, metered against the job."""

    step_max_tokens: int

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] | None = None,
        size: str | None = None,
        validate: Callable[[str], bool] | None = None,
    ) -> ModelReply:
        """`size`: the catalogue's size class to run on ("small", "large", ...); None: the
        smallest there is. `validate`: when the answer fails it, the call is made again on the
        next larger size class (a cascade), as long as there is one; every escalation is
        recorded on its call."""
        ...


class JobKind:
    """Base class of job kinds."""

    name: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    # The shape of `result(...)`, published at `GET /v1/kinds` (None: not declared).
    result_model: ClassVar[type[BaseModel] | None] = None
    # Phase shown in a job's progress while steps of each role run.
    phases: ClassVar[Mapping[str, str]] = {}

    def initial_steps(self, job_input: BaseModel) -> list[StepSpec]:
        raise NotImplementedError

    def expand(
        self, job_input: BaseModel, step_key: str, output: Mapping[str, Any]
    ) -> list[StepSpec]:
        """Steps that become known once `step_key` has finished (none by default)."""
        return []

    def run_step(
        self,
        ctx: StepContext,
        job_input: BaseModel,
        role: str,
        step_input: Mapping[str, Any],
        deps: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        raise NotImplementedError

    def result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def partial_result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """What to return when a job stops early (budget): by default, the finished steps."""
        return {"partial": True, "steps": {k: dict(v) for k, v in outputs.items()}}

    def parse_input(self, raw: Mapping[str, Any]) -> BaseModel:
        return self.input_model.model_validate(raw)

    def check(self, session: Session, tenant_id: str, job_input: BaseModel) -> None:
        """Checks that need the database, at submission (for example that a corpus the input
        names is the tenant's); raise `core.errors.InvalidInput` to refuse with a 422."""
