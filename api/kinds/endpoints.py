"""`/v1/kinds`: the job kinds this deployment runs, with their input and result schemas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from agents.registry import get_kind, kind_names
from api.deps import CurrentPrincipal
from api.responses import ERRORS
from orchestrator.jobs import unavailable_kinds

router = APIRouter(tags=["jobs"], responses=ERRORS)


class JobKindInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "completion", "roles": ["generator"], "input_schema": {"type": "object"},
        "result_schema": None, "available": True, "unavailable_reason": None}]})

    name: str
    roles: list[str]
    input_schema: dict[str, Any]
    result_schema: dict[str, Any] | None
    available: bool = Field(
        default=True, description="Whether this deployment runs jobs of this kind now; "
                                  "submissions of an unavailable kind are refused (422).")
    unavailable_reason: str | None = Field(
        default=None, description="Why not (for example: no worker that is up can isolate "
                                  "a coding job's commands), naming the setting that decides.")


class JobKindList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[JobKindInfo]


@router.get("/v1/kinds", response_model=JobKindList)
def list_kinds(_: CurrentPrincipal) -> Any:
    """Every job kind: its name, the roles of its steps (the keys of `budget.step_max_tokens`),
    the JSON schemas of its `input` and of its `result`, and whether this deployment runs it
    now (coding jobs need a worker whose sandbox can isolate them)."""
    unavailable = unavailable_kinds()
    out = []
    for name in kind_names():
        kind = get_kind(name)
        assert kind is not None
        out.append({"name": name, "roles": sorted(r.name for r in kind.roles),
                    "input_schema": kind.input_model.model_json_schema(),
                    "result_schema": kind.result_model.model_json_schema(),
                    "available": name not in unavailable,
                    "unavailable_reason": unavailable.get(name)})
    return {"data": out}
