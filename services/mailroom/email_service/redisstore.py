"""Everything Mailroom keeps in Redis: counters, the pause mirror, dispatch tokens.

Redis is never the only copy of anything that matters. Counters are operational
figures; the pause switch is mirrored from Postgres; dispatch tokens only tell the
sweeper which queued rows still have a task in flight. A flushed Redis delays mail,
it never loses it.
"""

from __future__ import annotations

import functools
import logging
import time

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

# The classic keys of the original design, kept so its users find what they know.
SENT_TOTAL = "email_sent_total"
FAILED_TOTAL = "email_failed_total"
RETRY_COUNTS = "email_retry_counts"
BULK_PAUSE = "bulk_email_pause"

# A queued batch waiting longer than this is re-enqueued by the sweeper (claims make
# the extra task harmless); it also bounds the life of a token orphaned by an outage.
DISPATCH_TOKEN_TTL = 24 * 3600
# Time-bucketed counters for live rates and charts: 10 s buckets kept for an hour.
SERIES_BUCKET_SECONDS = 10
SERIES_TTL_SECONDS = 3600
_OFF_VALUES = {b"0", b"", b"false", b"False", b"no", b"off"}


@functools.cache
def client() -> redis.Redis:
    # redis-py's pool notices a fork and reconnects, so one client per process is safe.
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )


def queue_key(metric: str, queue: str) -> str:
    return f"mailroom:{metric}:{queue}"


def dispatch_key(token: str) -> str:
    return f"mailroom:dispatch:{token}"


def parse_pause(raw: bytes | None) -> bool | None:
    """The mirror's value: True/False, or None when the key is missing (Redis was flushed)."""
    if raw is None:
        return None
    return raw.strip() not in _OFF_VALUES


class Outcome:
    SENT = "sent"
    FAILED = "failed"
    RETRIED = "retried"
    SUPPRESSED = "suppressed"


def campaign_state_key(campaign_id: object) -> str:
    return f"mailroom:campaign:{campaign_id}:state"


def series_key(name: str, bucket: int) -> str:
    return f"mailroom:series:{name}:{bucket}"


def bucket_of(now: float) -> int:
    return int(now // SERIES_BUCKET_SECONDS)


def record_outcome(
    queue: str,
    outcome: str,
    address: str,
    *,
    campaign_id: object = None,
    read: tuple[str, ...] = (),
    reply_class: str = "",
    latency: float | None = None,
) -> list[bytes | None] | None:
    """Count one delivery outcome; in the same round trip, read the keys in ``read``.

    Besides the totals it adds to time-bucketed series (per queue, and per campaign)
    that give live rates without scanning anything. Returns the values read, or None
    when Redis did not answer: counting must never stop delivery, so Redis errors are
    logged and swallowed, and the caller falls back to Postgres for what it read.
    """
    pipe = client().pipeline(transaction=False)
    if outcome == Outcome.SENT:
        pipe.incr(SENT_TOTAL)
        pipe.hdel(RETRY_COUNTS, address)
    elif outcome == Outcome.FAILED:
        pipe.incr(FAILED_TOTAL)
        pipe.hdel(RETRY_COUNTS, address)
    elif outcome == Outcome.RETRIED:
        pipe.hincrby(RETRY_COUNTS, address, 1)
    pipe.incr(queue_key(f"{outcome}_total", queue))
    if outcome == Outcome.RETRIED and reply_class:
        pipe.incr(queue_key(f"{outcome}_total", f"{queue}:{reply_class}"))
    if latency is not None:
        _observe_latency(pipe, queue, latency)
    bucket = bucket_of(time.time())
    names = [f"{outcome}:{queue}"]
    if campaign_id is not None:
        names.append(f"campaign:{campaign_id}:{outcome}")
    for name in names:
        pipe.incr(series_key(name, bucket))
        pipe.expire(series_key(name, bucket), SERIES_TTL_SECONDS)
    for key in read:
        pipe.get(key)
    try:
        results = pipe.execute()
    except redis.RedisError:
        logger.warning("could not record %s outcome in Redis", outcome, exc_info=True)
        return None
    return list(results[len(results) - len(read) :]) if read else []


def latency_key(queue: str) -> str:
    return f"mailroom:latency:{queue}"


def _observe_latency(pipe: redis.client.Pipeline, queue: str, seconds: float) -> None:
    """One observation of the delivery-latency histogram, kept in Redis so that every
    worker process on every host adds to the same buckets (non-cumulative here; the
    exporter makes them cumulative)."""
    from email_service.metrics import LATENCY_BUCKETS

    field = next((str(b) for b in LATENCY_BUCKETS if seconds <= b), "+Inf")
    key = latency_key(queue)
    pipe.hincrby(key, field, 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.hincrby(key, "count", 1)


def series_sum(name: str, seconds: float, now: float | None = None) -> int:
    """The total of a time-bucketed series over the last ``seconds``."""
    last = bucket_of(time.time() if now is None else now)
    first = last - max(int(seconds // SERIES_BUCKET_SECONDS), 1) + 1
    keys = [series_key(name, b) for b in range(first, last + 1)]
    try:
        values = client().mget(keys)
    except redis.RedisError:
        return 0
    return sum(int(v) for v in values if v)


def count(queue: str, outcome: str, amount: int = 1) -> None:
    """Add to a per-queue counter only (no per-address bookkeeping)."""
    try:
        client().incrby(queue_key(f"{outcome}_total", queue), amount)
    except redis.RedisError:
        logger.warning("could not count %s in Redis", outcome, exc_info=True)
