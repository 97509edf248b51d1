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
from collections import Counter
from typing import cast

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


class Tally:
    """A batch's outcome counters, added to Redis in one round trip per flush.

    Delivery reads the pause and campaign switches before every message, but its
    counters (totals, the retry hash, the latency histogram, the rate series) are
    flushed every FLUSH_SECONDS and when the batch ends, which keeps the per-message
    Redis work to one small read. A worker killed mid-batch loses at most the counts of
    the last flush interval; the outbox rows, the truth, lose nothing.
    """

    FLUSH_SECONDS = 0.5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.hash_counts: Counter[tuple[str, str]] = Counter()
        self.hash_sums: dict[tuple[str, str], float] = {}
        self.forget: set[str] = set()
        self.expiring: set[str] = set()
        self.flushed_at = time.monotonic()

    def add(
        self,
        queue: str,
        outcome: str,
        address: str,
        *,
        campaign_id: object = None,
        reply_class: str = "",
        latency: float | None = None,
    ) -> None:
        """Count one delivery outcome (flushed later)."""
        if outcome in (Outcome.SENT, Outcome.FAILED):
            self.counts[SENT_TOTAL if outcome == Outcome.SENT else FAILED_TOTAL] += 1
            self.forget.add(address)
        elif outcome == Outcome.RETRIED:
            self.hash_counts[(RETRY_COUNTS, address)] += 1
            self.forget.discard(address)
            if reply_class:
                self.counts[queue_key(f"{outcome}_total", f"{queue}:{reply_class}")] += 1
        self.counts[queue_key(f"{outcome}_total", queue)] += 1
        if latency is not None:
            self._observe_latency(queue, latency)
        bucket = bucket_of(time.time())
        names = [f"{outcome}:{queue}"]
        if campaign_id is not None:
            names.append(f"campaign:{campaign_id}:{outcome}")
        for name in names:
            self.counts[series_key(name, bucket)] += 1
            self.expiring.add(series_key(name, bucket))

    def _observe_latency(self, queue: str, seconds: float) -> None:
        """One observation of the delivery-latency histogram, kept in Redis so that every
        worker process on every host adds to the same buckets (non-cumulative here; the
        exporter makes them cumulative)."""
        from email_service.metrics import LATENCY_BUCKETS

        field = next((str(b) for b in LATENCY_BUCKETS if seconds <= b), "+Inf")
        key = latency_key(queue)
        self.hash_counts[(key, field)] += 1
        self.hash_counts[(key, "count")] += 1
        self.hash_sums[(key, "sum")] = self.hash_sums.get((key, "sum"), 0.0) + seconds

    def due(self) -> bool:
        return time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS

    def flush(self) -> None:
        """Add everything counted so far to Redis; errors are logged, never raised."""
        self.flushed_at = time.monotonic()
        if not (self.counts or self.hash_counts or self.hash_sums or self.forget):
            return
        pipe = client().pipeline(transaction=False)
        for key, amount in self.counts.items():
            pipe.incrby(key, amount)
        for (key, field), amount in self.hash_counts.items():
            pipe.hincrby(key, field, amount)
        for (key, field), total in self.hash_sums.items():
            pipe.hincrbyfloat(key, field, total)
        if self.forget:
            pipe.hdel(RETRY_COUNTS, *self.forget)
        for key in self.expiring:
            pipe.expire(key, SERIES_TTL_SECONDS)
        try:
            pipe.execute()
        except redis.RedisError:
            logger.warning("could not add delivery counts to Redis", exc_info=True)
        self._reset()

    def _reset(self) -> None:
        self.counts.clear()
        self.hash_counts.clear()
        self.hash_sums.clear()
        self.forget.clear()
        self.expiring.clear()


def read(keys: tuple[str, ...]) -> list[bytes | None] | None:
    """The values of ``keys`` (one round trip), or None when Redis does not answer."""
    if not keys:
        return []
    try:
        return cast(list[bytes | None], client().mget(keys))
    except redis.RedisError:
        logger.warning("could not read %s from Redis", ", ".join(keys))
        return None


def latency_key(queue: str) -> str:
    return f"mailroom:latency:{queue}"


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
