"""Admission control for pool endpoints, shared by every worker process through Redis.

Each endpoint has a cap on calls in flight (its best batch size). A call takes a slot before it
is sent and gives it back when it ends; beyond the cap, calls wait in Redis instead of piling up
inside the server. When a slot frees, it goes to a waiting call of the first service tier that
has one (`interactive`, then `standard`, then `flex`: flex calls wait while others wait); within
the tier, to the call whose tenant has the fewest calls in flight at that endpoint (ties broken
round-robin); then by the tenant's jobs' attained service in levels, a multi-level feedback
queue (Autellix's discretised least attained service): a job's level is set by the tokens it
was served so far over every endpoint, level 0 below a quantum, then below `growth` times that
and so on, less a credit for the time its oldest call has waited (aging, so a long job always
progresses). The lowest level goes first: short jobs finish first. Within a level the job with
the fewest calls in flight goes first; then, at level 0, the job granted a slot longest ago
(jobs take turns, and a short job's follow-up is not stuck behind a newly arrived job's
fan-out), above it the job that arrived first (long jobs finish one after another rather than
all late); oldest call first within a job. One job with
500 parallel steps cannot starve a tenant with one small job, and a tenant's short jobs are not
stuck behind its long ones.

Crash safety: a slot is a lease (it expires if its holder dies without giving it back) and a
waiting call must keep polling or it is dropped. All state changes run as Lua scripts, so they
are atomic across processes. The same scripts share each endpoint's busy time out among the
slots held at each moment, over every process, for the energy figures. If Redis does not
answer, calls go ahead without admission (the per-process connection limit still bounds them)
and a warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis

log = logging.getLogger(__name__)

PREFIX = "agentq:adm:"

_COMMON = """
local base = KEYS[1]
local now = tonumber(ARGV[1])
local H, HO, TIN, JIN = base .. 'h', base .. 'ho', base .. 'tin', base .. 'jin'
local WD, WO, WT, WS = base .. 'wd', base .. 'wo', base .. 'wt', base .. 'ws'
local ATT = 'agentq:adm:att:'
local TLAST, JLAST, SEQ = base .. 'tlast', base .. 'jlast', base .. 'seq'
local SH, HS = base .. 'sh', base .. 'hs'

-- The endpoint's busy time shared out among its slot holders: S is the integral over time of
-- 1/holders (in ms), kept in SH with the clock it was brought up to. Every script brings it up
-- to `now` before the holders change; a holder notes S when granted (HS) and its share is the
-- difference at release. Clients' clocks may disagree by a little: the clock never goes back.
local S = 0
local function advance()
  local c = tonumber(redis.call('HGET', SH, 'c') or '')
  S = tonumber(redis.call('HGET', SH, 's') or '0')
  if c == nil then
    redis.call('HSET', SH, 'c', ARGV[1], 's', '0')
  elseif now > c then
    local n = redis.call('ZCARD', H)
    if n > 0 then S = S + (now - c) / n end
    redis.call('HSET', SH, 'c', ARGV[1], 's', string.format('%.17g', S))
  end
end

local function owner(s)
  local i = string.find(s, '\\n', 1, true)
  return string.sub(s, 1, i - 1), string.sub(s, i + 1)
end

