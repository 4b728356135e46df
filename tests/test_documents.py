"""Documents that would cost hours to parse are stopped at the parsing limits, in a child
process, while the API goes on answering; odd charsets are refused, never a 500.

The hostile documents are built here: a 13 KB PDF whose pages all draw one 5 MB content stream
(about 13 s of pypdf per page on a small machine) and 10 MB of `<p>a` HTML (some 3 GB to
parse with Beautiful Soup). They are uploaded to a real uvicorn server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import ROOT, auth, wait_until
from tests.test_corpora import create_corpus, upload_raw


def shared_stream_pdf(pages: int, stream_bytes: int) -> bytes:
    """A small PDF whose pages all draw the same content stream: `stream_bytes` of text
    operators, deflated to a few kilobytes."""
    ops = b"BT /F1 1 Tf (a) Tj ET\n"
    content = zlib.compress(ops * (stream_bytes // len(ops)), 9)
    font = b"<< /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
    kids = " ".join(f"{4 + i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
               b"<< /Length " + str(len(content)).encode() + b" /Filter /FlateDecode >>\n"
               b"stream\n" + content + b"\nendstream"]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
                b"/Resources " + font + b" >>"] * pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n"
            "%%EOF\n").encode()
    return bytes(out)


# --- The process tree --------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, state, command line)."""
    out: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), fields[0], command)
    return out


def _descendants(root: int) -> dict[int, tuple[int, str, str]]:
    every = _processes()
    found: dict[int, tuple[int, str, str]] = {}
    parents = {root}
    while parents:
        children = {pid: p for pid, p in every.items() if p[0] in parents and pid not in found}
        found.update(children)
        parents = set(children)
    return found


def parsers() -> list[int]:
    """The parse children alive now: the children of this process's forkserver."""
    mine = _descendants(os.getpid())
    servers = {pid for pid, p in mine.items() if "multiprocessing.forkserver" in p[2]}
    return [pid for pid, p in mine.items() if p[0] in servers]


def zombies() -> list[int]:
    return [pid for pid, p in _descendants(os.getpid()).items() if p[1] == "Z"]


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


# --- Fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def parse_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Lets a test set AGENTQ_CORPUS_PARSE_* settings; they are read again after it."""
    from core.settings import get_settings

    get_settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


def _set(limits: pytest.MonkeyPatch, **settings: str) -> None:
    from core.settings import get_settings

    for name, value in settings.items():
        limits.setenv(f"AGENTQ_CORPUS_PARSE_{name.upper()}", value)
    get_settings.cache_clear()


@pytest.fixture
def http(api_server: str, tenant_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server, headers=auth(tenant_key), timeout=300) as client:
        yield client


def _new_corpus(http: httpx.Client) -> str:
    resp = http.post("/v1/corpora", json={"name": "Hostile"})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


# --- Tests -------------------------------------------------------------------------------------

def test_pdfs_that_cost_minutes_stop_at_the_time_limit_while_the_api_answers(
        http: httpx.Client, parse_limits: pytest.MonkeyPatch) -> None:
    timeout_s = 2.0
    _set(parse_limits, timeout_s=str(timeout_s), concurrency="2")
    cid = _new_corpus(http)
    # An ordinary document is parsed as before (and starts the parsers' server).
    ok = http.post(f"/v1/corpora/{cid}/documents", content=b"Bees dance to tell where "
                   b"flowers are.", headers={"Content-Type": "text/plain"})
    assert ok.status_code == 201, ok.text

    pdf = shared_stream_pdf(pages=8, stream_bytes=5_000_000)
    assert len(pdf) < 20_000
    answers: list[tuple[httpx.Response, float]] = []

    def upload(i: int) -> None:
        started = time.monotonic()
        resp = http.post(f"/v1/corpora/{cid}/documents", params={"filename": f"h{i}.pdf"},
                         content=pdf, headers={"Content-Type": "application/pdf"})
        answers.append((resp, time.monotonic() - started))

    uploads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    started = time.monotonic()
    for t in uploads:
        t.start()
    latencies: list[float] = []
    most_parsers = 0
    while any(t.is_alive() for t in uploads):
        asked = time.monotonic()
        assert http.get("/healthz").status_code == 200
        assert http.get(f"/v1/corpora/{cid}").status_code == 200  # the database, too
        latencies.append(time.monotonic() - asked)
        most_parsers = max(most_parsers, len(parsers()))
        uploads[-1].join(0.1)
    for t in uploads:
        t.join()
    elapsed = time.monotonic() - started

    for resp, _ in answers:
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "parse_time_limit"
        assert "longer than 2 s to parse" in error["message"]
    # Two parse at once; the third waits for a slot, so the three take two time limits.
    assert 1 <= most_parsers <= 2
    assert elapsed >= 2 * timeout_s
    assert min(seconds for _, seconds in answers) < timeout_s + 5
    assert elapsed < 2 * timeout_s + 10
    # The API answered all along, promptly.
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, latencies
    # Every child was killed and reaped.
    assert parsers() == []
    assert zombies() == []
    detail = http.get(f"/v1/corpora/{cid}").json()
    assert detail["document_count"] == 1


