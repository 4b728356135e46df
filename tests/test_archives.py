"""A coding job's repository archive: bombs are refused within a second and in little memory,
and no corrupt, truncated, lying or unsafe archive gets anything but a 422.

The bombs are built here, for real: a bzip2 zip member and a tar.bz2 member of 1 GiB of zeros
(about a kilobyte each), zips and tars of thousands of members, a tar.gz of high ratio. Time
and memory are measured in a fresh process (its peak RSS before and after), and once more in a
real API process that is sent the bomb as a coding job.
"""

from __future__ import annotations

import base64
import bz2
import io
import json
import lzma
import random
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from agents.archives import ArchiveError, ArchiveLimits, read_archive, unpack_archive
from tests.helpers import ROOT, Proc, auth

GIB = 1 << 30
LIMITS = ArchiveLimits(max_bytes=4 * 1024 * 1024, max_members=1000, max_ratio=100.0,
                       max_file_bytes=200_000)


# --- Building archives by hand -------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """A zip member written as given: its compressed bytes and what it declares."""

    name: str
    data: bytes
    method: int = zipfile.ZIP_STORED
    crc: int | None = None  # default: the CRC of `data` (right for a stored member)
    size: int | None = None  # default: len(data)
    mode: int = 0o100644
    flags: int = 0


def raw_zip(members: list[Member]) -> bytes:
    """A zip archive whose headers say exactly what the members declare (zipfile cannot
    write a member compressed beforehand, or one that lies)."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.size is None else m.size
        offset = len(out)
        out += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, m.flags, m.method, 0, 0x21,
                           crc, len(m.data), size, len(name), 0) + name + m.data
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, m.flags,
                               m.method, 0, 0x21, crc, len(m.data), size, len(name), 0, 0, 0,
                               0, m.mode << 16, offset) + name
    n = len(members)
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central),
                                 len(out), 0)
    return bytes(out)


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for path, body in files.items():
            zf.writestr(path, body)
    return buf.getvalue()


def tar_member(name: str, body: bytes = b"", kind: bytes = tarfile.REGTYPE,
               linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(body)
    return info, body


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for info, body in members:
            tf.addfile(info, io.BytesIO(body) if body else None)
    return buf.getvalue()


def tar_files(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    return make_tar([tar_member(p, b) for p, b in files.items()], mode)


@dataclass(frozen=True)
class Zeros:
    """1 GiB of zeros as one bzip2 stream, and its CRC."""

    bz2: bytes
    crc: int


@pytest.fixture(scope="module")
def gib_of_zeros() -> Zeros:
    compressor = bz2.BZ2Compressor(9)
    chunk = bytes(1 << 20)
    pieces, crc = [], 0
    for _ in range(GIB // len(chunk)):
        pieces.append(compressor.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    pieces.append(compressor.flush())
    return Zeros(b"".join(pieces), crc)


def zip_bzip2_bomb(zeros: Zeros, declared: int | None = None) -> bytes:
    return raw_zip([Member("repo/bomb.txt", zeros.bz2, zipfile.ZIP_BZIP2, zeros.crc,
                           GIB if declared is None else declared)])


def tar_bz2_bomb(zeros: Zeros) -> bytes:
    """A tar.bz2 whose one member is 1 GiB of zeros: three bzip2 streams in a row (the header,
    the zeros, the end blocks), as bzip2 allows."""
    header = tarfile.TarInfo("repo/bomb.txt")
    header.size = GIB
    return (bz2.compress(header.tobuf(format=tarfile.GNU_FORMAT)) + zeros.bz2
            + bz2.compress(bytes(2 * tarfile.BLOCKSIZE)))


def many_members_zip(n: int) -> bytes:
    return raw_zip([Member(f"f{i}", b"") for i in range(n)])


def many_members_tar(n: int) -> bytes:
    return make_tar([tar_member(f"f{i}") for i in range(n)])


def high_ratio_tar_gz() -> bytes:
    """Members each under the cap on one file, all zeros: about 1000:1."""
    return make_tar([tar_member(f"repo/z{i}.txt", bytes(190_000)) for i in range(40)])


# --- Bombs: refused at once, in little memory --------------------------------------------------

_MEASURE = """
import base64, json, resource, sys, time
from agents.archives import ArchiveError, ArchiveLimits, unpack_archive
encoded = base64.b64encode(open(sys.argv[1], "rb").read()).decode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    unpack_archive(encoded, ArchiveLimits.from_settings(200_000))
    error = None
