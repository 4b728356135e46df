"""The platform as a user sees it: its HTTP API under an API key. Uploads the corpus, submits
jobs and waits for them; reads results, usage and timing from the job's resource only, and
keeps whatever fields it adds."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from bench.common import TERMINAL

POLL_S = 0.5
RETRY_S = 2.0


@dataclass(frozen=True)
class UploadedCorpus:
    id: str
    ids: dict[str, str]  # file name -> document id
    titles: dict[str, str]  # file name -> document title


@dataclass
class JobRun:
    """A finished job as the API reports it; `rejected` holds the error of a refused
    submission (no job was made)."""

    id: str | None
    status: str
    result: dict[str, Any] | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    wall_s: float = 0.0
    rejected: str | None = None

    def tokens(self) -> int:
        return int(self.usage.get("total_tokens") or 0)

    def calls(self) -> int:
        return int(self.usage.get("model_calls") or 0)

    def cost(self) -> float:
        return float(self.usage.get("cost_usd") or 0.0)


def _seconds(job: Mapping[str, Any]) -> float:
    """From submission to the end, as the job's own timestamps say."""
    start, end = job.get("created_at"), job.get("finished_at") or job.get("updated_at")
    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()


class Platform:
    """`request_timeout_s` bounds each HTTP request; a request that fails in transport (a
    timeout on a machine under load) or is answered with a 5xx is tried again until
    `retry_for_s` has passed.
    Submissions carry an `Idempotency-Key`, so a retried one makes no second job."""

    def __init__(self, base_url: str, key: str, job_timeout_s: float = 1800,
                 request_timeout_s: float = 60, retry_for_s: float = 600) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=request_timeout_s,
                                 headers={"Authorization": f"Bearer {key}"})
        self.job_timeout_s = job_timeout_s
        self.retry_for_s = retry_for_s

    def _retrying(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        deadline = time.monotonic() + self.retry_for_s
        while True:
            try:
                resp = send()
                if resp.status_code < 500 or time.monotonic() > deadline:
                    return resp
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(RETRY_S)

    def close(self) -> None:
        self.http.close()

    def upload_corpus(self, name: str, documents: Mapping[str, str]) -> UploadedCorpus:
        resp = self.http.post("/v1/corpora", json={"name": name})
        resp.raise_for_status()
        corpus_id = str(resp.json()["id"])
        ids, titles = {}, {}
        for filename, text in documents.items():
            resp = self.http.post(f"/v1/corpora/{corpus_id}/documents", files={
                "file": (filename, text.encode(), "text/markdown")})
            resp.raise_for_status()
            ids[filename], titles[filename] = str(resp.json()["id"]), str(resp.json()["title"])
        return UploadedCorpus(id=corpus_id, ids=ids, titles=titles)

    def submit(self, kind: str, job_input: Mapping[str, Any],
               metadata: Mapping[str, Any] | None = None) -> str | JobRun:
        """The job's id; or, when the API refuses the job with a 422, a `JobRun` that says
        why (another status is an error of the bench)."""
        body = {"kind": kind, "input": dict(job_input), "metadata": dict(metadata or {})}
        headers = {"Idempotency-Key": f"quality-{secrets.token_hex(12)}"}
        resp = self._retrying(lambda: self.http.post("/v1/jobs", json=body, headers=headers))
        if resp.status_code == 422:
            message = resp.json().get("error", {}).get("message", resp.text)
            return JobRun(id=None, status="rejected", rejected=str(message))
        resp.raise_for_status()
        return str(resp.json()["id"])

    def wait(self, job_id: str) -> JobRun:
        """The job once it has ended; past `job_timeout_s` it is cancelled and reported as
        `timed_out` with what it had spent and written by then."""
        deadline = time.monotonic() + self.job_timeout_s
        while True:
            resp = self._retrying(lambda: self.http.get(f"/v1/jobs/{job_id}"))
            resp.raise_for_status()
            job = resp.json()
            timed_out = job["status"] not in TERMINAL and time.monotonic() > deadline
            if job["status"] in TERMINAL or timed_out:
                if timed_out:
                    self._retrying(lambda: self.http.post(f"/v1/jobs/{job_id}/cancel"))
                return JobRun(id=job_id, status=str(job["status"]) if not timed_out
                              else "timed_out", result=job.get("result"),
                              usage=dict(job.get("usage") or {}), error=job.get("error"),
                              wall_s=_seconds(job) if not timed_out else self.job_timeout_s)
            time.sleep(POLL_S)

    def run(self, kind: str, job_input: Mapping[str, Any],
            metadata: Mapping[str, Any] | None = None) -> JobRun:
        submitted = self.submit(kind, job_input, metadata)
        return submitted if isinstance(submitted, JobRun) else self.wait(submitted)

    def run_many(self, kind: str, inputs: list[dict[str, Any]], parallel: int,
                 metadata: Mapping[str, Any] | None = None) -> list[JobRun]:
        """Jobs with `parallel` in flight at most, in the order of `inputs`."""
        runs: list[JobRun | None] = [None] * len(inputs)
        pending: dict[str, int] = {}
        nxt = 0
        while nxt < len(inputs) or pending:
            while nxt < len(inputs) and len(pending) < max(1, parallel):
                submitted = self.submit(kind, inputs[nxt], metadata)
                if isinstance(submitted, JobRun):
                    runs[nxt] = submitted
                else:
                    pending[submitted] = nxt
                nxt += 1
            if pending:
                job_id = next(iter(pending))
                runs[pending.pop(job_id)] = self.wait(job_id)
        return [r for r in runs if r is not None]
