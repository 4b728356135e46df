"""The OpenAI Batch and Files API, driven by the official `openai` SDK against the API under
uvicorn, a real Celery worker process and the stand-in model server: upload, create, poll to
`completed`, download the output and match it by `custom_id`; per-line failures in the error
file; a batch cancelled half-way keeps its finished lines; bad files and requests get the
errors OpenAI's API gives; every line's call is in the ledger; the request counts grow as
chunks finish; the operator's job view shows a batch's figures."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from tests.helpers import Proc, auth, wait_until
from tests.test_webhooks import Receiver, receiver, verify

__all__ = ["receiver"]  # the fixture, shared with the webhook tests

MODEL = "standin-model"


@contextmanager
def settings(**values: str) -> Iterator[None]:
    """`AGENTQ_*` settings for this process's API while the block runs."""
    from core.settings import get_settings

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


@pytest.fixture
def sdk(api_server: str, tenant_key: str, worker: Proc, standin: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=tenant_key, max_retries=0)


def chat_line(custom_id: str, text: str, url: str = "/v1/chat/completions",
              **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {
        "model": MODEL, "messages": [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": text}],
        "max_tokens": 20, "temperature": 0, **body}})


def completion_line(custom_id: str, prompt: str) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": MODEL, "prompt": prompt, "max_tokens": 12}})


def upload(sdk: openai.OpenAI, lines: list[str], name: str = "requests.jsonl") -> str:
    data = ("\n".join(lines) + "\n").encode()
    return sdk.files.create(file=(name, data), purpose="batch").id


def wait_batch(sdk: openai.OpenAI, batch_id: str, statuses: set[str],
               timeout: float = 90) -> Any:
    def done() -> Any:
        batch = sdk.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None

    return wait_until(done, timeout, interval=0.2, what=f"batch {batch_id} in {statuses}")


def jsonl(sdk: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    records = [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()]
    by_id = {r["custom_id"]: r for r in records}
    assert len(by_id) == len(records), "a custom_id appears twice"
    return by_id


def first_error(batch: Any) -> Any:
    assert batch.errors is not None
    assert batch.errors.data
    return batch.errors.data[0]


def admin_key() -> str:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, f"ops-{secrets.token_hex(3)}", admin=True)
    return raw


def ledger_rows(job_id: str) -> int:
    """The job's finished calls in the ledger, made by runs that held their steps (a run
    that lost its step under load has its calls recorded late, and they are made again)."""
    from core.db import transaction
    from core.models import ModelCall

    with transaction(read_only=True) as s:
        return int(s.scalar(select(func.count()).select_from(ModelCall).where(
            ModelCall.job_id == job_id, ModelCall.finish_reason != "cancelled",
            ModelCall.settled_late.is_(None))) or 0)


