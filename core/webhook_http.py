"""Sending webhooks safely: Standard Webhooks signatures, a guard against server-side request
forgery, and attempts that cannot hold anything for long.

Every address a webhook host resolves to must be globally routable (no loopback, private,
link-local, shared, reserved or multicast ranges, however the address is written: `0x7f000001`,
`2130706433` and `::ffff:127.0.0.1` are all loopback). An IPv6 address that carries an IPv4
address is judged by the IPv4 address(es) it carries: IPv4-mapped `::ffff:a.b.c.d`,
IPv4-compatible `::a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4
`2002:AABB:CCDD::`, Teredo `2001:0::` (its server and its client, whose address is stored
inverted) and ISATAP interface ids (`...:5efe:a.b.c.d`). Site-local `fec0::/10` and local-use
NAT64 `64:ff9b:1::/48` are never public. The connection then goes to the address that was
checked (TLS still verifies the host name), so a name cannot resolve to another address between
the check and the connection; redirects are never followed.
`AGENTQ_WEBHOOKS_ALLOW_PRIVATE_NETWORKS=true` lifts the address check for local development.

One attempt has one deadline for all of it (name lookup, connect, send, response headers and
body), and reads at most `max_response_bytes` of the response body, undecoded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import httpx
from standardwebhooks import Webhook

from core.errors import InvalidInput

MAX_URL_LENGTH = 2048
EXCERPT_CHARS = 500

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeWebhookURL(InvalidInput):
    code = "unsafe_webhook_url"


class LookupFailed(UnsafeWebhookURL):
    """The host name could not be resolved (in time): worth trying again later."""

    code = "unresolvable_webhook_host"


class DeadlineExceeded(httpx.TimeoutException):
    """The attempt's deadline passed before the receiver's response headers came."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    address: str  # the checked IP address to connect to


_NEVER_PUBLIC_V6 = (ipaddress.IPv6Network("fec0::/10"),        # site-local (deprecated)
                    ipaddress.IPv6Network("64:ff9b:1::/48"))   # local-use NAT64
# Prefixes whose last 32 bits are an IPv4 address.
_LOW_32_V6 = (ipaddress.IPv6Network("::/96"),                  # IPv4-compatible
              ipaddress.IPv6Network("::ffff:0:0:0/96"),        # IPv4-translated (SIIT)
              ipaddress.IPv6Network("64:ff9b::/96"))           # NAT64, well-known prefix


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address that an IPv6 address carries, in the forms that reach an IPv4 host."""
    n = int(ip)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if any(ip in net for net in _LOW_32_V6):
        found.append(low)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client); the client's is already un-inverted
    if (n >> 32) & 0xFCFFFFFF == 0x00005EFE:  # ISATAP: 0000:5efe or 0200:5efe (u/g bits)
        found.append(low)
    return found


def is_public(ip: IPAddress) -> bool:
    """Whether a connection to `ip` reaches only the public internet."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NEVER_PUBLIC_V6):
            return False
        carried = embedded_ipv4(ip)
        if carried:
            return all(is_public(v4) for v4 in carried)
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, timeout_s: float) -> list[IPAddress]:
    """`getaddrinfo` with a time limit (it has none of its own): the lookup runs in a daemon
    thread that is left behind if it does not answer in time."""
    answer: list[object] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="agentq-webhook-lookup", daemon=True).start()
    if not done.wait(max(timeout_s, 0.0)) or not answer:
        raise LookupFailed(f"webhook url: no answer resolving {host!r} within {timeout_s:g} s")
    result = answer[0]
    if isinstance(result, BaseException):
        raise LookupFailed(f"webhook url: cannot resolve {host!r}") from result
    assert isinstance(result, list)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in result]


def check_url(url: str, *, allow_private: bool, timeout_s: float = 10.0) -> Target:
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
    addresses = _resolve(host, port, timeout_s)
    if not addresses:
        raise UnsafeWebhookURL(f"webhook url: {host!r} has no address")
    for ip in addresses:
        if ip.is_unspecified or (not allow_private and not is_public(ip)):
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
    # The deadline passed after the response headers, while the body was being read.
    timed_out: bool = False


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


@dataclass
class _Response:
    """What has come back so far (kept when the deadline cuts the attempt off)."""

    status_code: int | None = None
    retry_after_s: float | None = None
    body: bytes = b""

    def result(self, timed_out: bool) -> SendResult:
        assert self.status_code is not None
        return SendResult(self.status_code, self.retry_after_s,
                          self.body.decode("utf-8", "replace")[:EXCERPT_CHARS], timed_out)


async def _post(request: httpx.Request, got: _Response, max_response_bytes: int,
                timeout_s: float) -> None:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                 timeout=httpx.Timeout(timeout_s)) as client:
        resp = await client.send(request, stream=True)
        try:
            got.status_code = resp.status_code
            got.retry_after_s = _retry_after(resp.headers.get("retry-after"))
            if max_response_bytes <= 0:
                return
            async for chunk in resp.aiter_raw():
                got.body += chunk[:max_response_bytes - len(got.body)]
                if len(got.body) >= max_response_bytes:
                    break  # the rest is never read: the connection is closed with it unread
        finally:
            await resp.aclose()


async def _post_within(deadline: float, request: httpx.Request, max_response_bytes: int,
                       timeout_s: float) -> SendResult:
    got = _Response()
    try:
        async with asyncio.timeout(deadline - time.monotonic()):
            await _post(request, got, max_response_bytes, timeout_s)
    except TimeoutError:
        if got.status_code is None:
            raise DeadlineExceeded(f"no response within the attempt's {timeout_s:g} s",
                                   request=request) from None
        return got.result(timed_out=True)
    return got.result(timed_out=False)


def send(url: str, body: str, headers: dict[str, str], *, allow_private: bool,
         timeout_s: float, max_response_bytes: int = 4096) -> SendResult:
    """POST to the checked address within `timeout_s` in all; no redirects, no proxies from the
    environment; at most `max_response_bytes` of the response body are read."""
    deadline = time.monotonic() + timeout_s
    target = check_url(url, allow_private=allow_private, timeout_s=timeout_s)
    parsed = httpx.URL(url)
    pinned = parsed.copy_with(host=target.address)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    request = httpx.Request("POST", pinned, content=body.encode(), headers={
        **headers, "Host": host_header, "Content-Type": "application/json",
        "Accept-Encoding": "identity", "Connection": "close",
        "User-Agent": "agentq-webhooks/1"}, extensions=extensions)
    return asyncio.run(_post_within(deadline, request, max_response_bytes, timeout_s))
