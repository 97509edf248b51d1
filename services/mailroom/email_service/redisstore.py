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

from email_service import keys

logger = logging.getLogger(__name__)

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
            self.counts[keys.SENT_TOTAL if outcome == Outcome.SENT else keys.FAILED_TOTAL] += 1
            self.forget.add(address)
        elif outcome == Outcome.RETRIED:
            self.hash_counts[(keys.RETRY_COUNTS, address)] += 1
            self.forget.discard(address)
            if reply_class:
                self.counts[keys.retried_key(queue, reply_class)] += 1
        self.counts[keys.counter_key(outcome, queue)] += 1
        if latency is not None:
            self._observe_latency(queue, latency)
        bucket = keys.bucket_of(time.time())
        names = [f"{outcome}:{queue}"]
        if campaign_id is not None:
            names.append(f"campaign:{campaign_id}:{outcome}")
        for name in names:
            self.counts[keys.series_key(name, bucket)] += 1
            self.expiring.add(keys.series_key(name, bucket))

    def _observe_latency(self, queue: str, seconds: float) -> None:
        """One observation of the delivery-latency histogram, kept in Redis so that every
        worker process on every host adds to the same buckets (non-cumulative here; the
        exporter makes them cumulative)."""
        field = keys.latency_bucket(seconds)
        key = keys.latency_key(queue)
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
            pipe.hdel(keys.RETRY_COUNTS, *self.forget)
        for key in self.expiring:
            pipe.expire(key, keys.SERIES_TTL_SECONDS)
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


def read(names: tuple[str, ...]) -> list[bytes | None] | None:
    """The values of the keys ``names`` (one round trip), or None when Redis does not
    answer."""
    if not names:
        return []
    try:
        return cast(list[bytes | None], client().mget(names))
    except redis.RedisError:
        logger.warning("could not read %s from Redis", ", ".join(names))
        return None


def series_sum(name: str, seconds: float, now: float | None = None) -> int:
    """The total of a time-bucketed series over the last ``seconds``."""
    last = keys.bucket_of(time.time() if now is None else now)
    first = last - max(int(seconds // keys.SERIES_BUCKET_SECONDS), 1) + 1
    names = [keys.series_key(name, b) for b in range(first, last + 1)]
    try:
        values = client().mget(names)
    except redis.RedisError:
        return 0
    return sum(int(v) for v in values if v)


def count(queue: str, outcome: str, amount: int = 1) -> None:
    """Add to a per-queue counter only (no per-address bookkeeping)."""
    try:
        client().incrby(keys.counter_key(outcome, queue), amount)
    except redis.RedisError:
        logger.warning("could not count %s in Redis", outcome, exc_info=True)
