"""Mailroom's own Prometheus metrics, read from Redis and Postgres at scrape time.

Workers on any number of hosts write plain Redis counters (the key names below are the
contract with them); the web role turns them into metric families on every scrape, so
the figures are exact however many processes wrote them, and no multiprocess mode is
needed for them. Every label value comes from a fixed set (queues, reply classes,
campaign statuses, pools, periods): nothing read from a key name or a value ever
becomes a label, so an address in Redis can never reach Prometheus.

Failure: each source (the Redis counters, the worker registry, the pause switch, the
campaigns, the rate limiter) is read on its own. A source that fails is left out of
the scrape (no zeros that would look like counter resets), it is logged, and
``mailroom_scrape_errors`` counts the sources missing from this scrape. A scrape
never fails because Redis or Postgres is down.

Importing this module has no side effects (the worker side imports
:data:`LATENCY_BUCKETS` from here): the registry is built by :func:`build_registry`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis
from django.db import DatabaseError
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from email_service.keys import (
    INF,
    LATENCY_BUCKETS,
    QUEUES,
    WORKER_PATTERN,
    connections_key,
    counter_key,
    latency_field,
    latency_key,
    retried_key,
)

logger = logging.getLogger(__name__)

REPLY_CLASSES: tuple[str, ...] = ("4xx", "5xx", "network")
POOLS: tuple[str, ...] = ("high_priority", "bulk", "bulk+high_priority")
PERIODS: tuple[str, ...] = ("second", "hour", "day")
OUTCOMES: tuple[str, ...] = ("sent", "failed", "suppressed")


# --------------------------------------------------------------------------------------
# Redis counters: one pipeline
# --------------------------------------------------------------------------------------


def _redis_reads(pipe: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Queue every read on ``pipe``; return (what, labels) in the same order."""
    reads: list[tuple[str, tuple[str, ...]]] = []
    for queue in QUEUES:
        for outcome in OUTCOMES:
            pipe.get(counter_key(outcome, queue))
            reads.append((outcome, (queue,)))
        for reply_class in REPLY_CLASSES:
            pipe.get(retried_key(queue, reply_class))
            reads.append(("retried", (queue, reply_class)))
        pipe.get(connections_key(queue))
        reads.append(("connections", (queue,)))
        pipe.hgetall(latency_key(queue))
        reads.append(("latency", (queue,)))
        pipe.llen(queue)
        reads.append(("depth", (queue,)))
    return reads


def read_redis(client: redis.Redis) -> dict[str, dict[tuple[str, ...], Any]]:
    """Every counter, histogram and queue length, in one round trip."""
    pipe = client.pipeline(transaction=False)
    reads = _redis_reads(pipe)
    values = pipe.execute()
    found: dict[str, dict[tuple[str, ...], Any]] = {}
    for (what, labels), value in zip(reads, values, strict=True):
        found.setdefault(what, {})[labels] = value
    return found


