"""The broker the tests run on: Redis by default (the queues live in `AGENTQ_TEST_REDIS_URL`),
or RabbitMQ when `AGENTQ_TEST_BROKER_URL` names an `amqp://` virtual host. A test that makes a
deployment of its own (its own database) gets a broker of its own too: on RabbitMQ a virtual
host made with `rabbitmqctl` and removed when the session ends."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from core.queue import is_amqp

_made: list[str] = []


def session_broker_url() -> str:
    """The session's `AGENTQ_BROKER_URL`: empty (Redis) or the RabbitMQ URL the tests were
    given."""
    import os

    return os.environ.get("AGENTQ_TEST_BROKER_URL", "")


def _rabbitmqctl(*args: str) -> None:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("AGENTQ_TEST_BROKER_URL is amqp:// but rabbitmqctl is not installed")
    subprocess.run([binary, "-q", *args], check=True, capture_output=True, timeout=60)


def vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def own_broker(name: str) -> dict[str, str]:
    """Settings giving a test's own deployment a broker that no other worker of the session
    reads: nothing to add on Redis (the broker follows the test's own `AGENTQ_REDIS_URL`), a
    fresh virtual host on RabbitMQ."""
    url = session_broker_url()
    if not is_amqp(url):
        return {"AGENTQ_BROKER_URL": ""}
    vhost = f"{vhost_of(url)}.{name}.{secrets.token_hex(3)}"
    _rabbitmqctl("add_vhost", vhost)
    _made.append(vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, urlsplit(url).username or "guest",
                 ".*", ".*", ".*")
    parts = urlsplit(url)
    return {"AGENTQ_BROKER_URL": urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))}


def remove_own_brokers() -> None:
    while _made:
        _rabbitmqctl("delete_vhost", _made.pop())


def purge_queues(url: str) -> None:
    """Empty agentq's queues on RabbitMQ (declaring them first), as the Redis database is
    flushed: messages left by an earlier session name rows that no longer exist."""
    from kombu import Connection

    from core.queue import declared_queues

    with Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=3)
        channel = conn.channel()
        for queue in declared_queues(url):
            bound = queue.bind(channel)
            bound.declare()
            bound.purge()
