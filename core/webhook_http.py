"""Sending webhooks safely: Standard Webhooks signatures, and a guard against server-side
request forgery.

Every address a webhook host resolves to must be globally routable (no loopback, private,
link-local, shared, reserved or multicast ranges, however the address is written: `0x7f000001`,
`2130706433` and `::ffff:127.0.0.1` are all loopback); the connection then goes to the address
that was checked (TLS still verifies the host name), and redirects are never followed.
`AGENTQ_WEBHOOKS_ALLOW_PRIVATE_NETWORKS=true` lifts the address check for local development.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from datetime import datetime

import httpx
from standardwebhooks import Webhook

from core.errors import InvalidInput

MAX_URL_LENGTH = 2048


class UnsafeWebhookURL(InvalidInput):
    code = "unsafe_webhook_url"


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    address: str  # the checked IP address to connect to


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _is_public(ip.ipv4_mapped)
    return ip.is_global and not ip.is_multicast


def check_url(url: str, *, allow_private: bool) -> Target:
    """Validate a webhook URL and resolve it; raises `UnsafeWebhookURL` with the reason."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookURL(f"webhook url: longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UnsafeWebhookURL(f"webhook url: not a URL ({exc})") from exc
    if parsed.scheme not in {"http", "https"}:
        raise UnsafeWebhookURL("webhook url: the scheme must be http or https")
    host = parsed.host
    if not host:
        raise UnsafeWebhookURL("webhook url: no host")
    if parsed.userinfo:
        raise UnsafeWebhookURL("webhook url: credentials in the URL are not allowed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeWebhookURL(f"webhook url: cannot resolve {host!r}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise UnsafeWebhookURL(f"webhook url: {host!r} has no address")
    for ip in addresses:
        if ip.is_unspecified or (not allow_private and not _is_public(ip)):
            raise UnsafeWebhookURL(
                f"webhook url: {host!r} resolves to {ip}, which is not a public address")
    return Target(parsed.scheme, host, port, str(addresses[0]))


def sign(secrets: list[str], message_id: str, timestamp: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated."""
    return " ".join(Webhook(s).sign(message_id, timestamp, body) for s in secrets)


@dataclass(frozen=True)
class SendResult:
    status_code: int
    retry_after_s: float | None
    excerpt: str


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def send(url: str, body: str, headers: dict[str, str], *, allow_private: bool,
         timeout_s: float) -> SendResult:
    """POST to the checked address; no redirects, no proxies from the environment."""
    target = check_url(url, allow_private=allow_private)
    parsed = httpx.URL(url)
    ip_host = f"[{target.address}]" if ":" in target.address else target.address
    pinned = parsed.copy_with(host=ip_host.strip("[]"))
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    with httpx.Client(follow_redirects=False, trust_env=False,
                      timeout=httpx.Timeout(timeout_s)) as client:
        resp = client.post(pinned, content=body.encode(), extensions=extensions,
                           headers={**headers, "Host": host_header,
                                    "Content-Type": "application/json",
                                    "User-Agent": "agentq-webhooks/1"})
    return SendResult(resp.status_code, _retry_after(resp.headers.get("retry-after")),
                      resp.text[:500])
