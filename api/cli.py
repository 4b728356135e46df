"""The `agentq` command: a client of the API (reads AGENTQ_URL and AGENTQ_API_KEY), plus key
management that talks to the database directly (`agentq keys ...`, for operators)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.client import TERMINAL_STATUSES, AgentqClient, ApiError

app = typer.Typer(help="agentq: run long agentic AI jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys (talks to the database; for operators).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="AGENTQ_URL", help="The API's base URL.")]
KeyOpt = Annotated[str, typer.Option("--api-key", envvar="AGENTQ_API_KEY",
                                     help="Your API key.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")


def _client(url: str, key: str) -> AgentqClient:
    if not key:
        console.print("[red]set AGENTQ_API_KEY or pass --api-key[/red]")
        raise typer.Exit(2)
    return AgentqClient(url, key)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(exc: ApiError) -> typer.Exit:
    console.print(f"[red]error[/red] {exc.status_code} {exc.code}: {exc.message}")
    return typer.Exit(1)


def _request(url: str, key: str, call: Callable[[AgentqClient], T]) -> T:
    """Run one client call; API errors become a message and exit status 1."""
    with _client(url, key) as aq:
        try:
            return call(aq)
        except ApiError as exc:
            raise _fail(exc) from exc


def _show_job(job: dict[str, Any]) -> None:
    p, u = job["progress"], job["usage"]
    console.print(f"[bold]{job['id']}[/bold] {job['kind']} "
                  f"({job.get('service_tier', 'standard')}) [cyan]{job['status']}[/cyan] "
                  f"phase {p['phase']}, {p['steps_done']}/{p['steps_total']} steps, "
                  f"{u['total_tokens']} tokens in {u['model_calls']} calls")
    if job.get("error"):
        console.print(f"[red]{job['error']['code']}[/red]: {job['error']['message']}")


def _watch(aq: AgentqClient, job_id: str, as_json: bool) -> dict[str, Any]:
    job = aq.job(job_id)
    # A job that has ended has nothing to draw; its events (with --json) are still printed,
    # replayed from the log, however soon after it ended the watch began.
    if job["status"] in TERMINAL_STATUSES and not as_json:
        return job
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=as_json) as progress:
        bar = progress.add_task(job["progress"]["phase"], total=job["progress"]["steps_total"],
                                completed=job["progress"]["steps_done"],
                                tokens=job["usage"]["total_tokens"])
        for event in aq.events(job_id):
            if as_json:
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
            if event["type"] in {"step.completed", "plan.ready", "job.usage", "step.started"} \
                    or event["type"].startswith("job."):
                job = aq.job(job_id)
                p = job["progress"]
                progress.update(bar, description=p["phase"], total=max(p["steps_total"], 1),
                                completed=p["steps_done"], tokens=job["usage"]["total_tokens"])
    return aq.job(job_id)


@app.command()
def submit(
    kind: Annotated[str, typer.Argument(help="research or completion")],
    text: Annotated[str, typer.Argument(help="The research question, or the prompt")],
    budget_tokens: Annotated[int | None, typer.Option("--budget-tokens",
                                                      help="max_total_tokens")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job to its end.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    tier: Annotated[str | None, typer.Option(
        "--tier", help="Service tier: interactive, standard (the default) or flex")] = None,
    deadline: Annotated[str | None, typer.Option(
        "--deadline", help="Flex jobs: when to be done, ISO 8601 with a zone")] = None,
    optimize: Annotated[str | None, typer.Option(
        "--optimize", help="Flex jobs with a deadline: wait for the cheapest (cost) or "
                           "cleanest (carbon) hour")] = None,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False,
) -> None:
    """Submit a job."""
    field = {"research": "query", "completion": "prompt"}.get(kind, "query")
    with _client(url, api_key) as aq:
        try:
            job = aq.submit(kind, {field: text}, max_total_tokens=budget_tokens,
                            idempotency_key=idempotency_key, service_tier=tier,
                            deadline=deadline, optimize=optimize)
            if watch:
                job = _watch(aq, job["id"], as_json)
        except ApiError as exc:
            raise _fail(exc) from exc
    if as_json:
        _print_json(job)
    else:
        _show_job(job)
        if watch and job.get("result"):
            _print_result(job)


@app.command()
def status(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "",
           as_json: JsonOpt = False) -> None:
    """Show a job's status, progress and usage."""
    job = _request(url, api_key, lambda aq: aq.job(job_id))
    _print_json(job) if as_json else _show_job(job)


@app.command()
def watch(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "",
          as_json: JsonOpt = False) -> None:
    """Follow a job live (a progress bar fed by its event stream; resumes after a dropped
    connection) until it ends."""
    job = _request(url, api_key, lambda aq: _watch(aq, job_id, as_json))
    if not as_json:
        _show_job(job)


