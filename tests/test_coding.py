"""Coding jobs with a scripted stand-in model and the fixed-format coder (`"coder": "fixed"`):
plan, write, test in the sandbox, revise. The coder loop (the default) is tested in
tests/test_coding_loop.py."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from agents.coding import parse_files, render_files, unified_diff
from tests.helpers import auth, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")

BUGGY = {
    "calc.py": "def add(a, b):\n    return a - b\n",
    "test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}
FIX = "=== FILE: calc.py ===\ndef add(a, b):\n    return a + b\n=== END FILE ===\n"
WRONG_FIX = "=== FILE: calc.py ===\ndef add(a, b):\n    return a * b\n=== END FILE ===\n"


def submit(client: TestClient, key: str, **extra: Any) -> dict[str, Any]:
    resp = client.post("/v1/jobs", headers=auth(key), json={
        "kind": "coding", "input": {"task": "Make add() return the sum.", "files": BUGGY,
                                    "test_command": "python -m pytest -q", "coder": "fixed",
                                    **extra}})
    assert resp.status_code == 202, resp.text
    return wait_for_job(client, key, resp.json()["id"], timeout=120)


def test_a_correct_patch_passes_in_one_round(client: TestClient, tenant_key: str,
                                              standin: Any) -> None:
    standin.state.replies = {"Changed files:": FIX}
    job = submit(client, tenant_key)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["passed"] is True
    assert result["rounds"] == 1
    assert result["files"]["calc.py"] == "def add(a, b):\n    return a + b\n"
    assert "-    return a - b" in result["diff"]
    assert "+    return a + b" in result["diff"]
    assert "1 passed" in result["test_report"]
    steps = client.get(f"/v1/jobs/{job['id']}/steps", headers=auth(tenant_key)).json()["data"]
    assert [s["key"] for s in steps] == ["plan", "write-1", "test-1"]


def test_failing_tests_drive_revisions_until_the_rounds_run_out(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    standin.state.replies = {"Changed files:": WRONG_FIX}
    job = submit(client, tenant_key, max_rounds=2)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["passed"] is False
    assert result["rounds"] == 2
    assert "1 failed" in result["test_report"]
    steps = client.get(f"/v1/jobs/{job['id']}/steps", headers=auth(tenant_key)).json()["data"]
    assert [s["key"] for s in steps] == ["plan", "write-1", "test-1", "write-2", "test-2"]


def test_an_answer_in_the_wrong_format_changes_nothing(client: TestClient, tenant_key: str,
                                                        standin: Any) -> None:
    standin.state.replies = {"Changed files:": "Sure! Here is the fix: return a + b"}
    job = submit(client, tenant_key, max_rounds=1)
    assert job["status"] == "completed", job
    assert job["result"]["passed"] is False
    assert job["result"]["files"] == BUGGY
    assert job["result"]["diff"] == ""


def test_bad_coding_input_is_422(client: TestClient, tenant_key: str) -> None:
    for files in ({"/etc/passwd": "x"}, {"../up.py": "x"}, {"a//b.py": "x"}):
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "coding", "input": {"task": "t", "files": files}})
        assert resp.status_code == 422, resp.text
        assert "relative path" in resp.text
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "coding", "input": {"task": "t", "max_rounds": 99}})
    assert resp.status_code == 422


@pytest.mark.parametrize(("files", "words"), [
    ({**BUGGY, "calc.py/x.py": "x"}, "both a file and the folder"),
    ({**BUGGY, "a" * 300 + ".py": "x"}, "longer than 255 bytes"),
    ({**BUGGY, "/".join(["d"] * 600) + "/f.py": "x"}, "deeper than"),
    ({**BUGGY, ".sandbox-tmp/x.py": "x"}, "the sandbox's own directory"),
])
def test_paths_a_workspace_cannot_hold_are_422(client: TestClient, tenant_key: str,
                                               files: dict[str, str], words: str) -> None:
    """Before, these were accepted and the test step failed with an internal error (a file
    name too long, not a directory)."""
    for given in ({"files": files}, {"archive": _archive(files, "tar.gz")}):
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "coding", "input": {"task": "t", **given}})
        assert resp.status_code == 422, resp.text
        assert words in resp.text


def test_an_answer_whose_files_clash_with_the_repository_changes_nothing(
        client: TestClient, tenant_key: str, standin: Any) -> None:
    """The model answers with `calc.py/evil.py` while `calc.py` is a file: a format error of
    the round, not an internal error of the job."""
    standin.state.replies = {
        "Changed files:": FIX + "=== FILE: calc.py/evil.py ===\nx = 1\n=== END FILE ===\n"}
    job = submit(client, tenant_key, max_rounds=1)
    assert job["status"] == "completed", job
    assert job["result"]["passed"] is False
    assert job["result"]["files"] == BUGGY

def test_the_file_format_round_trips() -> None:
    assert parse_files(render_files(BUGGY)) == BUGGY
    assert parse_files("=== FILE: ../x ===\nx\n=== END FILE ===\n") is None
    assert parse_files("no files here") is None
    diff = unified_diff(BUGGY, {**BUGGY, "new.py": "x = 1\n"})
    assert "+++ b/new.py" in diff
    assert "--- /dev/null" in diff


def test_kinds_are_published_with_their_schemas(client: TestClient, tenant_key: str,
                                                standin: Any) -> None:
    from agents.coding import CodingResult

    kinds = {k["name"]: k for k in client.get("/v1/kinds", headers=auth(tenant_key))
             .json()["data"]}
    assert {"research", "coding", "completion", "batch"} <= set(kinds)
    assert kinds["coding"]["roles"] == ["coder", "coder-agent", "planner", "tester"]
    assert "test_command" in kinds["coding"]["input_schema"]["properties"]
    assert "passed" in kinds["coding"]["result_schema"]["properties"]
    standin.state.replies = {"Changed files:": FIX}
    job = submit(client, tenant_key)
    CodingResult.model_validate(job["result"])  # the result has the declared shape


def _archive(files: dict[str, str], kind: str) -> str:
    import base64
    import io
    import tarfile
    import zipfile

    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for path, body in files.items():
                zf.writestr(f"repo/{path}", body)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for path, body in files.items():
                data = body.encode()
                info = tarfile.TarInfo(f"repo/{path}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_repository_can_come_as_an_archive(client: TestClient, tenant_key: str,
                                             standin: Any, kind: str) -> None:
    standin.state.replies = {"Changed files:": FIX}
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "coding", "input": {"task": "Make add() return the sum.", "coder": "fixed",
                                    "archive": _archive(BUGGY, kind)}})
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=120)
    assert job["result"]["passed"] is True
    assert set(job["result"]["files"]) == set(BUGGY)


def test_bad_archives_are_422(client: TestClient, tenant_key: str) -> None:
    import base64
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../escape.py", "x = 1\n")
    for archive, words in ((base64.b64encode(buf.getvalue()).decode(), "relative path"),
                           ("%%%not base64", "base64"),
                           (base64.b64encode(b"just bytes").decode(), "neither")):
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "coding", "input": {"task": "t", "archive": archive}})
        assert resp.status_code == 422, resp.text
        assert words in resp.text


def test_cancel_ends_a_test_step_whose_command_escaped(client: TestClient, tenant_key: str,
                                                      standin: Any) -> None:
    """The test command starts a writer in a session of its own and sleeps; cancelling the
    job ends the step at once (not at the wall clock), and no process of it is left."""
    import secrets

    from tests.helpers import wait_until
    from tests.test_sandbox import processes_with

    marker = f"escape-{secrets.token_hex(6)}"
    standin.state.replies = {"Changed files:": FIX}
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "coding", "input": {
            "task": "Make add() return the sum.", "files": BUGGY, "max_rounds": 1,
            "coder": "fixed",
            "test_command": f"setsid sh -c 'while :; do echo x; done # {marker}' & "
                            f"sleep 600 # {marker}"}})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    wait_until(lambda: len(processes_with(marker)) >= 2, 120, what="the test command")
    cancel = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tenant_key))
    assert cancel.status_code == 202, cancel.text
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "cancelled", job
    steps = client.get(f"/v1/jobs/{job_id}/steps", headers=auth(tenant_key)).json()["data"]
    assert {s["key"]: s["status"] for s in steps}["test-1"] == "cancelled"
    assert processes_with(marker) == []  # the step ended after its whole tree did
