"""The call cache: identical deterministic calls of one job are made once.

A Redis key per (job, call key) holds the request id of the call being made ("lead"), or
`done:<request id>` once it has an answer in the ledger. One script decides atomically whether a
call leads (makes the call), waits for the leader, or uses the done answer. Redis only saves
money: when it does not answer, the ledger is asked directly and parallel twins may both call.
A pointer read from Redis is used only when it names a finished call of the same job.
"""

from __future__ import annotations

import functools
import logging
from enum import StrEnum
from typing import Any, cast

from redis.commands.core import Script

from core.redis import get_redis
from core.settings import get_settings

log = logging.getLogger(__name__)

PREFIX = "agentq:callkey:"
DONE_TTL_S = 86_400

_LEAD = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] or (ARGV[3] ~= '' and v == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return {'lead', ARGV[1]}
end
if string.sub(v, 1, 5) == 'done:' then return {'done', string.sub(v, 6)} end
return {'wait', v}
"""
# Compare-and-set, or compare-and-delete when the new value is empty.
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""


@functools.cache
def _script(text: str) -> Script:
    """A script run by its digest (EVALSHA; the text is sent again only when Redis lacks it)."""
    return get_redis().register_script(text)


class Lead(StrEnum):
    LEAD = "lead"  # make the call
    WAIT = "wait"  # another step of the job is making it
    DONE = "done"  # its answer is in the ledger
    UNKNOWN = "unknown"  # Redis did not answer


def _key(job_id: str, key: str) -> str:
    return f"{PREFIX}{job_id}:{key}"


def _ttl() -> int:
    return int(get_settings().request_timeout_s + 60)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lead(job_id: str, key: str, request_id: str, replace_done: str | None = None
         ) -> tuple[Lead, str | None]:
    """Who makes the call, and the request id of the leader or of the done answer."""
    try:
        answer = cast(list[Any], _script(_LEAD)(
            keys=[_key(job_id, key)], client=get_redis(),
            args=[request_id, _ttl(), f"done:{replace_done}" if replace_done else ""]))
    except Exception as exc:  # noqa: BLE001 - the cache only saves money; never fail a call
        log.debug("call cache key unavailable: %s", exc)
        return Lead.UNKNOWN, None
    return Lead(_text(answer[0])), _text(answer[1])


def take_over(job_id: str, key: str, holder: str, request_id: str) -> bool:
    """Lead in place of `holder` (whose step stopped running)."""
    try:
        return bool(_script(_SWAP)(keys=[_key(job_id, key)], args=[holder, request_id, _ttl()],
                                 client=get_redis()))
    except Exception:  # noqa: BLE001
        return False


def unlead(job_id: str, key: str, request_id: str, answered: bool) -> None:
    """Mark the call answered (later twins read its row), or let another step lead."""
    try:
        _script(_SWAP)(keys=[_key(job_id, key)], client=get_redis(), args=[
            request_id, f"done:{request_id}" if answered else "", DONE_TTL_S])
    except Exception as exc:  # noqa: BLE001 - the key expires on its own
        log.debug("could not update a call cache key: %s", exc)