def _print_result(job: dict[str, Any]) -> None:
    result = job.get("result") or {}
    if "answer" in result:
        sys.stdout.write(f"{result.get('answer') or ''}\n")
        for i, s in enumerate(result.get("sections", []), 1):
            sys.stdout.write(f"\n{i}. {s['question']}\n   {s['answer']}\n")
    elif "text" in result:
        sys.stdout.write(result["text"] + "\n")
    else:
        _print_json(result)


@app.command()
def result(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "",
           as_json: JsonOpt = False) -> None:
    """Print a finished job's result."""
    job = _request(url, api_key, lambda aq: aq.job(job_id))
    if job["status"] not in TERMINAL_STATUSES:
        console.print(f"job {job_id} is {job['status']}; no result yet")
        raise typer.Exit(3)
    _print_json(job["result"]) if as_json else _print_result(job)


@app.command()
def cancel(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "",
           as_json: JsonOpt = False) -> None:
    """Cancel a job."""
    job = _request(url, api_key, lambda aq: aq.cancel(job_id))
    _print_json(job) if as_json else _show_job(job)


@app.command("continue")
def continue_(
    job_id: str,
    budget_tokens: Annotated[int | None, typer.Option(
        "--budget-tokens", help="The new max_total_tokens: a total over the whole job, what "
                                "it has spent included (not an addition).")] = None,
    budget_usd: Annotated[float | None, typer.Option(
        "--budget-usd", help="The new max_cost_usd, likewise a total.")] = None,
    max_seconds: Annotated[int | None, typer.Option(
        "--max-seconds", help="A new time limit, counted from now.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job to its end.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False,
) -> None:
    """Continue a stopped job (out of budget, past its deadline, or cancelled); limits not
    given are kept."""
    with _client(url, api_key) as aq:
        try:
            job = aq.continue_job(job_id, max_total_tokens=budget_tokens,
                                  max_cost_usd=budget_usd, max_seconds=max_seconds,
                                  idempotency_key=idempotency_key)
            if watch:
                job = _watch(aq, job["id"], as_json)
        except ApiError as exc:
            raise _fail(exc) from exc
    if as_json:
        _print_json(job)
    else:
        _show_job(job)
        if watch and job.get("result"):
            _print_result(job)


@app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    status_filter: Annotated[str | None, typer.Option("--status")] = None,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False,
) -> None:
    """List your jobs, newest first."""
    page = _request(url, api_key, lambda aq: aq.jobs(limit=limit, status=status_filter))
    if as_json:
        _print_json(page)
        return
    table = Table()
    for col in ("id", "kind", "status", "steps", "tokens", "created"):
        table.add_column(col)
    for j in page["data"]:
        table.add_row(j["id"], j["kind"], j["status"],
                      f"{j['progress']['steps_done']}/{j['progress']['steps_total']}",
                      str(j["usage"]["total_tokens"]), j["created_at"])
    Console().print(table)


@app.command()
def events(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
           url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """Print a job's events (with --follow, stream them until the job ends)."""
    with _client(url, api_key) as aq:
        try:
            if follow:
                stream = aq.events(job_id)
            else:
                stream = iter(_all_events(aq, job_id))
            for e in stream:
                if as_json:
                    sys.stdout.write(json.dumps(e) + "\n")
                else:
                    sys.stdout.write(f"{e['cursor']:>5} {e['created_at']} {e['type']} "
                                     f"{json.dumps(e['data'])}\n")
        except ApiError as exc:
            raise _fail(exc) from exc


def _all_events(aq: AgentqClient, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = aq.event_page(job_id, after=after, limit=500)
        out += page["data"]
        after = page["next_cursor"]
        if not page["has_more"]:
            return out


@app.command()
def spend(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False) -> None:
    """Your tokens and model calls, by model."""
    report = _request(url, api_key, lambda aq: aq.usage())
    if as_json:
        _print_json(report)
        return
    table = Table(title="Spend")
    for col in ("model", "calls", "prompt", "completion", "total"):
        table.add_column(col)
    for m in report["by_model"]:
        table.add_row(m["model"], str(m["model_calls"]), str(m["prompt_tokens"]),
                      str(m["completion_tokens"]), str(m["total_tokens"]))
    table.add_row("all", str(report["model_calls"]), str(report["prompt_tokens"]),
                  str(report["completion_tokens"]), str(report["total_tokens"]))
    Console().print(table)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist.")],
    admin: Annotated[bool, typer.Option("--admin", help="Grant the admin scope.")] = False,
) -> None:
    """Create an API key and print it. It is shown only this once."""
    from core.db import transaction
    from core.keys import create_key

    with transaction() as session:
        raw, key = create_key(session, tenant, admin=admin)
        key_id = key.id
    typer.echo(raw)
    typer.echo(f"key id {key_id} for tenant {tenant!r}; store the key now, it is not shown "
               "again", err=True)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_...)")]) -> None:
    """Revoke an API key."""
    from core.db import transaction
    from core.keys import revoke_key

    with transaction() as session:
        ok = revoke_key(session, key_id)
    if not ok:
        typer.echo(f"no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
