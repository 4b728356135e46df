"""The broker the tests run on: Redis by default (the queues live in `AGENTQ_TEST_REDIS_URL`),
or RabbitMQ when `AGENTQ_TEST_BROKER_URL` names an `amqp://` virtual host. A test that makes a
deployment of its own (its own database) gets a broker of its own too: on RabbitMQ a virtual
host made with `rabbitmqctl` and removed when the session ends."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from bench.common import Proc
from core.queue import is_amqp

_made: list[str] = []


def session_broker_url() -> str:
    """The session's `AGENTQ_BROKER_URL`: empty (Redis) or the RabbitMQ URL the tests were
    given."""
    return os.environ.get("AGENTQ_TEST_BROKER_URL", "")


def _rabbitmqctl(*args: str) -> None:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("AGENTQ_TEST_BROKER_URL is amqp:// but rabbitmqctl is not installed")
    command = [binary, "-q", *args] if os.geteuid() == 0 else ["sudo", "-n", binary, "-q", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


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


class RabbitNode:
    """A RabbitMQ node of this test's own (its own port, node name and data folder), so that
    it can be stopped and started again without touching any other user of the machine's
    RabbitMQ. Its data survive a restart, as a server's do."""

    def __init__(self, folder: Path) -> None:
        from bench.standin import free_port

        self.folder = folder
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.proc: Proc | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(folder),  # its Erlang cookie
            "RABBITMQ_NODENAME": f"agentq-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "node.pid"),
        }
        self.starts = 0

    @staticmethod
    def binary() -> str:
        for candidate in (os.environ.get("AGENTQ_TEST_RABBITMQ_SERVER"),
                          "/usr/lib/rabbitmq/bin/rabbitmq-server",
                          shutil.which("rabbitmq-server")):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        pytest.skip("rabbitmq-server is not installed")

    def start(self) -> RabbitNode:
        from kombu import Connection

        from tests.helpers import wait_until

        self.starts += 1
        proc = self.proc = Proc([self.binary()], self.env,
                                self.folder / f"node-{self.starts}.log")

        def up() -> bool:
            if proc.popen.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited:\n{proc.output()[-3000:]}")
            try:
                with Connection(self.url, connect_timeout=1) as conn:
                    conn.ensure_connection(max_retries=0)
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_until(up, 60, interval=0.3, what="the RabbitMQ node to accept connections")
        return self

    def stop(self) -> None:
        """An orderly stop (SIGTERM), as a service manager restarting it would."""
        if self.proc is not None:
            self.proc.stop(timeout=60)
            self.proc = None

    def kill(self) -> None:
        """Gone at once (the end of a test)."""
        if self.proc is not None:
            self.proc.stop(timeout=0)
            self.proc = None