except ArchiveError as exc:
    error = str(exc)
seconds = time.perf_counter() - started
grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "seconds": seconds, "grew_kib": grew_kib}))
"""


def measure(data: bytes, tmp_path: Path) -> dict[str, Any]:
    """Unpack the archive in a fresh process: its error, the seconds it took and how much the
    process's peak memory grew."""
    path = tmp_path / "archive.bin"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize(("bomb", "words"), [
    ("zip_bzip2_1gib", "cap on one file"),
    ("zip_bzip2_1gib_declares_100_bytes", "more than the 100 bytes it declares"),
    ("zip_bzip2_1gib_declares_150000_bytes", "cap on the compression ratio"),
    ("tar_bz2_1gib", "cap on one file"),
    ("zip_of_20000_members", "cap on members"),
    ("tar_gz_of_5000_members", "cap on members"),
    ("tar_gz_of_high_ratio", "cap on the compression ratio"),
])
def test_bombs_are_refused_within_a_second_in_little_memory(
        bomb: str, words: str, gib_of_zeros: Zeros, tmp_path: Path) -> None:
    data = {
        "zip_bzip2_1gib": lambda: zip_bzip2_bomb(gib_of_zeros),
        "zip_bzip2_1gib_declares_100_bytes": lambda: zip_bzip2_bomb(gib_of_zeros, 100),
        "zip_bzip2_1gib_declares_150000_bytes": lambda: zip_bzip2_bomb(gib_of_zeros, 150_000),
        "tar_bz2_1gib": lambda: tar_bz2_bomb(gib_of_zeros),
        "zip_of_20000_members": lambda: many_members_zip(20_000),
        "tar_gz_of_5000_members": lambda: many_members_tar(5000),
        "tar_gz_of_high_ratio": high_ratio_tar_gz,
    }[bomb]()
    result = measure(data, tmp_path)
    assert result["error"] is not None, result
    assert words in result["error"], result
    assert result["seconds"] < 1.0, result
    assert result["grew_kib"] < 32 * 1024, result


def test_the_bombs_are_what_they_claim(gib_of_zeros: Zeros) -> None:
    """The 1 GiB bombs are archives of about a kilobyte that the standard library opens and
    unpacks (zeros, as far as one cares to read), so the test above refuses something real."""
    assert len(zip_bzip2_bomb(gib_of_zeros)) < 2000
    assert len(tar_bz2_bomb(gib_of_zeros)) < 2000
    with zipfile.ZipFile(io.BytesIO(zip_bzip2_bomb(gib_of_zeros))) as zf:
        info = zf.getinfo("repo/bomb.txt")
        assert (info.file_size, info.compress_type) == (GIB, zipfile.ZIP_BZIP2)
        # (zipfile itself would unpack the whole member at once: the bug refused here.)
        assert bz2.BZ2Decompressor().decompress(gib_of_zeros.bz2, 1 << 24) == bytes(1 << 24)
    with tarfile.open(fileobj=io.BytesIO(tar_bz2_bomb(gib_of_zeros)), mode="r:bz2") as tf:
        member = tf.next()
        assert member is not None
        assert member.size == GIB
        handle = tf.extractfile(member)
        assert handle is not None
        assert handle.read(1 << 24) == bytes(1 << 24)


