"""A job kind from a package of its own (`tests/plugins/agentq-kind-echo`), found through the
`agentq.kinds` entry-point group once the package is installed, and run by a real API and
worker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents import registry
from agents.batch import Batch
from bench.common import start_api
from tests.helpers import ROOT, auth, install_plugin, start_worker, wait_for_job


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory with the plugin installed in it, to put on PYTHONPATH."""
    return install_plugin("agentq-kind-echo", tmp_path_factory.mktemp("plugin"))


def with_plugin(env: dict[str, str], plugin_path: str) -> dict[str, str]:
    old = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": plugin_path + (os.pathsep + old if old else "")}


def test_an_installed_plugin_kind_is_registered(plugin_path: str) -> None:
    probe = ("import json\n"
             "from agents.registry import get_kind, kind_names\n"
             "kind = get_kind('echo')\n"
             "print(json.dumps({'names': kind_names(), 'class': type(kind).__module__ + '.' +"
             " type(kind).__name__, 'roles': [r.name for r in kind.roles],"
             " 'phases': kind.phases}))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=with_plugin(dict(os.environ), plugin_path))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"echo", "research", "coding", "completion", "batch"} <= set(found["names"])
    assert found["class"] == "agentq_kind_echo.Echo"
    assert found["roles"] == ["shout", "echo"]
    assert found["phases"] == {"shout": "shouting", "echo": "echoing"}


@pytest.fixture
def plugin_services(agentq_env: dict[str, str], plugin_path: str, quiet_workers: None,
                    tmp_path: Path) -> Iterator[str]:
    """The API and a worker, both with the plugin on their path; the session's own worker (which
    does not know the kind) is paused meanwhile. Yields the API's URL."""
    env = with_plugin(agentq_env, plugin_path)
    base, api = start_api(env, tmp_path / "api.log")
    try:
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            yield base
        finally:
            worker.stop()
    finally:
        api.stop()


def test_a_plugin_kind_runs_end_to_end(plugin_services: str, tenant_key: str,
                                       standin: Any) -> None:
    standin.state.replies = {"Shout this:": "hello there"}
    with httpx.Client(base_url=plugin_services, timeout=30) as http:
        kinds = {k["name"]: k for k in
                 http.get("/v1/kinds", headers=auth(tenant_key)).json()["data"]}
        assert kinds["echo"]["roles"] == ["echo", "shout"]
        assert "text" in kinds["echo"]["input_schema"]["properties"]
        resp = http.post("/v1/jobs", headers=auth(tenant_key),
                         json={"kind": "echo", "input": {"text": "hello"}})
        assert resp.status_code == 202, resp.text
        job = wait_for_job(http, tenant_key, resp.json()["id"], timeout=90)
        assert job["status"] == "completed", job
        # The echo step read its parent's output as a ShoutOutput and derived its own from it.
        assert job["result"] == {"shout": "HELLO THERE",
                                 "echo": "HELLO THERE... hello there...", "length": 11}
        steps = http.get(f"/v1/jobs/{job['id']}/steps", headers=auth(tenant_key)).json()["data"]
    assert [(s["key"], s["role"], s["status"]) for s in steps] == [
        ("shout", "shout", "completed"), ("echo", "echo", "completed")]
    assert steps[1]["depends_on"] == ["shout"]


class ImpostorBatch(Batch):
    """A second kind named `batch`."""


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The registry forgets what it loaded, and loads again from the entry points the test
    sets; it is restored afterwards."""
    monkeypatch.setattr(registry, "_kinds", None)
    yield
    monkeypatch.setattr(registry, "_kinds", None)


def test_broken_and_duplicate_entry_points_are_skipped(
        fresh_registry: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    points = [EntryPoint("batch", "agents.batch:Batch", registry.GROUP),
              EntryPoint("broken", "agentq_no_such_module:Kind", registry.GROUP),
              EntryPoint("passage", "agents.base:Passage", registry.GROUP),
              EntryPoint("batch", f"{__name__}:ImpostorBatch", registry.GROUP),
              EntryPoint("completion", "agents.completion:Completion", registry.GROUP)]

    def found(group: str) -> list[EntryPoint]:
        assert group == registry.GROUP
        return points

    monkeypatch.setattr(registry, "entry_points", found)
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registry.kind_names() == ["batch", "completion"]
    assert type(registry.get_kind("batch")) is Batch  # the first found wins
    assert registry.get_kind("broken") is None
    logged = caplog.text
    assert "agentq_no_such_module:Kind could not be loaded" in logged
    assert "agents.base:Passage could not be loaded" in logged
    assert "ImpostorBatch is ignored" in logged


def test_kinds_load_once_across_threads(fresh_registry: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def found(group: str) -> list[EntryPoint]:
        calls.append(group)
        time.sleep(0.05)
        return [EntryPoint("completion", "agents.completion:Completion", group)]

    monkeypatch.setattr(registry, "entry_points", found)
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: registry.kind_names(), range(16)))
    assert names == [["completion"]] * 16
    assert calls == [registry.GROUP]
