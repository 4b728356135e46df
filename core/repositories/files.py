"""Files of the OpenAI-compatible Files API: every query on the `files` table.

OpenAI paginates lists with `after`, the id of the last object seen; the position of that
object (its creation time and id) is read back to continue the listing.
"""

from __future__ import annotations

import re

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import StoredFile, utcnow

_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def new_file_id() -> str:
    return new_id("file").replace("_", "-", 1)


def add(session: Session, *, tenant_id: str, purpose: str, filename: str, content: bytes,
        job_id: str | None = None, part: str | None = None) -> StoredFile:
    row = StoredFile(id=new_file_id(), tenant_id=tenant_id, purpose=purpose,
                     filename=filename[:300], size_bytes=len(content), content=content,
                     job_id=job_id, part=part, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def get(session: Session, tenant_id: str, file_id: str) -> StoredFile | None:
    if not _ID.fullmatch(file_id):
        return None
    row = session.get(StoredFile, file_id)
    return row if row is not None and row.tenant_id == tenant_id else None


def content(session: Session, tenant_id: str, file_id: str) -> bytes | None:
    if not _ID.fullmatch(file_id):
        return None
    return session.scalar(select(StoredFile.content).where(
        StoredFile.id == file_id, StoredFile.tenant_id == tenant_id))


def byte_range(session: Session, tenant_id: str, file_id: str, start: int, end: int
               ) -> bytes | None:
    """Bytes [start, end) of the file, read by the database (not the whole file)."""
    data = session.scalar(select(func.substr(StoredFile.content, start + 1, end - start))
                          .where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id))
    return None if data is None else bytes(data)


def delete_file(session: Session, tenant_id: str, file_id: str) -> bool:
    if not _ID.fullmatch(file_id):
        return False
    res = session.execute(delete(StoredFile).where(StoredFile.id == file_id,
                                                   StoredFile.tenant_id == tenant_id))
    return res.rowcount == 1  # type: ignore[attr-defined]


def list_files(session: Session, tenant_id: str, *, limit: int, after: str | None,
               purpose: str | None, newest_first: bool) -> list[StoredFile]:
    """The tenant's files, newest (or oldest) first, after the file `after`."""
    q = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
    if purpose is not None:
        q = q.where(StoredFile.purpose == purpose)
    if after is not None:
        pos = session.execute(select(StoredFile.created_at, StoredFile.id).where(
            StoredFile.id == after, StoredFile.tenant_id == tenant_id)).first()
        if pos is not None:
            created, row_id = pos
            if newest_first:
                q = q.where(or_(StoredFile.created_at < created,
                                and_(StoredFile.created_at == created, StoredFile.id < row_id)))
            else:
                q = q.where(or_(StoredFile.created_at > created,
                                and_(StoredFile.created_at == created, StoredFile.id > row_id)))
    if newest_first:
        q = q.order_by(StoredFile.created_at.desc(), StoredFile.id.desc())
    else:
        q = q.order_by(StoredFile.created_at, StoredFile.id)
    return list(session.scalars(q.limit(limit)))

