"""The admin page's scheduling figures in a real headless browser, against the database: jobs
with a deadline, misses and promotions; gCO2 per million tokens beside kWh; and what flex jobs
that waited for a window saved against running at submission, recomputed here from the ledger
rows and the same grid schedule."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.helpers import TERMINAL, auth, wait_until
from tests.stack import isolated_stack
from tests.test_admin_browser import ARTIFACTS, browser_command


def _schedule(now: datetime) -> list[dict[str, float]]:
    """The current hour cheapest and cleanest; each hour after it dearer and dirtier, so a
    job submitted earlier (hours before now) had a dearer, dirtier hour."""
    out = []
    for h in range(24):
        k = (h - now.hour) % 24
        out.append({"price": 0.05 + 0.01 * k, "carbon": 100.0 + 10.0 * k})
    return out


def _db(stack_env: dict[str, str]) -> str:
    url = make_url(stack_env["AGENTQ_DATABASE_URL"]).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@pytest.mark.usefixtures("standin")
def test_admin_page_shows_scheduling_figures_that_match_the_ledger(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path) -> None:
    now = datetime.now(UTC)
    hours = _schedule(now)
    env = {"AGENTQ_GRID_SCHEDULE": json.dumps(hours),
           "AGENTQ_ENDPOINT_WATTS": json.dumps({"*": 400})}
    with isolated_stack(database_url, {**agentq_env, **env}, tmp_path, "_admgrid") as stack:
        key = stack.key("windows")
        admin = subprocess.run(
            [*stack_cli(), "keys", "create", "--tenant", "ops", "--admin"], env=stack.env,
            capture_output=True, text=True, check=True).stdout.strip()
        stack.worker("w1", concurrency=4)
        deadline = (now + timedelta(hours=3)).isoformat()
        bodies: list[dict[str, Any]] = [
            # Waits for a window: the best hour is now, so it runs at once.
            {"kind": "completion", "input": {"prompt": "Clean hour", "max_tokens": 8},
             "service_tier": "flex", "deadline": deadline, "optimize": "carbon"},
            {"kind": "completion", "input": {"prompt": "Cheap hour", "max_tokens": 8},
             "service_tier": "flex", "deadline": deadline, "optimize": "cost"},
            # A deadline near the estimate (60 s, twice): promoted if it has not ended by
            # the sweeper's next pass.
            {"kind": "completion", "input": {"prompt": "Soon", "max_tokens": 8},
             "service_tier": "flex", "deadline": (now + timedelta(seconds=90)).isoformat()},
            {"kind": "completion", "input": {"prompt": "Standard", "max_tokens": 8}},
        ]
        ids = []
        for body in bodies:
            r = httpx.post(f"{stack.api}/v1/jobs", headers=auth(key), json=body, timeout=30)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        def ended() -> bool:
            return all(httpx.get(f"{stack.api}/v1/jobs/{i}", headers=auth(key), timeout=30)
                       .json()["status"] in TERMINAL for i in ids)

        wait_until(ended, 90, what="the jobs")
        with psycopg.connect(_db(stack.env)) as db:
            # The windowed jobs as if submitted three hours ago (a simulated clock for the
            # counterfactual: their hour of submission was dearer and dirtier).
            db.execute("UPDATE jobs SET created_at = created_at - interval '3 hours' "
                       "WHERE optimize IS NOT NULL")
            db.commit()
            expected = _expected(db, hours)

        out = ARTIFACTS / "grid"
        out.mkdir(parents=True, exist_ok=True)
        cmd, benv = browser_command()
        proc = subprocess.run([*cmd, stack.api, admin, str(out), ""], env=benv,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout)
        api = httpx.get(f"{stack.api}/v1/admin/scheduling", headers=auth(admin), timeout=30)
        assert api.status_code == 200, api.text
        for name, value in expected.items():
            if name in api.json():
                assert api.json()[name] == pytest.approx(value, rel=1e-9), name
    figures = report["admin"]["figures"]
    for name, value in expected.items():
        shown = figures.get(name)
        assert shown is not None, f"no [data-figure={name}] with a value: {sorted(figures)}"
        assert shown == pytest.approx(value, rel=1e-9), name
    assert expected["deadline_jobs"] == 3
    assert expected["window_jobs"] == 2
    assert expected["window_carbon_saving"] > 0
    assert expected["window_power_saving"] > 0
    rows = {r["id"]: r["cols"] for r in report["admin"]["tenants"]}
    assert any(c.get("gco2_per_million_tokens") for c in rows.values()), rows
    assert (out / "admin.png").stat().st_size > 0
    assert report["console_errors"] == []


def stack_cli() -> list[str]:
    import sys
    return [sys.executable, "-m", "api.cli"]


def _expected(db: psycopg.Connection[Any], hours: list[dict[str, float]]) -> dict[str, float]:
    """The figures, recomputed from the rows: the ledger's own price and carbon of each call
    against the schedule's hour of its job's submission."""
    counts = db.execute(
        "SELECT count(*), count(*) FILTER (WHERE finished_at > due_at OR (finished_at IS NULL "
        "AND due_at < now())), count(promoted_at) FROM jobs WHERE due_at IS NOT NULL").fetchone()
    assert counts is not None
    jobs, missed, promoted = counts
    sums = db.execute(
        "SELECT sum(prompt_tokens + completion_tokens), "
        "sum(energy_wh * carbon_intensity / 1000.0) FROM model_calls").fetchone()
    assert sums is not None
    tokens, carbon_g = sums
    rows = db.execute(
        "SELECT m.energy_wh, m.power_price, m.carbon_intensity, j.created_at, j.id "
        "FROM model_calls m JOIN jobs j ON j.id = m.job_id "
        "WHERE j.optimize IS NOT NULL AND m.energy_wh IS NOT NULL").fetchall()
    assert rows
    assert all(p is not None for _, p, _, _, _ in rows)
    usd = sum(w / 1000 * p for w, p, _, _, _ in rows)
    g = sum(w / 1000 * c for w, _, c, _, _ in rows)
    usd0 = sum(w / 1000 * hours[t.astimezone(UTC).hour]["price"] for w, _, _, t, _ in rows)
    g0 = sum(w / 1000 * hours[t.astimezone(UTC).hour]["carbon"] for w, _, _, t, _ in rows)
    return {"deadline_jobs": jobs, "deadline_misses": missed, "jobs_promoted": promoted,
            "gco2_per_million_tokens": carbon_g / tokens * 1e6,
            "window_jobs": len({j for *_, j in rows}),
            "window_power_usd": usd, "window_power_usd_at_submission": usd0,
            "window_carbon_g": g, "window_carbon_g_at_submission": g0,
            "window_power_saving": 1 - usd / usd0, "window_carbon_saving": 1 - g / g0}
