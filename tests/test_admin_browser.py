"""The admin page in a real headless browser (Debian's chromium driven by playwright-core, see
`tests/browser/admin_check.mjs`): sign in, read the figures and tables, filter by date, drill down
tenant → job → step, read a research job's timeline, and check that everything shown equals the
model-call ledger."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.keys import create_key
from core.models import Job, ModelCall, Step
from tests.helpers import ROOT, auth, wait_for_job
from tests.test_agent_loops import ANSWER, MARKER, Q1, SEARCH, make_corpus

pytestmark = pytest.mark.usefixtures("worker")

BROWSER_DIR = ROOT / "tests" / "browser"
SCRIPT = BROWSER_DIR / "admin_check.mjs"
ARTIFACTS = ROOT / "test-artifacts"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Figures the page shows that are sums over the ledger, by their data-figure names.
LEDGER_FIGURES = ("total_tokens", "prompt_tokens", "completion_tokens", "model_calls")
HINT = "run `make browser-deps` to install chromium and tests/browser/node_modules"

Sums = dict[str, Any]


def browser_command() -> tuple[list[str], dict[str, str]]:
    """The node command and its environment, or a failure saying how to install what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: {HINT}")
    chromium = os.environ.get("AGENTQ_CHROMIUM") or (
        DEFAULT_CHROMIUM if os.access(DEFAULT_CHROMIUM, os.X_OK) else shutil.which("chromium"))
    if chromium is None or not os.access(chromium, os.X_OK):
        pytest.fail(f"chromium is not installed: {HINT}")
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        pytest.fail(f"playwright-core is not installed in tests/browser/node_modules: {HINT}")
    return [node, str(SCRIPT)], {**os.environ, "AGENTQ_CHROMIUM": chromium}


def ledger_sums(*where: Any) -> Sums:
    with transaction() as s:
        prompt, completion, calls, cost = s.execute(
            select(func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
                   func.coalesce(func.sum(ModelCall.completion_tokens), 0),
                   func.count(),
                   func.coalesce(func.sum(ModelCall.cost_usd), 0)).where(*where)).one()
    return {"prompt_tokens": int(prompt), "completion_tokens": int(completion),
            "total_tokens": int(prompt) + int(completion), "model_calls": int(calls),
            "cost_usd": Decimal(cost or 0)}


def ledger_calls(*where: Any) -> dict[str, tuple[int, int, Decimal | None]]:
    """(prompt_tokens, completion_tokens, cost_usd) of each ledger row, by request id."""
    with transaction() as s:
        rows = s.execute(select(ModelCall.request_id, ModelCall.prompt_tokens,
                                ModelCall.completion_tokens, ModelCall.cost_usd)
                         .where(*where)).all()
    return {request_id: (int(prompt), int(completion), cost)
            for request_id, prompt, completion, cost in rows}