def test_chat_batch_round_trip(sdk: openai.OpenAI, api_server: str, tenant_key: str,
                               standin: Any) -> None:
    n = 40
    with standin.state.lock:
        standin.state.replies = {f"question-{i:02d}?": f"answer number {i}" for i in range(n)}
    lines = [chat_line(f"req-{i}", f"What is question-{i:02d}?") for i in range(n)]
    file_id = upload(sdk, lines)
    stored = sdk.files.retrieve(file_id)
    assert (stored.purpose, stored.filename) == ("batch", "requests.jsonl")
    assert sdk.files.content(file_id).content == ("\n".join(lines) + "\n").encode()

    # 8 steps of 5 lines each: lines are run in chunks, chunks in parallel.
    with settings(AGENTQ_BATCH_TARGET_STEPS="8"):
        batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"run": "nightly"})
    assert batch.status in ("validating", "in_progress")
    assert batch.request_counts is not None
    assert batch.request_counts.total == n
    done = wait_batch(sdk, batch.id, {"completed", "failed", "cancelled", "expired"})
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (n, 0)
    assert done.metadata == {"run": "nightly"}
    assert done.error_file_id is None
    assert done.completed_at
    assert done.in_progress_at
    assert done.expires_at

    out = jsonl(sdk, done.output_file_id)
    assert set(out) == {f"req-{i}" for i in range(n)}
    for i in range(n):
        record = out[f"req-{i}"]
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == MODEL
        assert body["choices"][0]["message"] == {"role": "assistant", "refusal": None,
                                                 "content": f"answer number {i}"}
        assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                                 + body["usage"]["completion_tokens"])
    # The base model got each chat line as a plain transcript of its turns.
    prompts = [b["prompt"] for b in standin.state.bodies if b["_path"] == "/v1/completions"]
    assert "System: Answer briefly.\n\nUser: What is question-07?\n\nAssistant:" in prompts

    # The batch is a job: in the job list, with its steps, events and ledger.
    headers = auth(tenant_key)
    jobs = httpx.get(f"{api_server}/v1/jobs", headers=headers).json()["data"]
    job = next(j for j in jobs if j["id"] == batch.id)
    assert (job["kind"], job["status"]) == ("openai_batch", "completed")
    assert job["service_tier"] == "flex"  # latency-tolerant work, priced at flex's discount
    steps = httpx.get(f"{api_server}/v1/jobs/{batch.id}/steps", headers=headers).json()["data"]
    assert len(steps) == 8
    types = [e["type"] for e in httpx.get(f"{api_server}/v1/jobs/{batch.id}/events?limit=500",
                                          headers=headers).json()["data"]]
    assert "batch.completed" in types
    assert types.index("job.completed") < types.index(
        "batch.completed")
    assert ledger_rows(batch.id) == n
    assert job["usage"]["model_calls"] >= n  # more only if a run lost its step under load
    assert done.usage is not None
    assert done.usage.total_tokens == job["usage"]["total_tokens"]
    # The operator sees it as any job: its kind, status and the ledger's figures.
    admin = auth(admin_key())
    view = httpx.get(f"{api_server}/v1/admin/jobs/{batch.id}", headers=admin)
    assert view.status_code == 200, view.text
    figures = view.json()
    assert (figures["kind"], figures["status"]) == ("openai_batch", "completed")
    totals = figures["totals"]
    for name in ("total_tokens", "prompt_tokens", "completion_tokens", "model_calls"):
        assert totals[name] == job["usage"][name], name
    assert totals["cost_usd"] == pytest.approx(job["usage"]["cost_usd"])
    assert len(figures["steps"]) == 8
    page = httpx.get(f"{api_server}/admin/jobs/{batch.id}", headers=admin)
    assert page.status_code == 200
    assert 'openai_batch · <span class="status-completed">completed</span>' in page.text
    assert f'data-figure="total_tokens" data-value="{totals["total_tokens"]}"' in page.text

    assert batch.id in [b.id for b in sdk.batches.list(limit=100).data]
    listed = {f.id for f in sdk.files.list()}
    assert {file_id, done.output_file_id} <= listed
    assert sdk.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_completions_batch_with_a_failed_line(sdk: openai.OpenAI, standin: Any) -> None:
    n = 6
    file_id = upload(sdk, [completion_line(f"c{i}", f"Count to {i}") for i in range(n)])
    with standin.state.lock:  # the server refuses the next request
        standin.state.fail_next, standin.state.fail_status = 1, 400
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                               completion_window="24h")
    done = wait_batch(sdk, batch.id, {"completed", "failed"})
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (n - 1, 1)
    out, errors = jsonl(sdk, done.output_file_id), jsonl(sdk, done.error_file_id)
    assert len(out) == n - 1
    assert len(errors) == 1
    assert set(out) | set(errors) == {
        f"c{i}" for i in range(n)}
    failed = next(iter(errors.values()))
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["type"] == "invalid_request_error"
    for record in out.values():
        body = record["response"]["body"]
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"].startswith(" Stand-in answer:")


def test_cancel_half_way_keeps_finished_lines(sdk: openai.OpenAI, standin: Any,
                                              api_server: str) -> None:
    n = 36
    lines = [chat_line(f"slow-{i}", f"Slow question {i}") for i in range(n)]
    file_id = upload(sdk, lines)
    with standin.state.lock:
        standin.state.delay_s = 0.25
        # The last chunk's lines stream slowly: the first two chunks end well before it.
        standin.state.token_delay_by_marker = {f"Slow question {i}\n": 0.2
                                               for i in range(24, n)}
    with settings(AGENTQ_BATCH_TARGET_STEPS="3"):  # 3 chunks of 12 lines
        batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    wait_until(lambda: ledger_rows(batch.id) >= 4, 60, what="a few lines to finish")

    def some_completed() -> Any:  # the counts grow as chunks end, before the batch ends
        running = sdk.batches.retrieve(batch.id)
        assert running.request_counts is not None
        return running if running.request_counts.completed > 0 else None

    running = wait_until(some_completed, 60, interval=0.1, what="a chunk's lines counted")
    assert running.status == "in_progress"
    assert 0 < running.request_counts.completed < running.request_counts.total == n
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(sdk, batch.id, {"cancelled"})
    assert done.cancelling_at
    assert done.cancelled_at

    finished = ledger_rows(batch.id)
    assert 4 <= finished < n
    out, errors = jsonl(sdk, done.output_file_id), jsonl(sdk, done.error_file_id)
    assert len(out) == finished  # every line whose call finished is in the output
    assert set(out) | set(errors) == {f"slow-{i}" for i in range(n)}
    assert not set(out) & set(errors)
    assert {r["error"]["code"] for r in errors.values()} == {"batch_cancelled"}
    # A batch runs once: its files are written; continuing its job is refused.
    again = httpx.post(f"{api_server}/v1/jobs/{batch.id}/continue", headers=auth(sdk.api_key))
    assert again.status_code == 409
    assert "cannot be continued" in again.json()["error"]["message"]
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (n, finished)
    for record in out.values():
        assert record["response"]["status_code"] == 200
        assert record["response"]["body"]["choices"][0]["message"]["content"]


