"""The electricity grid's hourly schedule: the price of power ($/kWh) and its carbon
intensity (gCO2/kWh) for each hour of the day (UTC), from `AGENTQ_GRID_SCHEDULE` (a JSON list
of 24 `{"price": ..., "carbon": ...}`) or `AGENTQ_GRID_SCHEDULE_FILE` (a file holding one).
Flex jobs with a deadline and `optimize` wait for the best window in it; the ledger records
the hour's figures with each call."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter

from core.settings import get_settings

Optimize = Literal["cost", "carbon"]


class GridHour(BaseModel):
    price: float = Field(ge=0, description="Dollars per kWh")
    carbon: float = Field(ge=0, description="Grams of CO2 per kWh")


_SCHEDULE = TypeAdapter(list[GridHour])


@lru_cache(maxsize=1)
def schedule() -> tuple[GridHour, ...] | None:
    """The 24 hours of the schedule (hour 0 first, UTC), or None when none is configured."""
    settings = get_settings()
    raw = settings.grid_schedule
    if raw is None and settings.grid_schedule_file is not None:
        raw = json.loads(settings.grid_schedule_file.read_text())
    if raw is None:
        return None
    hours = _SCHEDULE.validate_python(raw)
    if len(hours) != 24:
        raise ValueError(f"the grid schedule has {len(hours)} hours, not 24")
    return tuple(hours)


def at(when: datetime) -> GridHour | None:
    hours = schedule()
    return hours[when.hour] if hours else None


def value(hour: GridHour, optimize: Optimize) -> float:
    return hour.price if optimize == "cost" else hour.carbon


def best_start(hours: tuple[GridHour, ...], now: datetime, latest: datetime,
               optimize: Optimize) -> datetime:
    """The start, from `now` up to `latest`, whose hour is cheapest (or cleanest): now, or
    the start of a later hour; the earliest of equals. `latest` before `now`: now."""
    best, best_v = now, value(hours[now.hour], optimize)
    t = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    while t <= latest:
        v = value(hours[t.hour], optimize)
        if v < best_v:
            best, best_v = t, v
        t += timedelta(hours=1)
    return best