def test_each_cap_is_named_when_it_is_hit() -> None:
    noise = random.Random(7).randbytes
    small = ArchiveLimits(max_bytes=300_000, max_members=5, max_ratio=10.0,
                          max_file_bytes=200_000)
    cases = [
        (make_zip({f"f{i}": noise(150_000) for i in range(3)}), "cap on bytes unpacked"),
        (tar_files({f"f{i}": noise(150_000) for i in range(3)}), "cap on bytes unpacked"),
        (make_zip({f"f{i}": b"" for i in range(6)}), "cap on members"),
        (tar_files({f"f{i}": b"" for i in range(6)}), "cap on members"),
        (make_zip({"f": bytes(100_000)}), "cap on the compression ratio"),
        (tar_files({"f": bytes(100_000)}), "cap on the compression ratio"),
        (make_zip({"f": noise(200_001)}), "cap on one file"),
        (tar_files({"f": noise(200_001)}), "cap on one file"),
    ]
    for data, words in cases:
        with pytest.raises(ArchiveError, match=words):
            read_archive(data, small)
    # Within every cap, the same kinds of archive are read.
    assert len(read_archive(make_zip({f"f{i}": noise(90_000) for i in range(3)}), small)) == 3
    assert len(read_archive(tar_files({"f": bytes(60_000)}), small)) == 1


# --- Corrupt, lying and unsafe archives --------------------------------------------------------

GOOD = {"repo/calc.py": b"def add(a, b):\n    return a + b\n",
        "repo/tests/test_calc.py": b"from calc import add\n\n\ndef test_add():\n"
                                   b"    assert add(2, 3) == 5\n"}


HEX = random.Random(3).randbytes(300).hex().encode()  # text that compresses little


def _corrupt_crc() -> bytes:
    data = bytearray(make_zip({"a.py": b"x = 1\n" * 50}, zipfile.ZIP_STORED))
    data[data.index(b"x = 1")] ^= 0x01
    return bytes(data)