def test_bad_files_and_requests(sdk: openai.OpenAI, api_server: str) -> None:
    good = chat_line("ok-1", "fine")
    # A malformed line: the batch fails validation with the line named; nothing else lost.
    bad_json = upload(sdk, [good, "{not json"])
    batch = sdk.batches.create(input_file_id=bad_json, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.status == "failed"
    assert batch.failed_at
    assert batch.errors is not None
    assert batch.errors.data
    assert (first_error(batch).code, first_error(batch).line) == ("invalid_json_line", 2)
    assert sdk.batches.retrieve(batch.id).status == "failed"
    assert sdk.files.retrieve(bad_json).id == bad_json
    # A batch is made only from a file.
    h = auth(sdk.api_key)
    direct = httpx.post(f"{api_server}/v1/jobs", headers=h, json={
        "kind": "openai_batch", "input": {"input_file_id": bad_json,
                                          "endpoint": "/v1/completions", "total": 1}})
    assert direct.status_code == 422
    assert "POST /v1/batches" in direct.json()["error"]["message"]

    # A line whose url is not the batch's endpoint.
    mixed = upload(sdk, [good, chat_line("ok-2", "x", url="/v1/completions")])
    batch = sdk.batches.create(input_file_id=mixed, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.status == "failed"
    assert batch.errors is not None
    assert (first_error(batch).code, first_error(batch).param) == ("mismatched_endpoint",
                                                                       "url")
    # A body that is not a chat request; a repeated custom_id.
    for lines, code in (([json.dumps({"custom_id": "x", "method": "POST",
                                      "url": "/v1/chat/completions", "body": {"model": MODEL}})],
                         "invalid_request"), ([good, good], "duplicate_custom_id")):
        batch = sdk.batches.create(input_file_id=upload(sdk, lines),
                                   endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.status == "failed"
        assert batch.errors is not None
        assert first_error(batch).code == code

    # Too many lines.
    with settings(AGENTQ_BATCH_MAX_LINES="2"):
        batch = sdk.batches.create(
            input_file_id=upload(sdk, [chat_line(f"m{i}", "x") for i in range(3)]),
            endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed"
    assert batch.errors is not None
    assert first_error(batch).code == "too_many_requests"

    # A wrong endpoint or window: 400, naming the parameter.
    with pytest.raises(openai.BadRequestError) as wrong:
        sdk.batches.create(input_file_id=bad_json,
                           endpoint="/v1/embeddings",
                           completion_window="24h")
    assert wrong.value.status_code == 400
    assert wrong.value.body["param"] == "endpoint"  # type: ignore[index]
    assert wrong.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(input_file_id=bad_json, endpoint="/v1/chat/completions",
                           completion_window="1h")  # type: ignore[arg-type]
    missing = httpx.post(f"{api_server}/v1/batches", headers=auth(sdk.api_key), json={
        "input_file_id": bad_json, "endpoint": "/v1/chat/completions"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                           completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("job_nope")

    # A file over the size limit is refused at upload; other purposes too.
    with settings(AGENTQ_BATCH_MAX_FILE_BYTES="2048"):
        with pytest.raises(openai.APIStatusError) as big:
            upload(sdk, [chat_line(f"b{i}", "x" * 200) for i in range(20)])
    assert big.value.status_code == 413
    assert big.value.body["code"] == "file_too_large"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as purpose:
        sdk.files.create(file=("a.jsonl", good.encode()), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]

    # Delete; another tenant's key and no key.
    assert sdk.files.delete(bad_json).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(bad_json)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api_server}/v1", api_key="aq_wrong",
                      max_retries=0).files.list()


def test_batch_completed_webhook(sdk: openai.OpenAI, api_server: str, tenant_key: str,
                                 receiver: Receiver) -> None:
    h = auth(tenant_key)
    endpoint = httpx.post(f"{api_server}/v1/webhook-endpoints", headers=h, json={
        "url": receiver.url, "events": ["batch.completed"]}).json()
    file_id = upload(sdk, [chat_line(f"w{i}", f"hook {i}") for i in range(3)])
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = wait_batch(sdk, batch.id, {"completed"})
    wait_until(lambda: receiver.received, 60, what="the batch.completed delivery")
    message = receiver.received[0]
    verify(endpoint["secret"], message)
    payload = json.loads(message["body"])
    assert payload["type"] == "batch.completed"
    assert payload["data"]["batch_id"] == batch.id
    assert payload["data"]["output_file_id"] == done.output_file_id
    assert payload["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    httpx.delete(f"{api_server}/v1/webhook-endpoints/{endpoint['id']}", headers=h)


def test_expiry_at_the_window_keeps_finished_lines(sdk: openai.OpenAI, standin: Any) -> None:
    from sqlalchemy import update

    from core.db import transaction
    from core.models import Job, utcnow

    n = 40
    file_id = upload(sdk, [chat_line(f"e{i}", f"Expiring {i}") for i in range(n)])
    with standin.state.lock:
        standin.state.delay_s = 0.25
    with settings(AGENTQ_BATCH_TARGET_STEPS="2"):  # 2 chunks of 20 lines, 5 s or more each
        batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert batch.expires_at is not None
    assert batch.expires_at - batch.created_at == 24 * 3600
    wait_until(lambda: ledger_rows(batch.id) >= 2, 60, what="a few lines to finish")
    with transaction() as s:  # the window ends now: the workers' sweeper expires the batch
        s.execute(update(Job).where(Job.id == batch.id).values(deadline_at=utcnow()))
    done = wait_batch(sdk, batch.id, {"expired", "completed"})
    assert done.status == "expired"
    assert done.expired_at
    out, errors = jsonl(sdk, done.output_file_id), jsonl(sdk, done.error_file_id)
    assert set(out) | set(errors) == {f"e{i}" for i in range(n)}
    assert not set(out) & set(errors)
    assert {r["error"]["code"] for r in errors.values()} == {"batch_expired"}
    assert len(errors) >= 1
    # Lines that finished in chunks still running at the window are kept too.
    assert len(out) == ledger_rows(batch.id) >= 2


def test_chat_lines_to_a_chat_model_keep_their_messages(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    """A catalogue model served over `/v1/chat/completions` gets each chat line's messages
    as they are (its chat template applies), not a transcript."""
    from tests.stack import isolated_stack

    catalogue = json.dumps([{"name": "chatty", "endpoints": [standin.url], "size": "small",
                             "api": "chat", "tool_calling": True}])
    with isolated_stack(database_url, agentq_env, tmp_path, "_openai_chat",
                        AGENTQ_MODELS=catalogue) as stack:
        stack.worker("worker", AGENTQ_MODELS=catalogue)
        client = openai.OpenAI(base_url=f"{stack.api}/v1", api_key=stack.key("chat"),
                               max_retries=0)
        lines = [json.dumps({"custom_id": f"t{i}", "method": "POST",
                             "url": "/v1/chat/completions", "body": {
                                 "model": "chatty", "max_tokens": 8, "messages": [
                                     {"role": "system", "content": "Be terse."},
                                     {"role": "user", "content": f"Chat line {i}"}]}})
                 for i in range(3)]
        file_id = upload(client, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        done = wait_batch(client, batch.id, {"completed", "failed"})
        out = jsonl(client, done.output_file_id)
    assert done.status == "completed"
    assert set(out) == {"t0", "t1", "t2"}
    # The model as the server reports it serving the call.
    assert {r["response"]["body"]["model"] for r in out.values()} == {MODEL}
    sent = [b for b in standin.state.bodies if "Chat line" in json.dumps(b)]
    assert len(sent) == 3
    for body in sent:
        assert body["_path"] == "/v1/chat/completions"
        assert body["model"] == "chatty"
        assert body["messages"][0] == {"role": "system", "content": "Be terse."}
        assert body["messages"][1]["content"].startswith("Chat line")
        assert "tools" not in body
        assert "structured_outputs" not in body
