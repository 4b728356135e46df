"""The `agentq` command driven as a user would, and the client's stream resume through a
connection that drops."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from api.client import AgentqClient
from bench.standin import free_port

pytestmark = pytest.mark.usefixtures("worker")


def agentq(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, text=True,
                          capture_output=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def cli_env(agentq_env: dict[str, str], api_server: str, tenant_key: str) -> dict[str, str]:
    return {**os.environ, **agentq_env, "AGENTQ_URL": api_server, "AGENTQ_API_KEY": tenant_key}


def test_cli_submit_watch_result_list_events_spend(cli_env: dict[str, str],
                                                   standin: Any) -> None:
    standin.state.delay_s = 0.2
    job = json.loads(agentq(cli_env, "submit", "research", "How do tides work?",
                            "--budget-tokens", "8000", "--json").stdout)
    assert job["status"] == "queued"
    assert job["budget"] == {"max_total_tokens": 8000}
    lines = agentq(cli_env, "watch", job["id"], "--json").stdout.splitlines()
    watched = [json.loads(line) for line in lines]
    assert [e["cursor"] for e in watched] == list(range(watched[0]["cursor"],
                                                        watched[-1]["cursor"] + 1))
    assert watched[-1]["type"] == "job.completed"
    status = json.loads(agentq(cli_env, "status", job["id"], "--json").stdout)
    assert status["status"] == "completed"
    result = json.loads(agentq(cli_env, "result", job["id"], "--json").stdout)
    assert result == status["result"]
    text = agentq(cli_env, "result", job["id"]).stdout
    assert result["sections"][0]["question"] in text
    listed = json.loads(agentq(cli_env, "list", "--json", "--status", "completed").stdout)
    assert job["id"] in [j["id"] for j in listed["data"]]
    events = [json.loads(line) for line in
              agentq(cli_env, "events", job["id"], "--json").stdout.splitlines()]
    assert [e["cursor"] for e in events] == list(range(1, len(events) + 1))
    # Watching a job that has ended prints its whole event log (however soon after its end
    # a watch begins, it sees the same events).
    again = [json.loads(line) for line in
             agentq(cli_env, "watch", job["id"], "--json").stdout.splitlines()]
    assert again == events
    spend = json.loads(agentq(cli_env, "spend", "--json").stdout)
    assert spend["total_tokens"] >= status["usage"]["total_tokens"] > 0
    assert spend["jobs"]["completed"] >= 1


def test_cli_submit_with_watch_and_cancel(cli_env: dict[str, str], standin: Any) -> None:
    done = agentq(cli_env, "submit", "completion", "Say hi", "--watch")
    assert "completed" in done.stderr
    assert "Stand-in answer" in done.stdout
    standin.state.delay_s = 3
    job = json.loads(agentq(cli_env, "submit", "research", "Why is the sky blue?",
                            "--json").stdout)
    cancelled = json.loads(agentq(cli_env, "cancel", job["id"], "--json").stdout)
    assert cancelled["status"] in {"cancelling", "cancelled"}


def test_cli_reports_errors_clearly(cli_env: dict[str, str]) -> None:
    missing = agentq(cli_env, "status", "job_doesnotexist", check=False)
    assert missing.returncode == 1
    assert "404 not_found" in missing.stderr
    bad_key = agentq({**cli_env, "AGENTQ_API_KEY": "aq_wrong"}, "list", check=False)
    assert bad_key.returncode == 1
    assert "401" in bad_key.stderr
    no_key = agentq({k: v for k, v in cli_env.items() if k != "AGENTQ_API_KEY"}, "list",
                    check=False)
    assert no_key.returncode == 2


class DroppingProxy:
    """Forwards TCP to the API; cuts each event-stream connection after some bytes."""

    def __init__(self, upstream_port: int, cut_after: int, cuts: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.cut_after, self.cuts_left = cut_after, cuts
        self.cuts_done = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        state = {"cut": False}
        lock = threading.Lock()

        def forward_requests() -> None:
            # Requests may arrive in several segments, and a kept-alive connection carries
            # more than one: forward everything, and arm the cut once a stream is asked for.
            try:
                while data := client.recv(65536):
                    if b"/events/stream" in data:
                        with lock:
                            if not state["cut"] and self.cuts_left > 0:
                                self.cuts_left -= 1
                                state["cut"] = True
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_requests, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(4096):
                with lock:
                    cut = state["cut"]
                if cut and sent + len(data) > self.cut_after:
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    self.cuts_done += 1
                    break
                client.sendall(data)
                if cut:
                    sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def proxy(api_server: str) -> Iterator[DroppingProxy]:
    p = DroppingProxy(int(api_server.rsplit(":", 1)[1]), cut_after=700, cuts=3)
    yield p
    p.close()


def test_client_stream_resumes_across_dropped_connections(
        proxy: DroppingProxy, api_server: str, tenant_key: str, standin: Any) -> None:
    standin.state.delay_s = 0.2
    with AgentqClient(f"http://127.0.0.1:{proxy.port}", tenant_key) as aq:
        job = aq.submit("research", {"query": "How do tides work?"})
        got = list(aq.events(job["id"]))
    assert proxy.cuts_done >= 1
    cursors = [e["cursor"] for e in got]
    assert cursors == list(range(1, len(cursors) + 1)), [(e["cursor"], e["type"]) for e in got]
    assert got[-1]["type"] == "job.completed", got[-1]
