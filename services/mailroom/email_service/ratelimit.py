"""The global send rate limit: token buckets in Redis, shared by every worker on every host.

Limits come from the environment (``MAILROOM_RATE_LIMIT_PER_SECOND`` / ``_PER_HOUR`` /
``_PER_DAY``, 0 = unlimited) and may be overridden at run time with :func:`set_limits`;
overrides are stored in Postgres (``RuntimeSetting "rate_limits"``) and mirrored in
Redis, where the Lua script reads them on every call, so a change reaches every worker
at its next token. A flushed or expired mirror is restored from Postgres.

Design
------
For every configured period (second, hour, day) there are two buckets:

* ``all:<period>`` counts every send, transactional and bulk: capacity = the limit
  (for the per-second one, :data:`BURST_SECONDS` worth), refilled at limit/period.
  Bulk may take from it only while it keeps ``reserved_transactional`` of its capacity:
  that share is always there for transactional mail.
* ``bulk:<period>`` paces bulk alone at ``(1 - reserved) * throttle factor`` of the limit,
  with the same burst in seconds. Its fill is stored as a fraction of the capacity, so
  a throttle cut shrinks what bulk may take at once and recovery gives it back.

Transactional mail (``high_priority``) is always granted at once; its sends are taken
from the ``all`` buckets (never below zero), so bulk leaves room when transactional
traffic uses more than its reserve. Bulk is granted only when every bucket can give it;
otherwise nothing is taken and the caller learns how long to wait. One Lua script does
the check-and-take over all buckets atomically, on Redis server time, so workers on
hosts with skewed clocks agree (Redis 5 or later: scripts are replicated by effects).
Bucket keys expire when they would be full again: a missing bucket is a full one, so a
flushed Redis forgets what was spent in the current hour or day, never the limits.

Burst: the per-second buckets hold one second's worth (:data:`BURST_SECONDS`), at least
one token. A relay counting per second may see up to twice the limit in one unlucky
second, never more on average; a smaller burst would make workers wake and miss more
often for no gain at the relay. The hour and day buckets hold the whole period.

Throttling (SMTP 421, 450, 451, 452, 454): :func:`note_throttle` halves the bulk factor
(floor :data:`THROTTLE_FLOOR`). Replies within :data:`THROTTLE_SETTLE_SECONDS` of the
last cut do not cut again (the mail in flight was paced at the old rate, and ten
workers seeing the same burst of 421s must not drive the rate to the floor at once),
but they restart the cooling period; replies that keep coming cut once a second.
After each quiet ``MAILROOM_THROTTLE_COOLDOWN_SECONDS`` the factor doubles, back to
1.0: 0.1 recovers fully after four quiet cooldowns.

Redis unreachable: transactional mail is granted (it is never held back). Bulk is
refused for :data:`REDIS_DOWN_WAIT_SECONDS` when any limit is configured (the limits are
then read from Postgres), and granted when none is. Limits usually stand for a relay's
or provider's quota, and overrunning a quota gets the whole account throttled or
suspended, transactional mail included; bulk rows handed back stay safe in Postgres and
go out once Redis answers again (the Celery broker normally lives on the same Redis, so
little bulk moves during an outage anyway). The warning is logged once per outage.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import cast

import redis
from django.conf import settings
from django.db import transaction
from redis.commands.core import Script

from email_service import keys, redisstore
from email_service.models import Queue, RuntimeSetting

logger = logging.getLogger(__name__)

# Key names live in email_service.keys; these names stay for readability here.
PREFIX = keys.RATELIMIT_PREFIX
LIMITS_KEY = keys.RATE_LIMITS_KEY
THROTTLE_KEY = keys.THROTTLE_KEY
WAITS_KEY = keys.WAITS_KEY
THROTTLES_KEY = keys.THROTTLES_KEY
PERIODS = (("second", 1), ("hour", 3600), ("day", 86400))
BUCKET_KEYS = tuple(
    keys.rate_bucket_key(kind, name) for kind in ("all", "bulk") for name, _ in PERIODS
)

RUNTIME_SETTING = "rate_limits"
LIMIT_FIELDS = ("per_second", "per_hour", "per_day")
# The mirror expires now and then and is read back from Postgres: a mirror left stale by
# an outage during set_limits() heals by itself.
MIRROR_TTL_SECONDS = 300
BURST_SECONDS = 1.0
THROTTLE_FLOOR = 0.1
THROTTLE_SETTLE_SECONDS = 1.0
REDIS_DOWN_WAIT_SECONDS = 5.0
# A refusal always asks for at least this long, so 0.0 unambiguously means "granted".
MIN_WAIT_SECONDS = 0.001

_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, queue, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local reserved, burst = tonumber(ARGV[7]), tonumber(ARGV[8])
local cooldown, settle, floor = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])

local function num(x) return string.format('%.17g', x) end

local function factor()
  local s = redis.call('HMGET', KEYS[2], 'factor', 'since')
  if not s[1] then return 1.0 end
  local steps = math.floor(math.max(now - tonumber(s[2]), 0) / cooldown)
  return math.min(1.0, tonumber(s[1]) * 2 ^ math.min(steps, 64))
end

if op == 'throttle' then
  local current = factor()
  local cut_at = tonumber(redis.call('HGET', KEYS[2], 'cut_at') or '0')
  local new = current
  if now - cut_at >= settle then
    new, cut_at = math.max(floor, current / 2), now
  end
  redis.call('HSET', KEYS[2], 'factor', num(new), 'since', num(now), 'cut_at', num(cut_at))
  -- Kept until the factor is back to 1.0 (and a second more): then missing means 1.0.
  local steps = math.ceil(math.log(1 / new) / math.log(2))
  redis.call('PEXPIRE', KEYS[2], math.ceil(steps * cooldown * 1000) + 1000)
  redis.call('INCR', KEYS[4])
  return {'factor', num(new)}
end

local raw = redis.call('GET', KEYS[1])
if not raw then return {'restore'} end
local override = cjson.decode(raw)
local f = factor()
local buckets = {}
local periods = {{'second', 1, ARGV[4]}, {'hour', 3600, ARGV[5]}, {'day', 86400, ARGV[6]}}
for i, p in ipairs(periods) do
  local limit = tonumber(override['per_' .. p[1]] or p[3])
  if limit > 0 then
    local window = p[2]
    if i == 1 then window = burst end
    local rate = limit / p[2]
    local cap = math.max(rate * window, 1)
    table.insert(buckets, {key = KEYS[4 + i], name = p[1], kind = 'all',
                           rate = rate, cap = cap, floor = reserved * cap})
    local brate = rate * (1 - reserved) * f
    table.insert(buckets, {key = KEYS[7 + i], name = p[1], kind = 'bulk',
                           rate = brate, cap = math.max(brate * window, 1), floor = 0})
  end
end

local function level(b)
  local s = redis.call('HMGET', b.key, 'fill', 'ts')
  if not s[1] then return b.cap end
  local tokens = tonumber(s[1]) * b.cap + math.max(now - tonumber(s[2]), 0) * b.rate
  return math.min(tokens, b.cap)
end

local function store(b, tokens)
  redis.call('HSET', b.key, 'fill', num(tokens / b.cap), 'ts', num(now))
  redis.call('PEXPIRE', b.key, math.ceil((b.cap - tokens) / b.rate * 1000) + 1000)
end

if op == 'peek' then
  local reply = {'peek', num(f), redis.call('GET', KEYS[3]) or '0',
                 redis.call('GET', KEYS[4]) or '0'}
  for _, b in ipairs(buckets) do
    for _, v in ipairs({b.name, b.kind, num(level(b)), num(b.cap), num(b.floor)}) do
      table.insert(reply, v)
    end
  end
  return reply
end

if queue ~= 'bulk' then
  for _, b in ipairs(buckets) do
    if b.kind == 'all' then
      local tokens = level(b)
      store(b, math.max(tokens - count, math.min(tokens, 0)))
    end
  end
  return {'granted', '0'}
end

-- A request bigger than a full bucket is granted from a full bucket and leaves a debt
-- that refill pays back, so big batches are slowed, not starved.
local wait, levels = 0, {}
for i, b in ipairs(buckets) do
  levels[i] = level(b)
  local need = b.floor + math.min(count, b.cap - b.floor)
  if levels[i] + 1e-9 < need then wait = math.max(wait, (need - levels[i]) / b.rate) end
end
if wait > 0 then
  redis.call('INCR', KEYS[3])
  return {'wait', num(wait)}
end
for i, b in ipairs(buckets) do store(b, levels[i] - count) end
return {'granted', '0'}
"""


