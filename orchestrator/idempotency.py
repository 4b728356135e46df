"""Idempotent submission (`Idempotency-Key`), per tenant.

The first request with a key claims it as in flight in its own short transaction, under a
random owner token and a lease (`AGENTQ_IDEMPOTENCY_LEASE_S`) on the database's clock that this
process renews while the request runs, however long that takes. The job and the stored response
are then written in one transaction, and only if the request still owns the key: a request
whose lease ran out (its process froze or died) and whose key another request took over writes
nothing and answers 409. A later request with the same key and body gets the stored response;
with another body, 422; while the first is still in flight, 409. Keys are kept for
`AGENTQ_IDEMPOTENCY_TTL_HOURS` (24 h by default) and then swept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import transaction
from core.db_errors import retry_transient
from core.errors import Conflict, InvalidInput
from core.models import utcnow
from core.repositories import idempotency as keys
from core.repositories.idempotency import KeyStatus
from core.settings import get_settings

log = logging.getLogger(__name__)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """A key this request holds in flight."""

    tenant_id: str
    key: str
    owner: str


class _Keeper:
    """Renews the leases of the keys this process's requests hold, a third of a lease after
    each was taken or last renewed, in one statement for all held, from one thread that
    runs while any is held."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}  # owner -> when its lease is next renewed
        self._thread: threading.Thread | None = None

    def hold(self, owner: str) -> None:
        with self._cond:
            self._due[owner] = time.monotonic() + get_settings().idempotency_lease_s / 3
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="agentq-idempotency-leases")
                self._thread.start()
            self._cond.notify()

    def release(self, owner: str) -> None:
        with self._cond:
            self._due.pop(owner, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._due:
                    self._thread = None
                    return
                wait = min(self._due.values()) - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                owners = sorted(self._due)
            lease = get_settings().idempotency_lease_s
            try:
                with transaction() as s:
                    kept = keys.renew(s, owners, lease)
                if set(owners) - kept:
                    log.warning("%d idempotency keys were taken over while their requests "
                                "ran", len(set(owners) - kept))
                retry_in = lease / 3
            except Exception:  # noqa: BLE001 - tried again shortly; the lease has slack
                log.warning("could not renew idempotency key leases", exc_info=True)
                retry_in = min(1.0, lease / 6)
            with self._cond:
                for owner in owners:
                    if owner in self._due:
                        self._due[owner] = time.monotonic() + retry_in


_keeper = _Keeper()


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key: must be 1 to {MAX_KEY_LENGTH} printable "
                           "characters")
    return key


def begin(tenant_id: str, key: str, request_hash: str) -> Claim | StoredResponse:
    """Claim the key for this request, or return the response stored for it."""
    settings = get_settings()
    ttl = timedelta(hours=settings.idempotency_ttl_hours)
    lease = settings.idempotency_lease_s
    owner = secrets.token_hex(16)
    for _ in range(3):
        try:
            with transaction() as s:
                keys.add_in_flight(s, tenant_id, key, request_hash, owner, lease)
            return Claim(tenant_id, key, owner)
        except IntegrityError:
            pass
        with transaction() as s:
            if keys.remove_if_lapsed(s, tenant_id, key, lease):
                continue  # its holder stopped renewing it: take it over
            row = keys.get(s, tenant_id, key)
            if row is None:
                continue
            if row.created_at < utcnow() - ttl:
                keys.remove(s, row)
                continue
            if row.request_hash != request_hash:
                raise InvalidInput("Idempotency-Key was already used with a different request "
                                   "body; use a new key for a new request",
                                   code="idempotency_key_reused")
            if row.status == KeyStatus.IN_FLIGHT:
                raise Conflict("a request with this Idempotency-Key is still in flight; retry "
                               "shortly", code="idempotency_in_flight")
            assert row.response_status is not None
            assert row.response_body is not None
            return StoredResponse(row.response_status, dict(row.response_body))
    raise Conflict("could not claim the Idempotency-Key; retry", code="idempotency_in_flight")


@contextmanager
def held(claim: Claim | None) -> Iterator[None]:
    """Keep the claim's lease renewed while the block runs."""
    if claim is None:
        yield
        return
    _keeper.hold(claim.owner)
    try:
        yield
    finally:
        _keeper.release(claim.owner)


def complete(session: Session, claim: Claim, status_code: int, body: dict[str, Any],
             job_id: str) -> None:
    """Store the response, in the transaction that created the job; Conflict (which rolls the
    job back) when the request no longer holds the key."""
    if not keys.complete(session, claim.tenant_id, claim.key, claim.owner, status_code, body,
                         job_id):
        raise Conflict("this request's hold on the Idempotency-Key lapsed and another request "
                       "with the same key took it over; nothing was created by this one: "
                       "retry to get that request's response", code="idempotency_in_flight")


def abandon(claim: Claim) -> None:
    """The request failed before creating anything: the key may be used again."""
    with transaction() as s:
        keys.delete_in_flight(s, claim.tenant_id, claim.key, claim.owner)


def sweep_expired() -> int:
    cutoff = utcnow() - timedelta(hours=get_settings().idempotency_ttl_hours)
    with transaction() as s:
        return keys.delete_created_before(s, cutoff)


@dataclass(frozen=True)
class Outcome:
    """A request's response body (holding the job's `id`) and whether it is the stored
    response of an earlier request with the same key."""

    status_code: int
    body: dict[str, Any]
    replayed: bool = False


def once(tenant_id: str, key: str | None, request: dict[str, Any],
         work: Callable[[Session], dict[str, Any]], status_code: int = 202) -> Outcome:
    """Run `work` (which writes the job in the session it is given and returns the response
    body) in one transaction, run again whole when a transient error rolled it back. With a
    key: at most once per key and `request`; a repeat gets the stored response, and the key
    is freed again when `work` fails."""
    if key is None:
        def plain() -> dict[str, Any]:
            with transaction() as session:
                return work(session)
        return Outcome(status_code, retry_transient(plain))
    request_hash = fingerprint(request)
    begun = retry_transient(lambda: begin(tenant_id, key, request_hash))
    if isinstance(begun, StoredResponse):
        return Outcome(begun.status_code, begun.body, replayed=True)
    claim = begun

    def keyed() -> dict[str, Any]:
        with transaction() as session:
            body = work(session)
            complete(session, claim, status_code, body, str(body["id"]))
        return body

    with held(claim):
        try:
            return Outcome(status_code, retry_transient(keyed))
        except BaseException:
            retry_transient(lambda: abandon(claim))
            raise
