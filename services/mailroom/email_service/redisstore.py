"""Everything Mailroom keeps in Redis: counters, the pause mirror, dispatch tokens.

Redis is never the only copy of anything that matters. Counters are operational
figures; the pause switch is mirrored from Postgres; dispatch tokens only tell the
sweeper which queued rows still have a task in flight. A flushed Redis delays mail,
it never loses it.
"""

from __future__ import annotations

import functools
import logging

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


def record_outcome(queue: str, outcome: str, address: str, *, read_pause: bool) -> bytes | None:
    """Count one delivery outcome; in the same round trip, read the bulk pause mirror.

    Returns the raw pause value when ``read_pause`` (None if missing or unreadable).
    Counting must never stop delivery, so Redis errors are logged and swallowed.
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
    if read_pause:
        pipe.get(BULK_PAUSE)
    try:
        results = pipe.execute()
    except redis.RedisError:
        logger.warning("could not record %s outcome in Redis", outcome, exc_info=True)
        return None
    return results[-1] if read_pause else None


def count(queue: str, outcome: str, amount: int = 1) -> None:
    """Add to a per-queue counter only (no per-address bookkeeping)."""
    try:
        client().incrby(queue_key(f"{outcome}_total", queue), amount)
    except redis.RedisError:
        logger.warning("could not count %s in Redis", outcome, exc_info=True)