@dataclass(frozen=True)
class Limits:
    """The limits in force: environment defaults overridden by runtime values."""

    per_second: float  # 0 = unlimited
    per_hour: int  # 0 = unlimited
    per_day: int  # 0 = unlimited
    reserved_transactional: float  # share (0..1) of each limit kept for transactional mail

    @property
    def configured(self) -> bool:
        return bool(self.per_second or self.per_hour or self.per_day)


@dataclass(frozen=True)
class Bucket:
    """One bucket as seen by :func:`status`: tokens available now out of its capacity."""

    period: str
    kind: str  # "all" (every send) or "bulk" (bulk's paced share)
    available: float
    capacity: float
    reserve: float  # what bulk must leave in it for transactional mail


class _RedisHealth:
    """Log a Redis outage once, and its end once."""

    down = False

    @classmethod
    def failed(cls, what: str) -> None:
        if not cls.down:
            logger.warning("rate limiter: Redis unreachable (%s)", what, exc_info=True)
        cls.down = True

    @classmethod
    def ok(cls) -> None:
        if cls.down:
            logger.warning("rate limiter: Redis reachable again")
        cls.down = False


# --------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------


def limits() -> Limits:
    """The limits in force now: settings, overridden by values set at run time."""
    try:
        raw = cast(bytes | None, redisstore.client().get(LIMITS_KEY))
        overrides = _parse_overrides(raw) if raw is not None else _restore_mirror()
    except redis.RedisError:
        _RedisHealth.failed("reading limits")
        overrides = _durable_overrides()
    return _with_overrides(overrides)


