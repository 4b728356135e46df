"""`/v1/kinds`: the job kinds this deployment runs, with their input and result schemas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from agents.registry import get_kind, kind_names
from api.deps import CurrentPrincipal
from api.responses import ERRORS

router = APIRouter(tags=["jobs"], responses=ERRORS)


class JobKindInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "completion", "roles": ["generator"], "input_schema": {"type": "object"},
        "result_schema": None}]})

    name: str
    roles: list[str]
    input_schema: dict[str, Any]
    result_schema: dict[str, Any] | None


class JobKindList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": []}]})

    data: list[JobKindInfo]


@router.get("/v1/kinds", response_model=JobKindList)
def list_kinds(_: CurrentPrincipal) -> Any:
    """Every job kind: its name, the roles of its steps (the keys of `budget.step_max_tokens`),
    and the JSON schemas of its `input` and of its `result`."""
    out = []
    for name in kind_names():
        kind = get_kind(name)
        assert kind is not None
        out.append({"name": name, "roles": sorted(r.name for r in kind.roles),
                    "input_schema": kind.input_model.model_json_schema(),
                    "result_schema": kind.result_model.model_json_schema()})
    return {"data": out}
