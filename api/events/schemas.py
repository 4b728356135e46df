"""Schemas of a job's event log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_EVENT_EXAMPLE: dict[str, Any] = {
    "cursor": 7, "type": "step.completed", "created_at": "2026-11-22T10:00:04Z",
    "data": {"step": "investigate-1", "role": "investigator",
             "usage": {"prompt_tokens": 53, "completion_tokens": 13, "model_calls": 1}},
}


class EventOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_EVENT_EXAMPLE]})

    cursor: int = Field(description="Monotonically increasing within the job; pass as `after` "
                                    "or `Last-Event-ID` to resume after this event.")
    type: str
    data: dict[str, Any]
    created_at: datetime


class EventList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"data": [_EVENT_EXAMPLE], "next_cursor": 7, "has_more": False}]})

    data: list[EventOut]
    next_cursor: int = Field(description="Pass as `after` to get the events that follow.")
    has_more: bool
