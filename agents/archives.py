"""A coding job's repository sent as an archive (.zip, .tar, .tar.gz, .tar.bz2, .tar.xz): its
files, read in memory under hard caps.

Nothing an archive declares is trusted. Every member is decompressed as a stream, a piece at a
time, and reading stops as soon as a cap is passed: bytes unpacked (with room for a tar's
headers), members, unpacked bytes per byte of the archive (the compression ratio) and the size
of one file. A zip member's declared size and CRC are checked against what comes out of it.
Nothing is written to disk and only regular files are kept: folders and links inside the
repository are left out; absolute or climbing paths, links that point outside, device files,
encrypted members and names that appear twice refuse the archive. A corrupt, truncated or
lying archive is refused with `ArchiveError` (a `ValueError`, so input validation reports it
as a 422), never with another exception.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import gzip
import io
import lzma
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from core.settings import get_settings

PIECE = 64 * 1024  # the most bytes decompressed in one go
RATIO_GRACE = 64 * 1024  # the compression ratio is held to once this much has come out
_TAR_MEMBER_OVERHEAD = 1024  # a tar member's header and padding, at most (long names aside)
_TAR_END = 20 * 1024  # a tar's end-of-archive blocks and record padding

_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local header
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


class ArchiveError(ValueError):
    """The archive is refused: corrupt, unsafe, or past a cap (the message says which)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"archive: {message}")


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # bytes unpacked, all members together
    max_members: int  # entries of any kind (files, folders, links)
    max_ratio: float  # bytes unpacked per byte of the archive
    max_file_bytes: int  # one file

    @classmethod
    def from_settings(cls, max_file_bytes: int) -> ArchiveLimits:
        s = get_settings()
        return cls(max_bytes=s.archive_max_bytes, max_members=s.archive_max_members,
                   max_ratio=s.archive_max_ratio, max_file_bytes=max_file_bytes)


class _Budget:
    """What has come out of an archive so far, held to its limits."""

    def __init__(self, limits: ArchiveLimits, packed: int, allowance: int = 0) -> None:
        self.limits = limits
        self.packed = max(packed, 1)
        self.allowance = allowance  # bytes past max_bytes that are not the members' own
        self.unpacked = 0
        self.members = 0

    def take(self, n: int) -> None:
        self.unpacked += n
        if self.unpacked > self.limits.max_bytes + self.allowance:
            raise ArchiveError(f"unpacks to more than {self.limits.max_bytes} bytes (the cap "
                               "on bytes unpacked)")
        if self.unpacked > RATIO_GRACE and self.unpacked > self.limits.max_ratio * self.packed:
            raise ArchiveError(f"unpacks to more than {self.limits.max_ratio:g} times its own "
                               f"size of {self.packed} bytes (the cap on the compression "
                               "ratio)")

    def member(self, count: int = 1) -> None:
        self.members += count
        if self.members > self.limits.max_members:
            raise ArchiveError(f"has more than {self.limits.max_members} members (the cap on "
                               "members)")

    def file_size(self, name: str, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise ArchiveError(f"{name} is larger than {self.limits.max_file_bytes} bytes (the "
                               "cap on one file)")


def member_path(name: str) -> str:
    """A member's name as a path relative to the repository's root ("" for the root itself);
    absolute and climbing paths are refused."""
    if "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ArchiveError(f"{name[:200]!r} is not a relative path inside the repository")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ArchiveError(f"{name[:200]!r} is not a valid UTF-8 path") from None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise ArchiveError(f"{name[:200]!r} is not a relative path inside the repository")
    return "/".join(parts)


def _check_link(name: str, target: str, *, relative_to_member: bool) -> None:
    """A link is left out, but one that points outside the repository refuses the archive."""
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise ArchiveError(f"{name[:200]} is a link to {target[:200]!r}, outside the "
                           "repository")


# --- zip ---------------------------------------------------------------------------------------

def _zip_raw(data: bytes, info: zipfile.ZipInfo) -> bytes:
    """A member's compressed bytes, found through its local header."""
    start = info.header_offset
    header = data[start:start + _ZIP_LOCAL_HEADER.size] if start >= 0 else b""
    if len(header) < _ZIP_LOCAL_HEADER.size:
        raise ArchiveError(f"{info.filename[:200]} lies outside the archive")
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    if fields[0] != _ZIP_LOCAL_MAGIC:
        raise ArchiveError(f"{info.filename[:200]} has no valid local header")
    begin = start + _ZIP_LOCAL_HEADER.size + fields[10] + fields[11]
    raw = data[begin:begin + info.compress_size]
    if len(raw) < info.compress_size:
        raise ArchiveError(f"{info.filename[:200]} is cut short")
    return raw


def _inflate(raw: bytes, method: int) -> Iterator[bytes]:
    """A zip member's bytes, decompressed at most PIECE bytes at a time."""
    if method == zipfile.ZIP_STORED:
        for i in range(0, len(raw), PIECE):
            yield raw[i:i + PIECE]
        return
    if method == zipfile.ZIP_DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        pending = raw
        while not inflater.eof:
            piece = inflater.decompress(pending, PIECE)
            pending = inflater.unconsumed_tail
            if not piece and not pending:
                raise EOFError("the compressed data ends early")
            yield piece
        return
    if method == zipfile.ZIP_BZIP2:
        bunzip = bz2.BZ2Decompressor()
        piece = bunzip.decompress(raw, PIECE)
        yield piece
        while not bunzip.eof:
            if bunzip.needs_input:
                raise EOFError("the compressed data ends early")
            yield bunzip.decompress(b"", PIECE)
        return
    raise AssertionError(f"compression method {method} is not read")


_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2)