def test_html_that_needs_gigabytes_stops_at_the_memory_limit(
        http: httpx.Client, parse_limits: pytest.MonkeyPatch) -> None:
    _set(parse_limits, max_memory_mb="200", timeout_s="120")
    cid = _new_corpus(http)
    html = b"<p>a" * 2_500_000  # 10 MB: about 3 GB to parse unbounded
    before = peak_rss_kib()
    started = time.monotonic()
    resp = http.post(f"/v1/corpora/{cid}/documents", content=html,
                     headers={"Content-Type": "text/html"})
    elapsed = time.monotonic() - started
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["code"] == "parse_memory_limit"
    assert "more than 200 MiB of memory" in error["message"]
    assert elapsed < 60
    # The parse ran elsewhere: this process (the API's) did not grow by gigabytes.
    grew = peak_rss_kib() - before
    assert grew < 256 * 1024, f"the API's peak memory grew by {grew} KiB"
    assert parsers() == []
    assert zombies() == []
    # Within the limits, the same kind of document is taken.
    small = http.post(f"/v1/corpora/{cid}/documents", content=b"<p>a" * 2000 + b"<p>Bees.",
                      headers={"Content-Type": "text/html"})
    assert small.status_code == 201, small.text


_ORPHANED = """
import sys
from agents.parsing import ParseLimits, prepare_document_bounded
pdf = open(sys.argv[1], "rb").read()
prepare_document_bounded(pdf, declared_type="application/pdf",
                         limits=ParseLimits(timeout_s=3, max_memory_bytes=1 << 30))
"""


def _gone(pid: int) -> bool:
    state = _processes().get(pid)
    return state is None or state[1] in ("Z", "X")


def test_a_parse_does_not_outlive_its_api_process_by_much(tmp_path: Path) -> None:
    """An API process killed mid-parse cannot kill its child at the time limit; the child's
    own CPU limit (the time limit and a few seconds) ends it all the same."""
    path = tmp_path / "hostile.pdf"
    path.write_bytes(shared_stream_pdf(pages=40, stream_bytes=5_000_000))  # minutes
    api = subprocess.Popen([sys.executable, "-c", _ORPHANED, str(path)], cwd=ROOT)
    try:
        def parse_child() -> int | None:
            mine = _descendants(api.pid)
            servers = {pid for pid, p in mine.items() if "multiprocessing.forkserver" in p[2]}
            found = [pid for pid, p in mine.items() if p[0] in servers]
            return found[0] if found else None

        child = wait_until(parse_child, 60, what="the parse to start")
        api.kill()
        api.wait()
        assert not _gone(child)
        wait_until(lambda: _gone(child), 45, what="the orphaned parse to end")
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()


@pytest.mark.parametrize("charset", ["rot13", "zlib", "hex", "base64", "uu", "undefined",
                                     "bz2_codec"])
def test_charsets_that_are_not_text_encodings_are_422(client: TestClient, tenant_key: str,
                                                      charset: str) -> None:
    cid = create_corpus(client, tenant_key)
    resp = upload_raw(client, tenant_key, cid, b"Uryyb jbeyq, naq fbzr zber jbeqf.",
                      f"text/plain; charset={charset}")
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert "not a text encoding" in message or "not valid" in message


def test_odd_but_real_charsets_are_decoded(client: TestClient, tenant_key: str) -> None:
    cid = create_corpus(client, tenant_key)
    resp = upload_raw(client, tenant_key, cid, "Crème brûlée, a custard.".encode("utf-7"),
                      "text/plain; charset=utf-7")
    assert resp.status_code == 201, resp.text
    # HTML with a charset that is no text encoding: its own bytes decide.
    resp = upload_raw(client, tenant_key, cid, b"<p>Plain words on a page.</p>",
                      "text/html; charset=rot13")
    assert resp.status_code == 201, resp.text
    hits = client.get(f"/v1/corpora/{cid}/search", params={"q": "custard"},
                      headers=auth(tenant_key)).json()["data"]
    assert hits
    assert "Crème brûlée" in hits[0]["text"]


def test_the_parse_limits_are_settings(parse_limits: pytest.MonkeyPatch) -> None:
    from agents.parsing import ParseLimits

    assert ParseLimits.from_settings() == ParseLimits(timeout_s=60.0,
                                                      max_memory_bytes=1024 * 1024 * 1024)
    _set(parse_limits, timeout_s="7.5", max_memory_mb="300")
    assert ParseLimits.from_settings() == ParseLimits(timeout_s=7.5,
                                                      max_memory_bytes=300 * 1024 * 1024)
