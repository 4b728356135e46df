"""NUL characters from outside reach the database's text and JSON columns, which on Postgres
cannot hold them: a test command's output, a model's answer. Each is stored with U+FFFD in the
NUL's place, and the job ends (before, the write failed every time it was tried and the job
never ended)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.db import storable_json
from tests.helpers import auth, wait_for_job
from tests.test_coding import BUGGY, FIX

pytestmark = pytest.mark.usefixtures("worker")


def test_a_test_command_that_prints_nul_bytes_ends_its_job(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.replies = {"Changed files:": FIX}
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "coding", "input": {"task": "Make add() return the sum.", "files": BUGGY,
                                    "test_command": "printf 'out\\000put'; exit 3",
                                    "max_rounds": 1}})
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=90)
    assert job["status"] == "completed", job
    assert job["result"]["exit_code"] == 3
    assert job["result"]["test_report"] == "out\ufffdput"


def test_a_model_answer_with_nul_characters_ends_its_job(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.replies = {"nul-marker": "before\x00after"}
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "nul-marker: say it"}})
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=60)
    assert job["status"] == "completed", job
    assert job["result"]["text"] == "before\ufffdafter"


@pytest.mark.parametrize("value", ["a\x00b", "\\u0000", "\\\x00", {"k\x00": ["\x00", 1]}])
def test_only_nul_characters_change_in_json(value: Any) -> None:
    def swap(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace("\x00", "\ufffd")
        if isinstance(v, dict):
            return {swap(k): swap(x) for k, x in v.items()}
        return [swap(x) for x in v] if isinstance(v, list) else v

    assert json.loads(storable_json(value)) == swap(value)