def set_limits(
    *, per_second: float | None = None, per_hour: int | None = None, per_day: int | None = None
) -> Limits:
    """Change limits at run time: stored durably in RuntimeSetting(name="rate_limits") and
    mirrored in Redis; takes effect for every worker within a moment.

    ``None`` leaves a limit as it is; 0 means unlimited. Raises ValueError on a negative
    or non-finite value, and redis.RedisError when the mirror could not be written (the
    durable value is stored: call again once Redis answers).
    """
    changes = {"per_second": per_second, "per_hour": per_hour, "per_day": per_day}
    for name, value in changes.items():
        if value is not None and not _is_limit(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    with transaction.atomic():
        row, _ = RuntimeSetting.objects.select_for_update().get_or_create(
            name=RUNTIME_SETTING, defaults={"value": {}}
        )
        overrides = _clean_overrides(row.value)
        overrides.update({k: v for k, v in changes.items() if v is not None})
        row.value = overrides
        row.save()
    _write_mirror(overrides)
    return _with_overrides(overrides)


def reset_limits() -> Limits:
    """Forget every runtime override: the environment's limits apply again."""
    RuntimeSetting.objects.filter(name=RUNTIME_SETTING).delete()
    _write_mirror({})
    return _with_overrides({})


def _with_overrides(overrides: dict[str, float]) -> Limits:
    return Limits(
        per_second=float(overrides.get("per_second", settings.MAILROOM_RATE_LIMIT_PER_SECOND)),
        per_hour=int(overrides.get("per_hour", settings.MAILROOM_RATE_LIMIT_PER_HOUR)),
        per_day=int(overrides.get("per_day", settings.MAILROOM_RATE_LIMIT_PER_DAY)),
        reserved_transactional=float(settings.MAILROOM_RATE_RESERVED_TRANSACTIONAL),
    )


def _clean_overrides(value: object) -> dict[str, float]:
    """Only known, numeric, non-negative fields: a hand-edited row cannot break the script."""
    if not isinstance(value, dict):
        return {}
    return {name: value[name] for name in LIMIT_FIELDS if _is_limit(value.get(name))}


def _is_limit(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0


def _parse_overrides(raw: bytes) -> dict[str, float]:
    try:
        return _clean_overrides(json.loads(raw))
    except ValueError:
        return {}


def _durable_overrides() -> dict[str, float]:
    value = RuntimeSetting.objects.filter(name=RUNTIME_SETTING).values_list("value", flat=True)
    return _clean_overrides(value.first())


def _write_mirror(overrides: dict[str, float]) -> None:
    redisstore.client().set(LIMITS_KEY, json.dumps(overrides), ex=MIRROR_TTL_SECONDS)


def _restore_mirror() -> dict[str, float]:
    """The mirror is missing (flushed or expired): Postgres decides, Redis is told.

    NX: a set_limits() that wrote the mirror meanwhile wins over what was read here.
    """
    overrides = _durable_overrides()
    redisstore.client().set(LIMITS_KEY, json.dumps(overrides), ex=MIRROR_TTL_SECONDS, nx=True)
    return overrides


# --------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------


@functools.cache
def _script() -> Script:
    # redis-py runs it with EVALSHA and loads it again if Redis lost it (restart).
    return redisstore.client().register_script(_LUA)


def _run(op: str, queue: str = "", count: int = 0) -> list[bytes]:
    """Run the script; when the limits mirror is missing, restore it and run again."""
    cooldown = float(settings.MAILROOM_THROTTLE_COOLDOWN_SECONDS)
    args: list[str | int | float] = [
        op,
        queue,
        count,
        float(settings.MAILROOM_RATE_LIMIT_PER_SECOND),
        int(settings.MAILROOM_RATE_LIMIT_PER_HOUR),
        int(settings.MAILROOM_RATE_LIMIT_PER_DAY),
        float(settings.MAILROOM_RATE_RESERVED_TRANSACTIONAL),
        BURST_SECONDS,
        cooldown,
        min(THROTTLE_SETTLE_SECONDS, cooldown),
        THROTTLE_FLOOR,
    ]
    keys = [LIMITS_KEY, THROTTLE_KEY, WAITS_KEY, THROTTLES_KEY, *BUCKET_KEYS]
    reply = cast(list[bytes], _script()(keys=keys, args=args))
    if reply[0] == b"restore":
        _restore_mirror()
        reply = cast(list[bytes], _script()(keys=keys, args=args))
    if reply[0] == b"restore":
        raise redis.RedisError("the rate limits mirror vanished twice in a row")
    _RedisHealth.ok()
    return reply


def acquire(queue: str, count: int = 1) -> float:
    """Take ``count`` tokens. Returns 0.0 when granted, else the seconds until they could
    be (nothing is taken).

    ``high_priority`` is always granted and never waits, but its sends are counted in
    the ``all`` buckets, so bulk leaves room. ``bulk`` is granted only while every
    configured bucket keeps the transactional reserve: bulk may use at most
    (1 - reserved) of each limit, multiplied by the current throttle factor.
    """
    if queue not in Queue.values:
        raise ValueError(f"unknown queue {queue!r}")
    if count <= 0:
        return 0.0
    try:
        reply = _run("take", queue, count)
    except redis.RedisError:
        _RedisHealth.failed("acquiring tokens")
        return _wait_without_redis(queue)
    return 0.0 if reply[0] == b"granted" else max(float(reply[1]), MIN_WAIT_SECONDS)


def _wait_without_redis(queue: str) -> float:
    """Transactional goes; bulk waits when a limit exists (see the module docstring)."""
    if queue != Queue.BULK or not _with_overrides(_durable_overrides()).configured:
        return 0.0
    return REDIS_DOWN_WAIT_SECONDS


def wait_for_tokens(queue: str, count: int = 1, max_wait: float | None = None) -> float:
    """Like :func:`acquire`, but sleep for tokens up to ``max_wait`` seconds in all
    (default ``MAILROOM_RATE_MAX_WAIT_SECONDS``).

    Returns 0.0 when granted, else the last wait announced: the caller should hand its
    batch back for at least that long rather than hold a worker.
    """
    budget = settings.MAILROOM_RATE_MAX_WAIT_SECONDS if max_wait is None else max_wait
    deadline = time.monotonic() + budget
    while (wait := acquire(queue, count)) > 0:
        remaining = deadline - time.monotonic()
        if wait > remaining:
            return wait
        # A little jitter, so workers refused together do not all wake together.
        time.sleep(min(wait * random.uniform(1.0, 1.2), remaining))
    return 0.0


# --------------------------------------------------------------------------------------
# Throttling
# --------------------------------------------------------------------------------------


def note_throttle() -> None:
    """A throttling reply (421, 450, 451, 452, 454) was seen: halve the bulk rate (floor
    0.1) for MAILROOM_THROTTLE_COOLDOWN_SECONDS; after each quiet cooldown it doubles
    again up to 1.0. Replies within a second of the last cut only restart the cooldown.
    """
    try:
        factor = float(_run("throttle")[1])
    except redis.RedisError:
        _RedisHealth.failed("noting a throttling reply")
        return
    logger.info("throttling reply: bulk rate factor now %.2f", factor)


def throttle_factor() -> float:
    """The share of bulk's allowance in use now: 1.0, or less after throttling replies."""
    try:
        return float(_run("peek")[1])
    except redis.RedisError:
        _RedisHealth.failed("reading the throttle factor")
        return 1.0


def effective_bulk_rate() -> float:
    """Bulk's sustained rate per second after reserve and throttle (0 = unlimited): the
    tightest of the configured limits, each spread over its period."""
    return _bulk_rate(limits(), throttle_factor())


def _bulk_rate(current: Limits, factor: float) -> float:
    configured = (current.per_second, current.per_hour, current.per_day)
    rates = [lim / secs for lim, (_, secs) in zip(configured, PERIODS, strict=True) if lim > 0]
    if not rates:
        return 0.0
    return min(rates) * (1 - current.reserved_transactional) * factor


def status() -> dict[str, object]:
    """For dashboards and metrics: limits, throttle factor, buckets, waits counted."""
    current = limits()
    result: dict[str, object] = {
        "limits": asdict(current),
        "limited": current.configured,
        "redis": "ok",
        "throttle_factor": 1.0,
        "effective_bulk_rate": 0.0,
        "buckets": [],
        "waits_total": 0,
        "throttles_total": 0,
    }
    try:
        reply = _run("peek")
    except redis.RedisError:
        _RedisHealth.failed("reading the status")
        return result | {"redis": "unreachable"}
    result["throttle_factor"] = float(reply[1])
    result["waits_total"] = int(reply[2])
    result["throttles_total"] = int(reply[3])
    result["buckets"] = [asdict(b) for b in _buckets(reply[4:])]
    result["effective_bulk_rate"] = _bulk_rate(current, float(reply[1]))
    return result


def _buckets(flat: list[bytes]) -> list[Bucket]:
    return [
        Bucket(
            period=flat[i].decode(),
            kind=flat[i + 1].decode(),
            available=float(flat[i + 2]),
            capacity=float(flat[i + 3]),
            reserve=float(flat[i + 4]),
        )
        for i in range(0, len(flat), 5)
    ]