def _read_zip_member(data: bytes, info: zipfile.ZipInfo, budget: _Budget) -> bytes:
    name = info.filename[:200]
    if info.compress_type not in _METHODS:
        raise ArchiveError(f"{name} uses compression method {info.compress_type}; only "
                           "stored, deflate and bzip2 members are read")
    budget.file_size(name, info.file_size)
    cap = info.file_size
    out = bytearray()
    crc = 0
    for piece in _inflate(_zip_raw(data, info), info.compress_type):
        budget.take(len(piece))
        out += piece
        crc = zlib.crc32(piece, crc)
        if len(out) > cap:
            raise ArchiveError(f"{name} holds more than the {cap} bytes it declares")
    if len(out) != cap:
        raise ArchiveError(f"{name} holds {len(out)} bytes, not the {cap} it declares")
    if crc != info.CRC:
        raise ArchiveError(f"{name} is corrupt (its CRC does not match)")
    return bytes(out)


def _zip_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    budget.member(len(infos))  # the central directory says how many, before anything is read
    for info in infos:
        mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{info.filename[:200]} is encrypted")
        kind = stat.S_IFMT(mode)  # 0 where the archive does not say
        if info.is_dir() or kind == stat.S_IFDIR:
            continue
        if kind == stat.S_IFLNK:
            target = _read_zip_member(data, info, budget)
            _check_link(info.filename, target.decode("utf-8", "replace"),
                        relative_to_member=True)
            continue
        if kind not in (0, stat.S_IFREG):
            raise ArchiveError(f"{info.filename[:200]} is not a regular file")
        yield info.filename, _read_zip_member(data, info, budget)


# --- tar ---------------------------------------------------------------------------------------

class _Unpacked(io.RawIOBase):
    """A decompressed stream, counted against the budget as tarfile reads it, a piece at a
    time (so that no header can make it read a declared size at once)."""

    def __init__(self, source: io.BufferedIOBase, budget: _Budget) -> None:
        super().__init__()
        self._source = source
        self._budget = budget

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = PIECE if size < 0 else min(size, PIECE)
        piece = self._source.read(want)
        self._budget.take(len(piece))
        return piece


def _decompressed(data: bytes) -> io.BufferedIOBase:
    """The tar stream inside a gzip, bzip2 or xz file (or the data itself)."""
    raw = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if data[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def _tar_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, bytes]]:
    # The whole decompressed stream is counted; its headers and padding are allowed for.
    budget.allowance = _TAR_MEMBER_OVERHEAD * budget.limits.max_members + _TAR_END
    stream = _Unpacked(_decompressed(data), budget)
    # Stream mode ("r|"): members are read in order and never all at once.
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:
            budget.member()
            name = member.name
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                _check_link(name, member.linkname, relative_to_member=member.issym())
                continue
            if not member.isreg() or member.issparse():
                raise ArchiveError(f"{name[:200]} is not a regular file")
            budget.file_size(name[:200], member.size)
            handle = tf.extractfile(member)
            content = handle.read(member.size) if handle is not None else b""
            if len(content) != member.size:
                raise ArchiveError(f"{name[:200]} is cut short")
            yield name, content


# --- the archive -------------------------------------------------------------------------------

def _is_tar(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00" or (
        data[257:262] == b"ustar")


def read_archive(data: bytes, limits: ArchiveLimits) -> dict[str, bytes]:
    """The regular files of a zip or tar archive by their paths (checked, normalized), read
    under `limits`; `ArchiveError` for anything else."""
    budget = _Budget(limits, len(data))
    tar = _is_tar(data)
    guess = not tar and not zipfile.is_zipfile(io.BytesIO(data))  # perhaps an old-style tar
    if tar or guess:
        kind, members = "tar", _tar_members(data, budget)
    else:
        kind, members = "zip", _zip_members(data, budget)
    out: dict[str, bytes] = {}
    try:
        for name, content in members:
            path = member_path(name)
            if not path:
                raise ArchiveError(f"{name[:200]!r} is not a file name")
            if path in out:
                raise ArchiveError(f"{path[:200]} appears twice")
            out[path] = content
    except ArchiveError:
        raise
    except tarfile.ReadError as exc:
        if guess and budget.members == 0:
            raise ArchiveError("neither a .zip nor a .tar(.gz, .bz2, .xz) archive") from None
        raise ArchiveError(f"not a readable tar archive ({_detail(exc)})") from None
    except EOFError:
        raise ArchiveError("it is cut short") from None
    except Exception as exc:  # zipfile, tarfile and the decompressors raise many kinds
        raise ArchiveError(f"not a readable {kind} archive ({_detail(exc)})") from None
    return out


def _detail(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def unpack_archive(encoded: str, limits: ArchiveLimits) -> dict[str, str]:
    """The text files of a base64-encoded archive (binary files are left out). A single top
    folder that holds everything is dropped from the paths."""
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ArchiveError("not valid base64") from exc
    files = read_archive(data, limits)
    tops = {path.split("/", 1)[0] for path in files}
    strip = len(tops) == 1 and all("/" in path for path in files)
    out: dict[str, str] = {}
    for path, content in files.items():
        try:
            out[path.split("/", 1)[1] if strip else path] = content.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary files stay out of a text repository
    if not out:
        raise ArchiveError("no text file in it")
    return out
