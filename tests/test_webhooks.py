"""Signed webhooks: delivery through real workers to a local receiver that misbehaves on purpose,
verified with the reference `standardwebhooks` package; and the SSRF guard."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from bench.standin import free_port
from core.webhook_http import UnsafeWebhookURL, check_url
from tests.helpers import auth, wait_for_job, wait_until


@dataclass
class Receiver:
    url: str
    responses: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def program(self, *responses: int | tuple[int, dict[str, str]]) -> None:
        with self.lock:
            self.responses = [r if isinstance(r, tuple) else (r, {}) for r in responses]
            self.received.clear()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    port = free_port()
    rec = Receiver(url=f"http://127.0.0.1:{port}/hook")
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        body = await request.body()
        with rec.lock:
            rec.received.append({"headers": dict(request.headers), "body": body.decode()})
            status, headers = rec.responses.pop(0) if rec.responses else (200, {})
        return Response(status_code=status, headers=headers)

    @app.get("/elsewhere")
    async def elsewhere() -> Response:
        return Response(status_code=200)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, what="the receiver")
    yield rec
    server.should_exit = True
    thread.join(timeout=10)


def verify(secret: str, msg: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(msg["body"], msg["headers"])
    return payload


JOB = {"kind": "completion", "input": {"prompt": "Say hello", "max_tokens": 4}}


@pytest.mark.usefixtures("worker")
def test_job_webhook_is_signed_and_delivered(client: TestClient, tenant_key: str,
                                             receiver: Receiver, standin: Any) -> None:
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        **JOB, "webhook": {"url": receiver.url, "events": ["job.started", "job.completed"]}})
    assert resp.status_code == 202, resp.text
    secret = resp.json()["webhook"]["secret"]
    assert secret.startswith("whsec_")
    job_id = resp.json()["id"]
    assert wait_for_job(client, tenant_key, job_id)["status"] == "completed"
    # the secret is never shown again
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()[
        "webhook"]["secret"] is None
    wait_until(lambda: len(receiver.received) >= 2, 30, what="two deliveries")
    types = sorted(verify(secret, m)["type"] for m in receiver.received)
    assert types == ["job.completed", "job.started"]
    done = next(verify(secret, m) for m in receiver.received
                if verify(secret, m)["type"] == "job.completed")
    assert done["data"]["job_id"] == job_id
    assert done["data"]["status"] == "completed"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(receiver.received[0]["body"],
                                              receiver.received[0]["headers"])


@pytest.mark.usefixtures("worker")
def test_retries_keep_the_webhook_id_and_honour_retry_after(
        client: TestClient, tenant_key: str, receiver: Receiver, standin: Any) -> None:
    h = auth(tenant_key)
    created = client.post("/v1/webhook-endpoints", headers=h,
                          json={"url": receiver.url, "events": ["job.completed"]})
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_")
    listed = client.get("/v1/webhook-endpoints", headers=h).json()["data"]
    assert [e["secret"] for e in listed] == [None]
    receiver.program(500, (429, {"Retry-After": "2"}), (302, {"Location": "/elsewhere"}), 200)
    job_id = client.post("/v1/jobs", headers=h, json=JOB).json()["id"]
    assert wait_for_job(client, tenant_key, job_id)["status"] == "completed"

    def delivered() -> list[dict[str, Any]] | None:
        data: list[dict[str, Any]] = client.get(f"/v1/jobs/{job_id}/webhook-deliveries",
                                                headers=h).json()["data"]
        return data if data and data[0]["status"] == "succeeded" else None

    deliveries = wait_until(delivered, 60, interval=0.3, what="the delivery to succeed")
    d = deliveries[0]
    assert [a["status_code"] for a in d["attempts"]] == [500, 429, 302, 200]
    assert len(receiver.received) == 4
    assert {m["headers"]["webhook-id"] for m in receiver.received} == {d["webhook_id"]}
    for m in receiver.received:
        verify(endpoint["secret"], m)
    # Retry-After: 2 was honoured (the schedule alone would retry after about one second)
    gap = (float(receiver.received[2]["headers"]["webhook-timestamp"])
           - float(receiver.received[1]["headers"]["webhook-timestamp"]))
    assert gap >= 2
    # redeliver sends the same message again
    receiver.program(200)
    again = client.post(f"/v1/jobs/{job_id}/webhook-deliveries/{d['id']}/redeliver", headers=h)
    assert again.status_code == 202
    wait_until(lambda: len(receiver.received) == 1, 30, what="the redelivery")
    assert receiver.received[0]["headers"]["webhook-id"] == d["webhook_id"]
    client.delete(f"/v1/webhook-endpoints/{endpoint['id']}", headers=h)


@pytest.mark.usefixtures("worker")
def test_410_disables_the_endpoint(client: TestClient, tenant_key: str, receiver: Receiver,
                                   standin: Any) -> None:
    h = auth(tenant_key)
    ep = client.post("/v1/webhook-endpoints", headers=h,
                     json={"url": receiver.url}).json()
    receiver.program(410)
    job_id = client.post("/v1/jobs", headers=h, json=JOB).json()["id"]
    wait_for_job(client, tenant_key, job_id)
    wait_until(lambda: client.get("/v1/webhook-endpoints", headers=h).json()["data"][0][
        "disabled_at"], 30, what="the endpoint to be disabled")
    d = client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=h).json()["data"][0]
    assert d["status"] == "failed"
    assert len(d["attempts"]) == 1
    # a disabled endpoint receives nothing more
    job2 = client.post("/v1/jobs", headers=h, json=JOB).json()["id"]
    wait_for_job(client, tenant_key, job2)
    assert client.get(f"/v1/jobs/{job2}/webhook-deliveries", headers=h).json()["data"] == []
    assert len(receiver.received) == 1
    client.delete(f"/v1/webhook-endpoints/{ep['id']}", headers=h)


@pytest.mark.usefixtures("worker")
def test_rotation_sends_both_signatures(client: TestClient, tenant_key: str,
                                        receiver: Receiver, standin: Any) -> None:
    h = auth(tenant_key)
    ep = client.post("/v1/webhook-endpoints", headers=h, json={"url": receiver.url}).json()
    rotated = client.post(f"/v1/webhook-endpoints/{ep['id']}/rotate-secret", headers=h).json()
    assert rotated["secret"] != ep["secret"]
    receiver.program(200)
    job_id = client.post("/v1/jobs", headers=h, json=JOB).json()["id"]
    wait_for_job(client, tenant_key, job_id)
    wait_until(lambda: receiver.received, 30, what="the delivery")
    msg = receiver.received[0]
    assert len(msg["headers"]["webhook-signature"].split(" ")) == 2
    verify(ep["secret"], msg)
    verify(rotated["secret"], msg)
    client.delete(f"/v1/webhook-endpoints/{ep['id']}", headers=h)


@pytest.mark.usefixtures("worker")
def test_retries_give_up_after_the_schedule(client: TestClient, tenant_key: str,
                                            receiver: Receiver, standin: Any) -> None:
    h = auth(tenant_key)
    receiver.program(*[503] * 10)
    resp = client.post("/v1/jobs", headers=h, json={**JOB, "webhook": {"url": receiver.url}})
    job_id = resp.json()["id"]
    wait_for_job(client, tenant_key, job_id)

    def failed() -> dict[str, Any] | None:
        d: dict[str, Any] = client.get(f"/v1/jobs/{job_id}/webhook-deliveries",
                                       headers=h).json()["data"][0]
        return d if d["status"] == "failed" else None

    d = wait_until(failed, 60, interval=0.3, what="the delivery to give up")
    assert len(d["attempts"]) == 4  # the first try and the three scheduled retries (test env)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/", "http://10.1.2.3/", "http://192.168.0.1/",
    "http://172.16.5.4/", "http://169.254.169.254/latest/meta-data/", "http://0x7f000001/",
    "http://2130706433/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
    "http://100.64.0.1/", "ftp://example.com/", "http:///nohost", "not a url",
    "http://user:pw@93.184.216.34/",
])
def test_ssrf_guard_refuses_non_public_targets(url: str) -> None:
    with pytest.raises(UnsafeWebhookURL):
        check_url(url, allow_private=False)


def test_ssrf_guard_accepts_public_addresses_and_the_explicit_setting() -> None:
    assert check_url("https://93.184.216.34/hook", allow_private=False).address == \
        "93.184.216.34"
    assert check_url("http://127.0.0.1:9/hook", allow_private=True).address == "127.0.0.1"


def test_private_webhook_urls_are_refused_by_default(client: TestClient, tenant_key: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "webhooks_allow_private_networks", False)
    h = auth(tenant_key)
    for url in ["http://127.0.0.1:9/hook", "http://169.254.169.254/", "http://0x7f000001/"]:
        r = client.post("/v1/webhook-endpoints", headers=h, json={"url": url})
        assert r.status_code == 422, url
        assert r.json()["error"]["code"] == "unsafe_webhook_url"
        r = client.post("/v1/jobs", headers=h, json={**JOB, "webhook": {"url": url}})
        assert r.status_code == 422, url


def test_redirects_to_loopback_are_not_followed(receiver: Receiver) -> None:
    from core.webhook_http import send

    receiver.program((307, {"Location": "http://127.0.0.1:9/internal"}))
    result = send(receiver.url, "{}", {}, allow_private=True, timeout_s=5)
    assert result.status_code == 307
    assert len(receiver.received) == 1


def _other_tenant_key() -> str:
    import secrets

    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, f"tenant-{secrets.token_hex(4)}")
    return raw


@pytest.mark.usefixtures("worker")
def test_another_tenant_can_neither_see_nor_touch_endpoints_or_deliveries(
        client: TestClient, tenant_key: str, receiver: Receiver, standin: Any) -> None:
    from core.db import transaction
    from core.models import WebhookEndpoint

    a, b = auth(tenant_key), auth(_other_tenant_key())
    ep = client.post("/v1/webhook-endpoints", headers=a,
                     json={"url": receiver.url, "events": ["job.completed"]}).json()
    job_id = client.post("/v1/jobs", headers=a, json=JOB).json()["id"]
    wait_for_job(client, tenant_key, job_id)

    def delivered() -> dict[str, Any] | None:
        data = client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=a).json()["data"]
        return data[0] if data and data[0]["status"] == "succeeded" else None

    d = wait_until(delivered, 30, interval=0.3, what="tenant A's delivery")
    b_job = client.post("/v1/jobs", headers=b, json=JOB).json()["id"]
    missing_ep, missing_d = "whe_" + "0" * 32, "whd_" + "0" * 32

    # B sees none of A's endpoints, and acting on one answers as if it did not exist.
    assert client.get("/v1/webhook-endpoints", headers=b).json()["data"] == []
    for method, path, absent in [
            ("POST", f"/v1/webhook-endpoints/{ep['id']}/rotate-secret",
             f"/v1/webhook-endpoints/{missing_ep}/rotate-secret"),
            ("DELETE", f"/v1/webhook-endpoints/{ep['id']}",
             f"/v1/webhook-endpoints/{missing_ep}"),
            ("GET", f"/v1/jobs/{job_id}/webhook-deliveries",
             f"/v1/jobs/job_{'0' * 32}/webhook-deliveries"),
            ("POST", f"/v1/jobs/{job_id}/webhook-deliveries/{d['id']}/redeliver",
             f"/v1/jobs/{job_id}/webhook-deliveries/{missing_d}/redeliver"),
            ("POST", f"/v1/jobs/{b_job}/webhook-deliveries/{d['id']}/redeliver",
             f"/v1/jobs/{b_job}/webhook-deliveries/{missing_d}/redeliver")]:
        r = client.request(method, path, headers=b)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == client.request(method, absent, headers=b).json()[
            "error"]["code"] == "not_found"

    # Nothing of A's changed: the endpoint, its secret, the delivery.
    assert [e["id"] for e in client.get("/v1/webhook-endpoints", headers=a).json()["data"]] \
        == [ep["id"]]
    with transaction() as s:
        row = s.get(WebhookEndpoint, ep["id"])
        assert row is not None
        assert (row.secret, row.previous_secret) == (ep["secret"], None)
    after = client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=a).json()["data"]
    assert [(x["id"], x["status"], len(x["attempts"])) for x in after] == \
        [(d["id"], "succeeded", 1)]
    assert client.delete(f"/v1/webhook-endpoints/{ep['id']}", headers=a).status_code == 204