def run_browser(base_url: str, admin_key: str, timeline_job: str) -> dict[str, Any]:
    cmd, env = browser_command()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        proc = subprocess.run([*cmd, base_url, admin_key, str(ARTIFACTS), timeline_job],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr
        text = err.decode(errors="replace") if isinstance(err, bytes) else str(err or "")
        pytest.fail(f"the browser check ran past 120 s:\n{text}")
    if proc.returncode != 0:
        pytest.fail(f"the browser check failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    (ARTIFACTS / "admin_check.json").write_text(proc.stdout)
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def check_figures(figures: dict[str, Any], sums: Sums, where: str,
                  required: tuple[str, ...] = ("total_tokens",)) -> None:
    for name in required:
        assert name in figures, f"{where}: no [data-figure={name}] (has {sorted(figures)})"
    for name in LEDGER_FIGURES:
        if name in figures:
            assert figures[name] == sums[name], f"{where}: figure {name}"
    if "cost_usd" in figures and sums["cost_usd"] is None:
        assert figures["cost_usd"] is None, f"{where}: cost_usd shown for an unpriced call"
    elif "cost_usd" in figures:
        assert figures["cost_usd"] is not None, f"{where}: figure cost_usd has no data-value"
        assert abs(figures["cost_usd"] - float(sums["cost_usd"])) <= 1e-9, (
            f"{where}: figure cost_usd {figures['cost_usd']} != ledger {sums['cost_usd']}")


def check_timeline(timeline: dict[str, Any], job_id: str) -> None:
    """The Gantt chart of the job shows every step and every ledger call with the ledger's
    timings: the call's wait, time to first token and generation, the tool time between an
    investigator's calls, each step's queue wait and run."""
    assert timeline["job_id"] == job_id
    with transaction() as s:
        steps = {st.id: st for st in s.scalars(select(Step).where(Step.job_id == job_id))}
        calls = {c.request_id: c for c in s.scalars(select(ModelCall).where(
            ModelCall.job_id == job_id))}
        job = s.get(Job, job_id)
        assert job is not None
        origin = job.created_at
    lanes = {lane["step_id"]: lane for lane in timeline["lanes"]}
    assert set(lanes) == set(steps)
    shown: dict[str, dict[str, dict[str, Any]]] = {}
    for step_id, lane in lanes.items():
        st = steps[step_id]
        bars = lane["bars"]
        assert all(b["ms"] >= 0 and b["width"] >= 1 for b in bars), lane
        run = [b for b in bars if b["phase"] == "run"]
        assert len(run) == 1, lane
        assert st.started_at is not None
        assert st.finished_at is not None
        queue = [b for b in bars if b["phase"] == "queue"]
        if st.enqueued_at is not None and st.enqueued_at < st.started_at:
            assert len(queue) == 1, lane
            assert queue[0]["ms"] == pytest.approx(
                (st.started_at - st.enqueued_at).total_seconds() * 1000, abs=0.01)
        else:
            assert queue == [], lane
        assert run[0]["start_ms"] == pytest.approx(
            (st.started_at - origin).total_seconds() * 1000, abs=0.01)
        assert run[0]["ms"] == pytest.approx(
            (st.finished_at - st.started_at).total_seconds() * 1000, abs=0.01)
        for b in bars:
            if b["call_id"] and b["phase"] != "tool":
                assert calls[b["call_id"]].step_id == step_id
                shown.setdefault(b["call_id"], {})[b["phase"]] = b
    assert set(shown) == set(calls), "the timeline does not show every call of the ledger"
    for request_id, phases in shown.items():
        c = calls[request_id]
        assert c.started_at is not None
        end = (c.created_at - origin).total_seconds() * 1000
        if c.cached_from is not None:
            assert set(phases) == {"cached"}
            continue
        assert c.ttft_ms is not None
        assert phases["ttft"]["ms"] == pytest.approx(c.ttft_ms, abs=0.01)
        assert phases["generation"]["ms"] == pytest.approx(c.latency_ms - c.ttft_ms, abs=0.01)
        assert phases["generation"]["start_ms"] + phases["generation"]["ms"] == pytest.approx(
            end, abs=0.01)
        started = (c.started_at - origin).total_seconds() * 1000
        first = phases.get("wait", phases["ttft"])
        assert first["start_ms"] == pytest.approx(started, abs=0.01)
        assert c.model in phases["generation"]["title"]
    tools = [b for lane in lanes.values() for b in lane["bars"] if b["phase"] == "tool"]
    assert tools, "no tool time on the timeline of a job whose investigator searched"
    assert all(b["title"].startswith("tool: search") for b in tools), tools


def submit(client: TestClient, key: str, kind: str, payload: dict[str, Any]) -> str:
    resp = client.post("/v1/jobs", json={"kind": kind, "input": payload}, headers=auth(key))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_admin_page_in_a_browser_matches_the_ledger(client: TestClient, api_server: str,
                                                    standin: Any) -> None:
    suffix = secrets.token_hex(4)
    with transaction() as s:
        admin_key, _ = create_key(s, f"ops-{suffix}", admin=True)
        key_a, key_a_row = create_key(s, f"browser-a-{suffix}")
        key_b, key_b_row = create_key(s, f"browser-b-{suffix}")
        tenant_a, tenant_b = key_a_row.tenant_id, key_b_row.tenant_id

    # A research job over a corpus whose first investigator searches once, then answers.
    standin.state.plan_text = json.dumps([Q1, "Where do bees store their honey?"])
    standin.state.scripts = {MARKER: [SEARCH, ANSWER]}
    research = submit(client, key_a, "research", {
        "query": "How do bees make and keep honey?", "max_subquestions": 2,
        "corpus_id": make_corpus(client, key_a)})
    jobs = [
        (key_a, submit(client, key_a, "completion", {"prompt": "Say hello to the admin page."})),
        (key_a, research),
        (key_b, submit(client, key_b, "completion", {"prompt": "Count to three."})),
        (key_b, submit(client, key_b, "completion", {"prompt": "Name a colour."})),
    ]
    for key, job_id in jobs:
        job = wait_for_job(client, key, job_id, timeout=90)
        assert job["status"] == "completed", job

    # The ledger must not move while the browser reads the page: jobs of other tests may still
    # be settling, so read again until it stood still for the whole run.
    for _ in range(3):
        before = ledger_sums()
        report = run_browser(api_server, admin_key, research)
        totals = ledger_sums()
        if totals == before:
            break
    else:
        pytest.fail("the ledger kept changing while the browser read the admin page")

    admin = report["admin"]
    check_figures(admin["figures"], totals, "/admin",
                  required=(*LEDGER_FIGURES, "cost_usd"))
    assert admin["filtered_total_tokens"] == 0
    assert admin["charts"] == {"spend-per-day": True, "latency": True}
    assert report["external_requests"] == []
    assert report["console_errors"] == []
    assert report["failed_requests"] == []

    tenant_rows = {r["id"]: r["cols"] for r in admin["tenants"]}
    assert tenant_a in tenant_rows, f"tenant {tenant_a} is not in the tenant table"
    assert tenant_b in tenant_rows, f"tenant {tenant_b} is not in the tenant table"
    for tenant_id, cols in tenant_rows.items():
        check_figures(cols, ledger_sums(ModelCall.tenant_id == tenant_id),
                      f"/admin tenant row {tenant_id}")

    tenant = report["tenant"]
    assert tenant_rows[tenant["id"]]["total_tokens"] > 0
    check_figures(tenant["figures"], ledger_sums(ModelCall.tenant_id == tenant["id"]),
                  f"tenant page {tenant['url']}")
    assert tenant["jobs"], "the tenant page lists no jobs"
    for row in tenant["jobs"]:
        check_figures(row["cols"], ledger_sums(ModelCall.job_id == row["id"]),
                      f"tenant page job row {row['id']}")

    job = report["job"]
    assert job["id"] in {r["id"] for r in tenant["jobs"]}
    check_figures(job["figures"], ledger_sums(ModelCall.job_id == job["id"]),
                  f"job page {job['url']}")
    assert job["steps"], "the job page lists no steps"
    for row in job["steps"]:
        check_figures(row["cols"], ledger_sums(ModelCall.step_id == row["id"]),
                      f"job page step row {row['id']}")

    step = report["step"]
    assert step["id"] in {r["id"] for r in job["steps"]}
    check_figures(step["figures"], ledger_sums(ModelCall.step_id == step["id"]),
                  f"step page {step['url']}")
    calls = ledger_calls(ModelCall.step_id == step["id"])
    shown = {r["id"]: r["cols"] for r in step["calls"]}
    assert set(shown) == set(calls)
    for request_id, cols in shown.items():
        prompt, completion, cost = calls[request_id]
        check_figures(cols, {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion, "model_calls": 1,
                             "cost_usd": cost}, f"step page call row {request_id}")

    check_timeline(report["timeline"], research)

    for name in ("admin.png", "tenant.png", "job.png", "step.png", "timeline.png"):
        shot = ARTIFACTS / name
        assert shot.is_file(), f"no screenshot {name}"
        assert shot.stat().st_size > 0, f"empty screenshot {name}"
