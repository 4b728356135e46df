"""The electricity grid's hourly schedule: the price of power ($/kWh) and its carbon
intensity (gCO2/kWh) for each hour of the day (UTC), from `AGENTQ_GRID_SCHEDULE` or
`AGENTQ_GRID_SCHEDULE_FILE` (a file holding the same JSON): a list of 24
`{"price": ..., "carbon": ...}` for every endpoint, or an object mapping endpoint base URLs
to such lists, `"*"` for the endpoints it does not name. Flex jobs with a deadline and
`optimize` wait for the best window of the default schedule; the ledger records the figures
of the hour each call ran at the endpoint that served it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter

from core.settings import get_settings

Optimize = Literal["cost", "carbon"]
DEFAULT = "*"


class GridHour(BaseModel):
    price: float = Field(ge=0, description="Dollars per kWh")
    carbon: float = Field(ge=0, description="Grams of CO2 per kWh")


Hours = tuple[GridHour, ...]
_SCHEDULES = TypeAdapter(list[GridHour] | dict[str, list[GridHour]])


def _url(endpoint: str) -> str:
    return endpoint.rstrip("/")


@lru_cache(maxsize=1)
def schedules() -> dict[str, Hours] | None:
    """Each endpoint's 24 hours (hour 0 first, UTC), by base URL, `"*"` for the others; None
    when no schedule is configured."""
    settings = get_settings()
    raw = settings.grid_schedule
    if raw is None and settings.grid_schedule_file is not None:
        raw = json.loads(settings.grid_schedule_file.read_text())
    if raw is None:
        return None
    parsed = _SCHEDULES.validate_python(raw)
    by_url = {DEFAULT: parsed} if isinstance(parsed, list) else parsed
    if not by_url:
        raise ValueError("the grid schedule names no endpoint")
    for url, hours in by_url.items():
        if len(hours) != 24:
            raise ValueError(f"the grid schedule of {url!r} has {len(hours)} hours, not 24")
    return {(url if url == DEFAULT else _url(url)): tuple(h) for url, h in by_url.items()}


def schedule(endpoint: str | None = None) -> Hours | None:
    """The schedule of `endpoint` (its own, else the default). Without an endpoint (planning a
    job's start, before any endpoint is chosen): the default, or when only endpoints are named,
    each hour's mean over them."""
    by_url = schedules()
    if by_url is None:
        return None
    if endpoint is not None:
        return by_url.get(_url(endpoint), by_url.get(DEFAULT))
    if DEFAULT in by_url:
        return by_url[DEFAULT]
    named = list(by_url.values())
    return tuple(GridHour(price=sum(s[h].price for s in named) / len(named),
                          carbon=sum(s[h].carbon for s in named) / len(named))
                 for h in range(24))


def at(when: datetime, endpoint: str | None = None) -> GridHour | None:
    hours = schedule(endpoint)
    return hours[when.hour] if hours else None


def value(hour: GridHour, optimize: Optimize) -> float:
    return hour.price if optimize == "cost" else hour.carbon


def best_start(hours: Hours, now: datetime, latest: datetime, optimize: Optimize) -> datetime:
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
