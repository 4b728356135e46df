"""`make demo`: run agentq on the embedded set-up and watch one research job end to end.

Starts Redis (when none answers), migrates the SQLite database, prepares the embedded model,
starts one vLLM server, one Celery worker and the API, creates a tenant and an API key, uploads a
small corpus, submits a research job over it, shows its progress, prints the result and the
tokens it used, and stops everything it started. Logs go to var/demo/.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import redis
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "var" / "demo"
console = Console()
QUERY = os.environ.get("AGENTQ_DEMO_QUERY", "How do honey bees make honey?")


class Services:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = (LOGS / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=env or os.environ.copy(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                console.print(f"[dim]stopping {name}[/dim]")
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.procs.clear()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait(what: str, check: Any, proc: subprocess.Popen[bytes] | None, log: str,
         timeout: float) -> None:
    with console.status(f"waiting for {what} …") as status:
        start = time.monotonic()
        while not check():
            if proc is not None and proc.poll() is not None:
                tail = (LOGS / log).read_text(errors="replace")[-3000:]
                raise SystemExit(f"{what} exited early; last lines of var/demo/{log}:\n{tail}")
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                raise SystemExit(f"{what} did not come up within {timeout:.0f}s; see "
                                 f"var/demo/{log}")
            status.update(f"waiting for {what} … {elapsed:.0f}s")
            time.sleep(0.5)
    console.print(f"[green]✓[/green] {what} is up ({time.monotonic() - start:.0f}s)")


def ensure_redis(services: Services, url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        console.print(f"[green]✓[/green] Redis answers at {url}")
        return
    except redis.RedisError:
        pass
    parsed = urlparse(url)
    if parsed.hostname not in {"127.0.0.1", "localhost"}:
        raise SystemExit(f"Redis at {url} does not answer, and it is not local to start")
    binary = shutil.which("redis-server")
    if binary is None:
        console.print("redis-server is not installed; installing it with apt-get")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "redis-server"], check=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = str(parsed.port or 6379)
    proc = services.start("redis", [binary, "--port", port, "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no"])

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    wait("Redis", up, proc, "redis.log", 30)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


CORPUS_DIR = Path(__file__).resolve().parent / "demo_corpus"


def make_corpus(http: httpx.Client) -> str:
    """A corpus of the documents in `scripts/demo_corpus/`: the job answers from its passages,
    with citations the verifier checks."""
    resp = http.post("/v1/corpora", json={"name": "make demo"})
    resp.raise_for_status()
    corpus_id = str(resp.json()["id"])
    for path in sorted(CORPUS_DIR.iterdir()):
        up = http.post(f"/v1/corpora/{corpus_id}/documents",
                       files={"file": (path.name, path.read_bytes(), "text/plain")})
        up.raise_for_status()
    console.print(f"[green]✓[/green] corpus {corpus_id}: "
                  f"{', '.join(p.name for p in sorted(CORPUS_DIR.iterdir()))}")
    return corpus_id


def run_job(api: str, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api, headers=headers, timeout=30) as http:
        corpus_id = make_corpus(http)
        resp = http.post("/v1/jobs", json={"kind": "research", "input": {
            "query": QUERY, "corpus_id": corpus_id, "effort": "medium", "max_subquestions": 2},
            "budget": {"max_total_tokens": 40000}, "metadata": {"source": "make demo"}})
        resp.raise_for_status()
        job: dict[str, Any] = resp.json()
        console.print(f"submitted [bold]{job['id']}[/bold] ({job['status']}): {QUERY}")
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total} steps"),
                   TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn()]
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("queued", total=1, tokens=0)
            while job["status"] not in {"completed", "failed", "cancelled", "budget_exhausted"}:
                time.sleep(0.5)
                job = http.get(f"/v1/jobs/{job['id']}").json()
                p = job["progress"]
                progress.update(bar, description=p["phase"], completed=p["steps_done"],
                                total=max(p["steps_total"], 1),
                                tokens=job["usage"]["total_tokens"])
        job["steps"] = http.get(f"/v1/jobs/{job['id']}/steps").json()["data"]
        return job


def show(job: dict[str, Any]) -> None:
    result = job.get("result") or {}
    if job["status"] != "completed":
        console.print(f"[red]job ended {job['status']}[/red]: {job.get('error')}")
    body = f"[bold]{result.get('answer') or '(no answer)'}[/bold]\n"
    for i, section in enumerate(result.get("sections", []), 1):
        body += f"\n{i}. [cyan]{section['question']}[/cyan]\n   {section['answer']}"
    for c in result.get("citations") or []:
        body += f"\n[dim][{c['n']}] {c.get('document') or ''}: {c.get('snippet') or ''}[/dim]"
    check = result.get("verification")
    subtitle = result.get("note") or (
        f"citations verified: {check['verified']}" if check else "")
    console.print(Panel(body, title=f"Result of {job['id']}", subtitle=subtitle))
    table = Table(title="Steps")
    for col in ("step", "role", "status", "model", "prompt", "completion", "ms"):
        table.add_column(col)
    for s in job["steps"]:
        table.add_row(s["key"], s["role"], s["status"], s["model"] or "",
                      str(s["usage"]["prompt_tokens"]), str(s["usage"]["completion_tokens"]),
                      f"{s['duration_ms']:.0f}" if s["duration_ms"] is not None else "")
    console.print(table)
    u = job["usage"]
    console.print(f"tokens used: [bold]{u['total_tokens']}[/bold] ({u['prompt_tokens']} prompt "
                  f"+ {u['completion_tokens']} completion) in {u['model_calls']} model calls, "
                  f"${u.get('cost_usd') or 0:.6f} at the configured prices")


def main() -> int:
    from core.settings import get_settings

    LOGS.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    py = sys.executable
    services = Services()
    try:
        ensure_redis(services, settings.redis_url)
        console.print(f"database: {settings.database_url}")
        subprocess.run([py, "-m", "alembic", "upgrade", "head"], cwd=ROOT, check=True)
        console.print("[green]✓[/green] database migrated")

        endpoint = settings.pool_endpoints[0]
        if http_ok(f"{endpoint}/v1/models"):
            console.print(f"[green]✓[/green] a model server already answers at {endpoint}")
        else:
            with console.status("preparing the embedded model (once; about a minute)"):
                subprocess.run([py, "-m", "inference.serve", "--prepare-only"], cwd=ROOT,
                               check=True, stdout=subprocess.DEVNULL)
            console.print("[green]✓[/green] embedded model ready")
            port = urlparse(endpoint).port or 8100
            vllm = services.start("vllm", [py, "-m", "inference.serve", "--port", str(port)])
            wait("the vLLM server (its first start compiles the model)",
                 lambda: http_ok(f"{endpoint}/v1/models"), vllm, "vllm.log", 900)

        worker = services.start("worker", [py, "-m", "celery", "-A", "workers.app", "worker",
                                           "--loglevel", "INFO"])
        wait("the Celery worker", lambda: "ready." in (LOGS / "worker.log").read_text(
            errors="replace"), worker, "worker.log", 60)

        api_port = next(p for p in range(8000, 8100) if port_free(p))
        api_url = f"http://127.0.0.1:{api_port}"
        api = services.start("api", [py, "-m", "uvicorn", "api.app:app", "--port",
                                     str(api_port)])
        wait(f"the API at {api_url}", lambda: http_ok(f"{api_url}/healthz"), api, "api.log", 60)

        key = subprocess.run([py, "-m", "api.cli", "keys", "create", "--tenant", "demo"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
        console.print(f"[green]✓[/green] tenant 'demo' and API key {key[:10]}… created")

        job = run_job(api_url, key)
        show(job)
        return 0 if job["status"] == "completed" else 1
    finally:
        services.stop_all()


if __name__ == "__main__":
    sys.exit(main())
