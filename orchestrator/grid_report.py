"""Scheduling figures for operators, from the ledger: deadlines missed and promoted, and what
flex jobs that waited for a window saved against running each call when its job was submitted.

The counterfactual uses the same grid schedule (`core.grid`, of the endpoint that served each
call) and the same calls: each call's energy priced at the hour its job was submitted, against
the price and carbon intensity the ledger recorded for the hour it ran. It assumes the calls
would have used the same energy at submission and run within that hour.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core import grid
from core.models import utcnow
from core.repositories import reports_grid
from core.repositories.reports import ReportFilter


def scheduling(session: Session, f: ReportFilter) -> dict[str, Any]:
    d = reports_grid.deadline_counts(session, f, utcnow())
    out: dict[str, Any] = {"deadline_jobs": d.jobs, "deadline_misses": d.missed,
                           "jobs_promoted": d.promoted}
    calls = [c for c in reports_grid.window_calls(session, f)
             if c.power_price is not None and c.carbon_intensity is not None]
    actual_usd = actual_g = then_usd = then_g = 0.0
    priced = []
    for c in calls:
        then = grid.at(c.submitted_at, c.endpoint)
        if then is None:
            continue  # the schedule no longer covers this endpoint
        kwh = c.energy_wh / 1000.0
        actual_usd += kwh * (c.power_price or 0.0)
        actual_g += kwh * (c.carbon_intensity or 0.0)
        then_usd += kwh * then.price
        then_g += kwh * then.carbon
        priced.append(c)
    out.update(
        window_jobs=len({c.job_id for c in priced}), window_calls=len(priced),
        window_energy_wh=sum(c.energy_wh for c in priced),
        window_power_usd=actual_usd, window_power_usd_at_submission=then_usd,
        window_carbon_g=actual_g, window_carbon_g_at_submission=then_g,
        window_power_saving=(1 - actual_usd / then_usd) if then_usd else None,
        window_carbon_saving=(1 - actual_g / then_g) if then_g else None)
    return out
