"""The SSRF guard over every way an address can be written, at registration (422) and again at
delivery, where a worker that allows no private networks refuses what the API let through;
and the connection goes to the address that was checked, however the name resolves later."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core.webhook_http import UnsafeWebhookURL, check_url, send
from tests.helpers import auth, wait_for_job, wait_until
from tests.receivers import serve
from tests.stack import isolated_stack

JOB = {"kind": "completion", "input": {"prompt": "Say hello", "max_tokens": 4}}

# IPv6 addresses that carry a non-public IPv4 address, or are never public.
REFUSED_HOSTS = [
    "[::ffff:127.0.0.1]",         # IPv4-mapped
    "[::ffff:a9fe:a9fe]",         # IPv4-mapped, hex
    "[::127.0.0.1]",              # IPv4-compatible
    "[::a00:1]",                  # IPv4-compatible 10.0.0.1
    "[::ffff:0:7f00:1]",          # IPv4-translated (SIIT)
    "[64:ff9b::a9fe:a9fe]",       # NAT64 well-known prefix: 169.254.169.254
    "[64:ff9b::10.0.0.1]",
    "[64:ff9b:1::a9fe:a9fe]",     # NAT64 local-use prefix
    "[64:ff9b:1::808:808]",       # local use: never public, whatever it carries
    "[2002:7f00:1::1]",           # 6to4: 127.0.0.1
    "[2002:a9fe:a9fe::1]",        # 6to4: 169.254.169.254
    "[2002:c0a8:1::]",            # 6to4: 192.168.0.1
    "[2001:0:808:808::80ff:fffe]",  # Teredo: client 127.0.0.1 (stored inverted)
    "[2001:0:a00:1::f7f7:fbfb]",  # Teredo: server 10.0.0.1
    "[2607:f8b0::5efe:7f00:1]",   # ISATAP interface id: 127.0.0.1
    "[2607:f8b0::200:5efe:a9fe:a9fe]",  # ISATAP (u bit set): 169.254.169.254
    "[fec0::1]",                  # site-local
    "[fed0::5]",                  # site-local
    "[::1]",
    "[fe80::1]",
    "[fc00::1]",
]
# The same forms carrying public IPv4 addresses are judged by those.
ACCEPTED_HOSTS = [
    "[::ffff:8.8.8.8]",
    "[64:ff9b::808:808]",
    "[2002:808:808::1]",
    "[2001:0:808:808::f7f7:fbfb]",  # Teredo: server 8.8.8.8, client 8.8.4.4
    "[2607:f8b0::5efe:808:808]",
    "[2001:4860:4860::8888]",
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_embedded_and_site_local_addresses_are_refused(host: str) -> None:
    with pytest.raises(UnsafeWebhookURL, match="not a public address"):
        check_url(f"http://{host}/hook", allow_private=False)


@pytest.mark.parametrize("host", ACCEPTED_HOSTS)
def test_embedded_public_addresses_are_accepted(host: str) -> None:
    target = check_url(f"https://{host}/hook", allow_private=False)
    assert ipaddress.ip_address(target.address) == ipaddress.ip_address(host.strip("[]"))


def test_registration_refuses_every_form(client: TestClient, tenant_key: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "webhooks_allow_private_networks", False)
    h = auth(tenant_key)
    for host in REFUSED_HOSTS:
        url = f"http://{host}:8080/hook"
        r = client.post("/v1/webhook-endpoints", headers=h, json={"url": url})
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["code"] == "unsafe_webhook_url"
        assert "not a public address" in r.json()["error"]["message"]
        r = client.post("/v1/jobs", headers=h, json={**JOB, "webhook": {"url": url}})
        assert r.status_code == 422, (url, r.text)
    assert client.get("/v1/webhook-endpoints", headers=h).json()["data"] == []


def test_delivery_checks_again_without_private_networks(
        database_url: str, agentq_env: dict[str, str], standin: Any, tmp_path: Path) -> None:
    """The API of this deployment allows private networks (so these endpoints are registered,
    as an address could also change after registration); its worker does not, and refuses
    every one at delivery time: the receiver on 127.0.0.1 hears nothing."""
    with serve("ok") as rx, isolated_stack(
            database_url, agentq_env, tmp_path, "_ssrf",
            AGENTQ_WEBHOOK_MAX_ENDPOINTS_PER_TENANT="64") as stack:
        stack.worker("worker", AGENTQ_WEBHOOKS_ALLOW_PRIVATE_NETWORKS="false")
        key = stack.key("ssrf")
        hosts = ["127.0.0.1", "localhost", "2130706433", "0x7f000001", *REFUSED_HOSTS]
        urls = [f"http://{host}:{rx.port}/hook" for host in hosts]
        with httpx.Client(base_url=stack.api, headers=auth(key), timeout=30) as http:
            for url in urls:
                r = http.post("/v1/webhook-endpoints", json={"url": url,
                                                             "events": ["job.completed"]})
                assert r.status_code == 201, (url, r.text)
            job_id = http.post("/v1/jobs", json={
                **JOB, "webhook": {"url": rx.url, "events": ["job.completed"]}}).json()["id"]
            assert wait_for_job(http, key, job_id)["status"] == "completed"

            def all_failed() -> list[dict[str, Any]] | None:
                ds: list[dict[str, Any]] = http.get(
                    f"/v1/jobs/{job_id}/webhook-deliveries").json()["data"]
                return ds if len(ds) == len(urls) + 1 and all(
                    d["status"] == "failed" for d in ds) else None

            deliveries = wait_until(all_failed, 60, interval=0.3,
                                    what="every delivery to be refused")
    assert rx.received == []
    assert sorted(d["url"] for d in deliveries) == sorted([*urls, rx.url])
    for d in deliveries:
        assert len(d["attempts"]) == 1, d  # refused for good, not retried
        assert "which is not a public address" in d["attempts"][0]["error"], d


def test_the_connection_goes_to_the_address_that_was_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that resolves to a public address when checked and to loopback a moment later
    (DNS rebinding): the request goes to the public address, never to loopback."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        ip = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    with serve("ok") as rx:
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        try:
            send(f"http://rebind.example:{rx.port}/hook", "{}", {}, allow_private=False,
                 timeout_s=2)
        except httpx.HTTPError:
            pass  # where the public address cannot be reached from here
        monkeypatch.undo()
    assert lookups == ["rebind.example"]  # looked up once, for the check
    assert rx.received == []


def test_a_name_is_sent_as_the_host_while_the_checked_address_is_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pinning, seen from two receivers on one port: the name is checked as
    127.0.0.1 and later resolves to 127.0.0.2; only 127.0.0.1 is asked, with the name as Host."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        ip = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    with serve("ok", "127.0.0.1") as checked, serve("ok", "127.0.0.2", checked.port) as other:
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        result = send(f"http://rebind.example:{checked.port}/hook", "{}", {},
                      allow_private=True, timeout_s=5)
        monkeypatch.undo()
    assert result.status_code == 200
    assert lookups == ["rebind.example"]
    assert other.received == []
    assert [h["host"] for h, _ in checked.received] == [f"rebind.example:{checked.port}"]