def _deflated(body: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()


UNSAFE: list[tuple[str, bytes, str]] = [
    ("zip with a bad CRC", _corrupt_crc(), "CRC"),
    ("zip member declaring more than it holds",
     raw_zip([Member("a.py", _deflated(b"x = 1\n"), zipfile.ZIP_DEFLATED,
                     zlib.crc32(b"x = 1\n"), 100)]), "not the 100 it declares"),
    ("zip member declaring less than it holds",
     raw_zip([Member("a.py", _deflated(b"x = 1\n" * 100), zipfile.ZIP_DEFLATED, 0, 6)]),
     "more than the 6 bytes it declares"),
    ("zip member cut short",
     raw_zip([Member("a.py", _deflated(HEX)[:20], zipfile.ZIP_DEFLATED, zlib.crc32(HEX),
                     len(HEX))]), "cut short"),
    ("truncated zip", make_zip(GOOD)[:-30], "archive"),
    ("zip whose member lies past its end", make_zip(GOOD)[40:], "archive"),
    ("truncated tar.gz", tar_files({"a.py": random.Random(1).randbytes(50_000)})[:20_000],
     "cut short"),
    ("truncated tar.bz2", tar_files(GOOD, "w:bz2")[:-40], "archive"),
    ("tar.gz of garbage", b"\x1f\x8b" + random.Random(2).randbytes(500), "archive"),
    ("zip path climbing out", make_zip({"../escape.py": b"x"}), "relative path"),
    ("tar path climbing out", tar_files({"repo/../../escape.py": b"x"}), "relative path"),
    ("zip absolute path", make_zip({"/etc/cron.d/x": b"x"}), "relative path"),
    ("tar absolute path", tar_files({"/etc/cron.d/x": b"x"}), "relative path"),
    ("tar symlink out", make_tar([tar_member("repo/passwd", kind=tarfile.SYMTYPE,
                                             linkname="/etc/passwd")]), "outside"),
    ("tar symlink climbing out", make_tar([tar_member("repo/up", kind=tarfile.SYMTYPE,
                                                      linkname="../../x")]), "outside"),
    ("tar hardlink out", make_tar([tar_member("repo/passwd", kind=tarfile.LNKTYPE,
                                              linkname="/etc/passwd")]), "outside"),
    ("tar hardlink climbing out", make_tar([tar_member("repo/up", kind=tarfile.LNKTYPE,
                                                       linkname="../x")]), "outside"),
    ("zip symlink out", raw_zip([Member("repo/passwd", b"/etc/passwd", mode=0o120777)]),
     "outside"),
    ("tar device file", make_tar([tar_member("repo/null", kind=tarfile.CHRTYPE)]),
     "not a regular file"),
    ("tar fifo", make_tar([tar_member("repo/pipe", kind=tarfile.FIFOTYPE)]),
     "not a regular file"),
    ("zip device file", raw_zip([Member("repo/null", b"", mode=0o020666)]),
     "not a regular file"),
    ("zip with a name twice", raw_zip([Member("a.py", b"1"), Member("a.py", b"2")]), "twice"),
    ("zip with a name twice, spelled apart",
     raw_zip([Member("a.py", b"1"), Member("./a.py", b"2")]), "twice"),
    ("tar with a name twice", tar_files({"a.py": b"1", "./a.py": b"2"}), "twice"),
    ("encrypted zip member", raw_zip([Member("a.py", b"x", flags=0x1)]), "encrypted"),
    ("zip member of an unknown method", raw_zip([Member("a.py", b"x", method=14)]),
     "compression method"),
]


@pytest.mark.parametrize(("data", "words"), [(d, w) for _, d, w in UNSAFE],
                         ids=[name for name, _, _ in UNSAFE])
def test_corrupt_lying_and_unsafe_archives_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(ArchiveError, match=words):
        read_archive(data, LIMITS)


def test_links_inside_and_folders_are_left_out() -> None:
    data = make_tar([tar_member("repo", kind=tarfile.DIRTYPE),
                     tar_member("repo/calc.py", GOOD["repo/calc.py"]),
                     tar_member("repo/alias.py", kind=tarfile.SYMTYPE, linkname="calc.py"),
                     tar_member("repo/hard.py", kind=tarfile.LNKTYPE,
                                linkname="repo/calc.py")])
    assert unpack_archive(base64.b64encode(data).decode(), LIMITS) == {
        "calc.py": GOOD["repo/calc.py"].decode()}
    data = raw_zip([Member("repo/", b"", mode=0o040755),
                    Member("repo/calc.py", GOOD["repo/calc.py"]),
                    Member("repo/alias.py", b"calc.py", mode=0o120777)])
    assert unpack_archive(base64.b64encode(data).decode(), LIMITS) == {
        "calc.py": GOOD["repo/calc.py"].decode()}


@pytest.mark.parametrize("kind", ["zip-deflate", "zip-bzip2", "zip-stored", "tar", "tar.gz",
                                  "tar.bz2", "tar.xz"])
def test_every_kind_of_archive_is_read(kind: str) -> None:
    files = {**GOOD, "repo/logo.png": b"\x89PNG\r\n\x1a\n\x00\xff"}
    data = {"zip-deflate": lambda: make_zip(files),
            "zip-bzip2": lambda: make_zip(files, zipfile.ZIP_BZIP2),
            "zip-stored": lambda: make_zip(files, zipfile.ZIP_STORED),
            "tar": lambda: tar_files(files, "w"),
            "tar.gz": lambda: tar_files(files, "w:gz"),
            "tar.bz2": lambda: tar_files(files, "w:bz2"),
            "tar.xz": lambda: tar_files(files, "w:xz")}[kind]()
    # The one top folder is dropped; the binary file is left out.
    assert unpack_archive(base64.b64encode(data).decode(), LIMITS) == {
        "calc.py": GOOD["repo/calc.py"].decode(),
        "tests/test_calc.py": GOOD["repo/tests/test_calc.py"].decode()}


def _mutations(data: bytes, rng: random.Random, n: int) -> Iterator[bytes]:
    for _ in range(n):
        choice = rng.randrange(3)
        if choice == 0:
            yield data[:rng.randrange(len(data))]
        else:
            out = bytearray(data)
            at = rng.randrange(len(out))
            width = 1 if choice == 1 else 4
            out[at:at + width] = (bytes([rng.randrange(256)]) if width == 1
                                  else rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                   b"\xff\xff\xff\x7f"]))
            yield bytes(out)