local function decr(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end

-- A waiter's owner is `tier \\n tenant \\n job`; waiting tenants and their jobs are kept per tier.
local function remove_waiter(t)
  local o = redis.call('HGET', WO, t)
  if not o then return end
  local tier, rest = owner(o)
  local tenant, job = owner(rest)
  redis.call('HDEL', WO, t)
  redis.call('HDEL', WS, t)
  redis.call('ZREM', WD, t)
  redis.call('ZREM', base .. 'wq:' .. job, t)
  decr(base .. 'wj:' .. tier .. ':' .. tenant, job)
  decr(WT .. tier, tenant)
end

local function remove_holder(t)
  local o = redis.call('HGET', HO, t)
  if not o then return end
  local tenant, job = owner(o)
  redis.call('HDEL', HO, t)
  redis.call('HDEL', HS, t)
  redis.call('ZREM', H, t)
  decr(TIN, tenant)
  decr(JIN, job)
end

local function cleanup()
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', H, '-inf', now)) do remove_holder(t) end
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', WD, '-inf', now)) do remove_waiter(t) end
end

local function pick(candidates, inflight, last)
  local best, best_n, best_last = nil, nil, nil
  for _, c in ipairs(candidates) do
    local n = tonumber(redis.call('HGET', inflight, c) or '0')
    local l = tonumber(redis.call('HGET', last, c) or '0')
    if best == nil or n < best_n or (n == best_n and l < best_last) then
      best, best_n, best_last = c, n, l
    end
  end
  return best
end

-- The admission policy, set by each script from its arguments: `aging` (tokens per ms),
-- `quantum` (tokens) and `growth` (each level's bound over the one before).
local aging, quantum, growth = 0, 0, 2

-- Discretised least attained service (a multi-level feedback queue). A job's level is set by
-- the tokens it was served so far (over every endpoint), less `aging` tokens per ms its oldest
-- waiting call has waited (down to zero): level 0 below `quantum` tokens, then level k below
-- quantum * growth^k. The lowest waiting level goes first; within it, the job with the fewest
-- calls in flight. Then, at level 0, the job granted a slot here longest ago (one never granted
-- counts from its arrival: its first call's time), so short jobs take turns and a job's
-- follow-up goes before a job arrived since; above level 0, the job that arrived first, so
-- long jobs finish one after another rather than all late. Quantum 0: no levels.
local ARR, JT = 'agentq:adm:arr:', base .. 'jt'

local function level(a)
  if quantum <= 0 then return a end
  local k, bound = 0, quantum
  while a >= bound do k, bound = k + 1, bound * growth end
  return k
end

local function less(x, y)
  for i = 1, #x do
    if x[i] ~= y[i] then return x[i] < y[i] end
  end
  return false
end

local function pick_job(candidates)
  local best, best_key = nil, nil
  for _, c in ipairs(candidates) do
    local a = tonumber(redis.call('GET', ATT .. c) or '0')
    local head = redis.call('ZRANGE', base .. 'wq:' .. c, 0, 0)[1]
    if head and aging > 0 then
      a = math.max(0, a - aging * math.max(0, now - tonumber(redis.call('HGET', WS, head) or now)))
    end
    local lv = level(a)
    local t = tonumber(redis.call('GET', ARR .. c) or now)
    if lv == 0 then t = tonumber(redis.call('HGET', JT, c) or t) end
    local key = {lv, tonumber(redis.call('HGET', JIN, c) or '0'), t,
                 tonumber(redis.call('HGET', JLAST, c) or '0')}
    if best == nil or less(key, best_key) then best, best_key = c, key end
  end
  return best
end

local function grant_next(lease)
  local tier, tenant = nil, nil
  for t = 0, 2 do
    tenant = pick(redis.call('HKEYS', WT .. t), TIN, TLAST)
    if tenant then tier = t break end
  end
  if not tenant then return nil end
  local job = pick_job(redis.call('HKEYS', base .. 'wj:' .. tier .. ':' .. tenant))
  if not job then return nil end
  local head = redis.call('ZRANGE', base .. 'wq:' .. job, 0, 0)[1]
  if not head then return nil end
  remove_waiter(head)
  local seq = redis.call('INCR', SEQ)
  redis.call('ZADD', H, now + lease, head)
  redis.call('HSET', HS, head, string.format('%.17g', S))
  redis.call('HSET', HO, head, tenant .. '\\n' .. job)
  redis.call('HINCRBY', TIN, tenant, 1)
  redis.call('HINCRBY', JIN, job, 1)
  redis.call('HSET', TLAST, tenant, seq)
  redis.call('HSET', JLAST, job, seq)
  redis.call('HSET', JT, job, ARGV[1])
  local g = 'agentq:adm:grant:' .. head
  redis.call('RPUSH', g, '1')
  redis.call('EXPIRE', g, 120)
  return head
end

local function fill(cap, lease)
  while redis.call('ZCARD', H) < cap do
    if not grant_next(lease) then break end
  end
end
"""

# KEYS[1] base; ARGV: now_ms, ticket, tenant, job, cap, lease_ms, waiter_ttl_ms, tier rank
# (0 first), aging (tokens per ms), quantum (tokens), growth
ACQUIRE = _COMMON + """
local ticket, tenant, job = ARGV[2], ARGV[3], ARGV[4]
local cap, lease, wttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local tier = ARGV[8]
aging, quantum, growth = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
advance()
cleanup()
if redis.call('ZSCORE', H, ticket) then return 1 end
if redis.call('HEXISTS', WO, ticket) == 0 then
  local seq = redis.call('INCR', SEQ)
  redis.call('HSET', WO, ticket, tier .. '\\n' .. tenant .. '\\n' .. job)
  redis.call('HSET', WS, ticket, ARGV[1])
  redis.call('ZADD', base .. 'wq:' .. job, seq, ticket)
  redis.call('HINCRBY', base .. 'wj:' .. tier .. ':' .. tenant, job, 1)
  redis.call('HINCRBY', WT .. tier, tenant, 1)
  redis.call('SET', ARR .. job, ARGV[1], 'NX', 'EX', 86400)
end
redis.call('ZADD', WD, now + wttl, ticket)
fill(cap, lease)
if redis.call('ZSCORE', H, ticket) then return 1 end
return 0
"""

# KEYS[1] base; ARGV: now_ms, ticket, cap, lease_ms, tokens served, aging (tokens per ms),
# quantum (tokens), growth.
# Returns the holder's share of the endpoint's busy time in ms (a string), or nil when it
# held no slot. The tokens count to the job's attained service (kept a day).
RELEASE = _COMMON + """
local ticket, cap, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
aging, quantum, growth = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
advance()
cleanup()
local since = redis.call('HGET', HS, ticket)
local o = redis.call('HGET', HO, ticket)
if o and tokens > 0 then
  local _, job = owner(o)
  redis.call('INCRBY', ATT .. job, tokens)
  redis.call('EXPIRE', ATT .. job, 86400)
end
remove_holder(ticket)
remove_waiter(ticket)
redis.call('DEL', 'agentq:adm:grant:' .. ticket)
fill(cap, lease)
if since then return string.format('%.17g', S - tonumber(since)) end
return false
"""

# KEYS[1] base; ARGV: now_ms. Returns {in flight, waiting}.
LOAD = _COMMON + """
advance()
cleanup()
return {redis.call('ZCARD', H), redis.call('HLEN', WO)}
"""

# KEYS[1] base; ARGV: cutoff_ms, cursor, count. Drops the last-grant fields (`jt`, `jlast`) of
# jobs granted nothing since the cutoff, one HSCAN page at a time; returns the next cursor and
# how many jobs it dropped. (A job idle that long has lost its arrival and attained service
# too: they expire after a day.)
PRUNE = """
local JT, JLAST = KEYS[1] .. 'jt', KEYS[1] .. 'jlast'
local cutoff = tonumber(ARGV[1])
local page = redis.call('HSCAN', JT, ARGV[2], 'COUNT', ARGV[3])
local fields, dropped = page[2], 0
for i = 1, #fields, 2 do
  if tonumber(fields[i + 1]) < cutoff then
    -- HSCAN may return a field twice: count only what is deleted.
    dropped = dropped + redis.call('HDEL', JT, fields[i])
    redis.call('HDEL', JLAST, fields[i])
  end
end
return {page[1], dropped}
"""


@dataclass
class Slot:
    """What `Admission.slot` yields. `admitted`: admission applied (False when Redis did not
    answer and the call went ahead anyway). `busy_share_s`, set when the block ends: the
    holder's share of the endpoint's busy time over every process (each moment divided among
    the slots held then), or None when it could not be counted."""

    admitted: bool = False
    busy_share_s: float | None = None
    # Set by the caller before the block ends: the tokens the call was served, counted to its
    # job's attained service.
    served_tokens: int = 0


# A flex job promoted to meet its deadline is admitted as standard.
TIER_RANKS = {"interactive": 0, "standard": 1, "promoted": 1, "flex": 2}


class AdmissionTimeout(Exception):
    """No slot came free in time."""


class AdmissionCancelled(Exception):
    """The caller gave up while waiting (its job was cancelled)."""


def endpoint_key(url: str) -> str:
    return PREFIX + hashlib.sha1(url.encode()).hexdigest()[:16] + ":"


class Admission:
    def __init__(self, client: redis.Redis, lease_s: float, waiter_ttl_s: float = 5.0,
                 poll_s: float = 0.5, aging_tokens_per_s: float = 200.0,
                 quantum_tokens: int = 500, level_growth: float = 16.0,
                 clock: Callable[[], float] = time.time) -> None:
        # `clock`: wall-clock seconds, shared by every process (tests pass one they control).
        if level_growth <= 1:
            raise ValueError("level_growth must be over 1")
        self._redis = client
        self._clock = clock
        self._aging = aging_tokens_per_s / 1000.0
        self._quantum = quantum_tokens
        self._growth = level_growth
        self._lease_ms = int(lease_s * 1000)
        self._waiter_ttl_ms = int(waiter_ttl_s * 1000)
        self._poll_s = poll_s
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._load = client.register_script(LOAD)
        self._prune = client.register_script(PRUNE)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def loads(self, urls: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Calls in flight and waiting at each endpoint, over every process."""
        pipe = self._redis.pipeline(transaction=False)
        for url in urls:
            self._load(keys=[endpoint_key(url)], args=[self._now_ms()], client=pipe)
        return {url: (int(r[0]), int(r[1]))
                for url, r in zip(urls, cast(list[Any], pipe.execute()), strict=True)}

    def prune(self, urls: Sequence[str], idle_s: float = 86400.0,
              every_s: float | None = None) -> int:
        """Forget the last grant of jobs granted nothing at these endpoints for `idle_s` (the
        hashes that order level 0 would otherwise keep a field per job for ever). `every_s`:
        an endpoint is pruned at most once per that many seconds over every process (the
        sweepers'); None: now. Returns how many jobs' fields were dropped."""
        cutoff = self._now_ms() - int(idle_s * 1000)
        dropped = 0
        for url in urls:
            base = endpoint_key(url)
            if every_s is not None and not self._redis.set(
                    base + "pruned", "1", nx=True, ex=max(1, int(every_s))):
                continue
            cursor = "0"
            while True:
                page = cast(list[Any], self._prune(keys=[base], args=[cutoff, cursor, 500]))
                cursor = page[0].decode() if isinstance(page[0], bytes) else str(page[0])
                dropped += int(page[1])
                if cursor == "0":
                    break
        return dropped

    @contextmanager
    def slot(self, url: str, cap: int, tenant: str, job: str, timeout_s: float,
             cancelled: Callable[[], bool] | None = None, tier: str = "standard"
             ) -> Iterator[Slot]:
        """Hold one of the endpoint's `cap` slots for the duration of the block."""
        ticket = uuid.uuid4().hex
        base = endpoint_key(url)
        slot = Slot()
        try:
            slot.admitted = self._wait(base, ticket, cap, tenant or "-", job or "-", timeout_s,
                                       cancelled, TIER_RANKS.get(tier, 1))
        except redis.RedisError as exc:
            log.warning("admission control unavailable, sending without it: %s", exc)
            self._give_back(base, ticket, cap)
            yield slot
            return
        except BaseException:
            self._give_back(base, ticket, cap)
            raise
        try:
            yield slot
        finally:
            slot.busy_share_s = self._give_back(base, ticket, cap, slot.served_tokens)

    def _wait(self, base: str, ticket: str, cap: int, tenant: str, job: str, timeout_s: float,
              cancelled: Callable[[], bool] | None, tier: int = 1) -> bool:
        deadline = time.monotonic() + timeout_s
        grant_key = PREFIX + "grant:" + ticket
        while True:
            got = self._acquire(keys=[base], args=[self._now_ms(), ticket, tenant, job, cap,
                                                   self._lease_ms, self._waiter_ttl_ms, tier,
                                                   self._aging, self._quantum,
                                                   self._growth])
            if int(cast(int, got)) == 1:
                return True
            if cancelled is not None and cancelled():
                raise AdmissionCancelled()
            if time.monotonic() > deadline:
                raise AdmissionTimeout(f"no slot at the endpoint within {timeout_s:.0f} s")
            if self._redis.blpop([grant_key], timeout=self._poll_s):
                return True

    def _give_back(self, base: str, ticket: str, cap: int, tokens: int = 0) -> float | None:
        """Give the slot back, counting `tokens` to its job's attained service; returns its
        share of the endpoint's busy time in seconds."""
        try:
            share_ms = self._release(keys=[base], args=[self._now_ms(), ticket, cap,
                                                        self._lease_ms, tokens, self._aging,
                                                        self._quantum, self._growth])
        except redis.RedisError as exc:
            log.warning("could not give back an admission slot (its lease will expire): %s",
                        exc)
            return None
        return None if share_ms is None else max(0.0, float(share_ms) / 1000.0)
