"""Event streams are bounded: an API key holds at most AGENTQ_SSE_MAX_STREAMS_PER_KEY open at
once (then 429), and the server closes a stream after AGENTQ_SSE_MAX_STREAM_S even on a job that
never ends; the client resumes with Last-Event-ID (real uvicorn, real Redis)."""

from __future__ import annotations

import secrets
import threading
from contextlib import ExitStack
from typing import cast

import httpx
import pytest

from tests.helpers import auth, wait_until

JOB = {"kind": "research", "input": {"query": "How do tides work?"}}


@pytest.fixture
def keys(agentq_env: dict[str, str]) -> tuple[str, str]:
    """Two keys of one tenant."""
    from core.db import transaction
    from core.keys import create_key

    name = f"streams-{secrets.token_hex(3)}"
    with transaction() as s:
        first, _ = create_key(s, name)
        second, _ = create_key(s, name)
    return first, second


@pytest.fixture
def job(api_server: str, keys: tuple[str, str], quiet_workers: None) -> str:
    """A job that stays queued: nothing runs it while the test does."""
    resp = httpx.post(f"{api_server}/v1/jobs", json=JOB, headers=auth(keys[0]), timeout=30)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def open_stream(stack: ExitStack, http: httpx.Client, key: str, job_id: str,
                **headers: str) -> httpx.Response:
    return stack.enter_context(http.stream("GET", f"/v1/jobs/{job_id}/events/stream",
                                           headers={**auth(key), **headers}))


def open_streams(raw_key: str) -> int:
    """The streams Redis counts for a key."""
    from api.events.streams import PREFIX
    from core.db import transaction
    from core.keys import authenticate
    from core.redis import get_redis

    with transaction() as s:
        principal = authenticate(s, raw_key)
        assert principal is not None
    return int(cast(int, get_redis().zcard(PREFIX + principal.key_id)))


def test_a_key_holds_a_bounded_number_of_streams(api_server: str, keys: tuple[str, str],
                                                 job: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "sse_max_streams_per_key", 3)
    with httpx.Client(base_url=api_server, timeout=30) as http, ExitStack() as stack:
        opened = [open_stream(stack, http, keys[0], job) for _ in range(3)]
        assert all(r.status_code == 200 for r in opened)
        refused = http.get(f"/v1/jobs/{job}/events/stream", headers=auth(keys[0]))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert "3 event streams open" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) > 0
        # Another key of the same tenant has places of its own.
        other = open_stream(stack, http, keys[1], job)
        assert other.status_code == 200
        # Closing a stream gives its place back.
        opened[0].close()
        wait_until(lambda: open_streams(keys[0]) == 2, 30, what="the closed stream's place")
        again = open_stream(stack, http, keys[0], job)
        assert again.status_code == 200


def test_a_stream_on_a_job_that_never_ends_is_closed_and_resumes(
        api_server: str, keys: tuple[str, str], job: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "sse_max_stream_s", 1.0)
    seen: list[str] = []
    ended = threading.Event()

    def read() -> None:
        with httpx.Client(base_url=api_server, timeout=30) as http, \
                http.stream("GET", f"/v1/jobs/{job}/events/stream",
                            headers=auth(keys[0])) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("id:"):
                    seen.append(line.split(":", 1)[1].strip())
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ended.wait(30), "the server never closed the stream"
    assert seen == ["1"]  # job.created, then nothing: the job is still queued
    assert open_streams(keys[0]) == 0
    # Resuming after the last event seen gets what followed it.
    cancel = httpx.post(f"{api_server}/v1/jobs/{job}/cancel", headers=auth(keys[0]), timeout=30)
    assert cancel.status_code == 202
    with httpx.Client(base_url=api_server, timeout=30) as http, \
            http.stream("GET", f"/v1/jobs/{job}/events/stream",
                        headers={**auth(keys[0]), "Last-Event-ID": seen[-1]}) as resp:
        types = [line.split(":", 1)[1].strip() for line in resp.iter_lines()
                 if line.startswith("event:")]
    assert types == ["job.cancelled"]