def _number(raw: object) -> float:
    """A Redis value as a number; missing or garbled counts as 0."""
    if raw is None:
        return 0.0
    try:
        return float(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return 0.0


def _counter(
    name: str, doc: str, labels: Sequence[str], values: Mapping[tuple[str, ...], Any]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for label_values, raw in values.items():
        family.add_metric(list(label_values), _number(raw))
    return family


def cumulative_buckets(raw: Mapping[bytes, bytes]) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (cumulative, ``+Inf`` last) and the sum from the latency hash.

    ``+Inf`` is the larger of the buckets' total and the ``count`` field, so the buckets
    stay monotonic even if a scrape falls between a worker's writes.
    """
    fields = {key.decode(): value for key, value in raw.items()}
    buckets: list[tuple[str, float]] = []
    running = 0.0
    for bound in LATENCY_BUCKETS:
        running += _number(fields.get(latency_field(bound)))
        buckets.append((floatToGoString(bound), running))
    running += _number(fields.get(INF))
    buckets.append((INF, max(running, _number(fields.get("count")))))
    return buckets, _number(fields.get("sum"))


def _latency(values: Mapping[tuple[str, ...], Any]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "mailroom_delivery_latency_seconds",
        "Seconds from acceptance by Mailroom to acceptance by the SMTP relay.",
        labels=["queue"],
    )
    for labels, raw in values.items():
        buckets, total = cumulative_buckets(raw)
        family.add_metric(list(labels), buckets, total)
    return family


def redis_families(found: dict[str, dict[tuple[str, ...], Any]]) -> Iterator[Metric]:
    """The families built from :func:`read_redis`."""
    for outcome, doc in (
        ("sent", "Emails accepted by the SMTP relay."),
        ("failed", "Emails that failed for good."),
        ("suppressed", "Emails not sent because the address is suppressed."),
    ):
        yield _counter(f"mailroom_emails_{outcome}", doc, ["queue"], found[outcome])
    yield _counter(
        "mailroom_emails_retried",
        "Deliveries deferred for a retry, by the kind of reply that caused it.",
        ["queue", "reply_class"],
        found["retried"],
    )
    yield _latency(found["latency"])
    yield _counter(
        "mailroom_smtp_connections_opened",
        "SMTP connections opened to the relay.",
        ["queue"],
        found["connections"],
    )
    depth = GaugeMetricFamily(
        "mailroom_queue_depth", "Tasks waiting in the Celery queue.", labels=["queue"]
    )
    for labels, raw in found["depth"].items():
        depth.add_metric(list(labels), _number(raw))
    yield depth


# --------------------------------------------------------------------------------------
# The other sources
# --------------------------------------------------------------------------------------


def workers_online(client: redis.Redis) -> dict[str, int]:
    """Live worker keys per pool (``mailroom:worker:<pool>:*``), by SCAN; unknown pools
    are ignored."""
    counts = dict.fromkeys(POOLS, 0)
    for key in client.scan_iter(match=WORKER_PATTERN, count=500):
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        parts = text.split(":", 3)
        if len(parts) == 4 and parts[2] in counts:
            counts[parts[2]] += 1
    return counts


def _workers(client: redis.Redis) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "mailroom_workers_online", "Workers alive, by pool.", labels=["pool"]
    )
    for pool, count in workers_online(client).items():
        family.add_metric([pool], count)
    yield family


def _paused() -> Iterator[Metric]:
    from email_service import switches

    yield GaugeMetricFamily(
        "mailroom_bulk_paused", "1 while bulk sending is paused.", int(switches.is_bulk_paused())
    )


def _campaigns() -> Iterator[Metric]:
    from django.db.models import Count

    from email_service.models import Campaign

    counts = dict.fromkeys(Campaign.Status.values, 0)
    rows = Campaign.objects.values_list("status").annotate(n=Count("id")).order_by()
    for status, n in rows:
        if status in counts:
            counts[status] = n
    family = GaugeMetricFamily("mailroom_campaigns", "Campaigns by status.", labels=["status"])
    for status, n in counts.items():
        family.add_metric([status], n)
    yield family


def _ratelimit() -> Iterator[Metric]:
    from email_service import ratelimit

    status = ratelimit.status()
    limits = status["limits"]
    assert isinstance(limits, dict)
    family = GaugeMetricFamily(
        "mailroom_ratelimit_limit", "Sends allowed per period (0 = no limit).", labels=["period"]
    )
    for period in PERIODS:
        family.add_metric([period], float(limits[f"per_{period}"]))
    yield family
    if status["redis"] != "ok":
        raise redis.ConnectionError("rate limiter state unreadable")
    yield GaugeMetricFamily(
        "mailroom_ratelimit_throttle_factor",
        "Share of bulk's allowance in use after throttling replies (1.0 = full).",
        _number(status["throttle_factor"]),
    )
    yield GaugeMetricFamily(
        "mailroom_ratelimit_bulk_rate_per_second",
        "Bulk's sustained rate after reserve and throttle (0 = unlimited).",
        _number(status["effective_bulk_rate"]),
    )
    yield CounterMetricFamily(
        "mailroom_ratelimit_waits",
        "Bulk token requests refused by the rate limiter.",
        _number(status["waits_total"]),
    )


# --------------------------------------------------------------------------------------
# The collector
# --------------------------------------------------------------------------------------


Source = Callable[[], Iterable[Metric]]


class MailroomCollector(Collector):
    """Reads Redis and Postgres on every scrape; see the module docstring."""

    def __init__(self, client: Callable[[], redis.Redis] | None = None) -> None:
        self._client = client

    def _redis(self) -> redis.Redis:
        if self._client is not None:
            return self._client()
        from email_service import redisstore

        return redisstore.client()

    def _sources(self) -> list[tuple[str, Source]]:
        return [
            ("redis counters", lambda: redis_families(read_redis(self._redis()))),
            ("workers", lambda: _workers(self._redis())),
            ("bulk pause", _paused),
            ("campaigns", _campaigns),
            ("rate limiter", _ratelimit),
        ]

    def collect(self) -> Iterable[Metric]:
        """Every family whose source answered, then ``mailroom_scrape_errors``."""
        errors = 0
        redis_down = False
        for name, source in self._sources():
            if redis_down and name in ("workers", "rate limiter"):
                errors += 1  # Not worth a second timeout: Redis just failed.
                continue
            families: list[Metric] = []
            try:
                for family in source():
                    families.append(family)
            except (redis.RedisError, DatabaseError, OSError, ValueError) as exc:
                # What was read before the failure is still exported.
                logger.warning("metrics: cannot read %s", name, exc_info=True)
                errors += 1
                redis_down = redis_down or isinstance(exc, redis.RedisError)
            yield from families
        yield GaugeMetricFamily(
            "mailroom_scrape_errors",
            "Sources (Redis counters, workers, bulk pause, campaigns, rate limiter)"
            " that could not be read in this scrape; their families are left out.",
            errors,
        )


def build_registry() -> CollectorRegistry:
    """A fresh registry holding only :class:`MailroomCollector` (nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MailroomCollector())
    return registry
