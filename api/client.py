"""A small typed Python client for the agentq API; the `agentq` command is built on it.

    from api.client import AgentqClient

    with AgentqClient("http://127.0.0.1:8000", api_key) as aq:
        job = aq.submit("research", {"query": "How do tides work?"}, max_total_tokens=20000)
        for event in aq.events(job["id"]):   # resumes by itself after a dropped connection
            print(event["cursor"], event["type"])
        print(aq.job(job["id"])["result"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse

TERMINAL_EVENTS = frozenset({"job.completed", "job.failed", "job.cancelled",
                             "job.budget_exhausted"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "budget_exhausted"})
CONTINUED_EVENT = "job.continued"


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code, self.code, self.message = status_code, code, message


class AgentqClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"},
                                  transport=transport)

    def __enter__(self) -> AgentqClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise ApiError(resp.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(resp.status_code, "http_error", resp.text[:500]) from None
        return resp.json() if resp.content else None

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, kind: str, input: dict[str, Any], *, max_total_tokens: int | None = None,
               metadata: dict[str, Any] | None = None, webhook: dict[str, Any] | None = None,
               idempotency_key: str | None = None, service_tier: str | None = None,
               deadline: str | None = None, optimize: str | None = None
               ) -> dict[str, Any]:
        """Submit a job; `service_tier` is `interactive`, `standard` (the default) or `flex`;
        a flex job may carry a `deadline` (ISO 8601 with a zone) and `optimize` (`cost` or
        `carbon`: wait for the best hour of the grid's schedule that meets it)."""
        body: dict[str, Any] = {"kind": kind, "input": input, "metadata": metadata or {}}
        if service_tier is not None:
            body["service_tier"] = service_tier
        if deadline is not None:
            body["deadline"] = deadline
        if optimize is not None:
            body["optimize"] = optimize
        if max_total_tokens is not None:
            body["budget"] = {"max_total_tokens": max_total_tokens}
        if webhook is not None:
            body["webhook"] = webhook
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._call("POST", "/v1/jobs", json=body, headers=headers)
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return result

    def jobs(self, *, limit: int = 20, status: str | None = None, cursor: str | None = None
             ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        result: dict[str, Any] = self._call("GET", "/v1/jobs", params=params)
        return result

    def steps(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/v1/jobs/{job_id}/steps")["data"]
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def continue_job(self, job_id: str, *, max_total_tokens: int | None = None,
                     max_cost_usd: float | None = None, max_seconds: int | None = None,
                     step_max_tokens: dict[str, int] | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Continue a stopped job. The limits given are the job's new totals (what it has
        spent counts against them), not amounts added; those left out are kept."""
        given = {"max_total_tokens": max_total_tokens, "max_cost_usd": max_cost_usd,
                 "max_seconds": max_seconds, "step_max_tokens": step_max_tokens}
        body = {"budget": {k: v for k, v in given.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/continue", json=body,
                                            headers=headers)
        return result

    def usage(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/usage")
        return result

    def event_page(self, job_id: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}/events",
                                            params={"after": after, "limit": limit})
        return result

    def events(self, job_id: str, after: int = 0, *, max_reconnects: int = 50
               ) -> Iterator[dict[str, Any]]:
        """Stream the job's events until its terminal event (one that a continuation,
        `job.continued`, follows is streamed past). A dropped connection is resumed with
        `Last-Event-ID`, so no event is lost or repeated."""
        reconnects = 0
        ended = False
        while True:
            try:
                headers = {"Last-Event-ID": str(after)} if after else {}
                seen = 0
                with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events/stream",
                                 headers=headers, timeout=httpx.Timeout(60, read=90)) as src:
                    if src.response.status_code >= 400:
                        src.response.read()
                        self._raise_for(src.response)
                    for sse in src.iter_sse():
                        if not sse.data:  # heartbeat
                            continue
                        event: dict[str, Any] = json.loads(sse.data)
                        after = int(event["cursor"])
                        reconnects, seen = 0, seen + 1
                        yield event
                        if event["type"] in TERMINAL_EVENTS:
                            ended = True
                        elif event["type"] == CONTINUED_EVENT:
                            ended = False
                # The server closes the stream after the job's terminal event; closed at any
                # other point (or with nothing to send), it is resumed.
                if ended or (not seen and self.job(job_id)["status"] in TERMINAL_STATUSES):
                    return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass
            reconnects += 1
            if reconnects > max_reconnects:
                raise ApiError(0, "stream_lost", "the event stream kept dropping")
            time.sleep(min(0.2 * 2 ** min(reconnects, 5), 5.0))

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        try:
            err = resp.json()["error"]
            raise ApiError(resp.status_code, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(resp.status_code, "http_error", resp.text[:500]) from None