def test_damaged_archives_are_refused_with_archive_errors_only() -> None:
    """Thousands of truncated and corrupted archives of every kind: each is read or refused
    with an `ArchiveError` (a 422), never another exception (a 500)."""
    rng = random.Random(20240611)
    bases = [make_zip(GOOD), make_zip(GOOD, zipfile.ZIP_BZIP2),
             make_zip(GOOD, zipfile.ZIP_STORED), tar_files(GOOD, "w"), tar_files(GOOD),
             tar_files(GOOD, "w:bz2"), tar_files(GOOD, "w:xz"),
             lzma.compress(tar_files(GOOD, "w"), format=lzma.FORMAT_ALONE)]
    refused = 0
    for base in bases:
        for data in _mutations(base, rng, 400):
            try:
                read_archive(data, LIMITS)
            except ArchiveError:
                refused += 1
    assert refused > 1000


# --- Through the API ---------------------------------------------------------------------------

def post_archive(client: TestClient, key: str, data: bytes) -> Any:
    return client.post("/v1/jobs", headers=auth(key), json={
        "kind": "coding", "input": {"task": "t", "archive": base64.b64encode(data).decode()}})


@pytest.mark.parametrize(("data", "words"), [
    (d, w) for name, d, w in UNSAFE
    if name in {"zip with a bad CRC", "zip member declaring less than it holds",
                "truncated tar.gz", "tar device file", "tar symlink out",
                "zip with a name twice", "zip member of an unknown method"}])
def test_the_api_answers_422_for_damaged_archives(client: TestClient, tenant_key: str,
                                                 data: bytes, words: str) -> None:
    resp = post_archive(client, tenant_key, data)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "invalid_input"
    assert words in resp.json()["error"]["message"]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_a_bomb_sent_to_the_api_is_422_at_once_and_the_api_stays_small(
        agentq_env: dict[str, str], tenant_key: str, gib_of_zeros: Zeros,
        tmp_path: Path) -> None:
    from bench.standin import free_port

    port = free_port()
    api = Proc([sys.executable, "-m", "uvicorn", "api.app:app", "--port", str(port)],
               agentq_env, tmp_path / "api.log")
    try:
        api.wait_for_output("Application startup complete", 60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth(tenant_key),
                          timeout=60) as http:

            def post(data: bytes) -> httpx.Response:
                return http.post("/v1/jobs", json={"kind": "coding", "input": {
                    "task": "t", "archive": base64.b64encode(data).decode()}})

            # A first refusal warms the path up (imports, pydantic, the database pool).
            assert post(b"not an archive").status_code == 422
            before = _peak_rss_kib(api.popen.pid)
            for bomb, words in ((zip_bzip2_bomb(gib_of_zeros, 150_000), "compression ratio"),
                                (zip_bzip2_bomb(gib_of_zeros, 100), "declares"),
                                (tar_bz2_bomb(gib_of_zeros), "cap on one file")):
                started = time.monotonic()
                resp = post(bomb)
                elapsed = time.monotonic() - started
                assert resp.status_code == 422, resp.text
                assert words in resp.json()["error"]["message"]
                assert elapsed < 1.0, elapsed
            grew = _peak_rss_kib(api.popen.pid) - before
            assert grew < 32 * 1024, f"the API's peak memory grew by {grew} KiB"
            assert http.get("/healthz").status_code == 200
    finally:
        api.stop()
