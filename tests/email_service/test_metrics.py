"""GET /metrics: Mailroom's families read from Redis and Postgres, in one exposition.

The tests write the Redis keys directly, as the workers do: the key names are the
contract between the worker side and this endpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import redis
from django.test import Client, override_settings
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from email_service import keys, metrics, ratelimit, services
from email_service.models import Campaign, Queue
from mailroom_testkit.processes import RedisServer

pytestmark = pytest.mark.django_db

BULK = "bulk"
HIGH = "high_priority"
ADDRESS = "alice@example.com"
TOKEN = "s3cret-scrape-token"

# Every label a mailroom_* metric may carry, and for each the only values it may take.
ALLOWED_LABELS: dict[str, set[str]] = {
    "queue": set(Queue.values),
    "reply_class": {"4xx", "5xx", "network"},
    "status": set(Campaign.Status.values),
    "period": {"second", "hour", "day"},
    "pool": {"high_priority", "bulk", "bulk+high_priority"},
    "le": {*(str(b) for b in keys.LATENCY_BUCKETS), "+Inf"},
}


def scrape(client: Client, **headers: str) -> dict[str, Metric]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {f.name: f for f in text_string_to_metric_families(response.content.decode())}


def sample(families: dict[str, Metric], family: str, name: str = "", **labels: str) -> float:
    """The value of the one sample of ``family`` named ``name`` with exactly ``labels``."""
    found = [
        s.value
        for s in families[family].samples
        if s.name == (name or family) and s.labels == labels
    ]
    assert len(found) == 1, (family, name, labels, families[family].samples)
    return found[0]


def mailroom_samples(families: dict[str, Metric]) -> Iterator[tuple[str, dict[str, str]]]:
    for family in families.values():
        if family.name.startswith("mailroom_"):
            for s in family.samples:
                yield s.name, s.labels


def observe(r: redis.Redis, queue: str, seconds: float) -> None:
    """One latency observation, written as the worker side does."""
    field = next((str(b) for b in keys.LATENCY_BUCKETS if seconds <= b), "+Inf")
    r.hincrby(keys.latency_key(queue), field, 1)
    r.hincrby(keys.latency_key(queue), "count", 1)
    r.hincrbyfloat(keys.latency_key(queue), "sum", seconds)


def realistic_data(r: redis.Redis) -> None:
    """Everything the workers write, plus address-bearing keys that must stay out."""
    for queue in Queue.values:
        for outcome in ("sent", "failed", "suppressed"):
            r.set(keys.counter_key(outcome, queue), 3)
        for reply_class in ("4xx", "5xx", "network"):
            r.set(keys.retried_key(queue, reply_class), 2)
        r.set(keys.connections_key(queue), 4)
        r.rpush(queue, "task-1", "task-2")
        for seconds in (0.01, 0.3, 7, 4000):
            observe(r, queue, seconds)
    r.set(f"mailroom:worker:bulk:bulk@{ADDRESS}", 1)
    r.set("mailroom:worker:high_priority:high@host-1", 1)
    r.set("mailroom:worker:bulk+high_priority:w@host-2", 1)
    # Keys that look like the contract but carry an address or an unknown name.
    r.set(f"mailroom:sent_total:{ADDRESS}", 9)
    r.set(f"mailroom:retried_total:bulk:{ADDRESS}", 9)
    r.set(f"mailroom:worker:{ADDRESS}:x", 1)
    r.hset(f"mailroom:latency:{ADDRESS}", "1.0", 9)
    r.hset("email_retry_counts", ADDRESS, 2)
    r.set("email_sent_total", 5)
    r.set(ratelimit.WAITS_KEY, 6)


def test_counters_come_from_the_redis_keys(client: Client, redis_server: redis.Redis) -> None:
    redis_server.set("mailroom:sent_total:high_priority", 12)
    redis_server.set("mailroom:sent_total:bulk", 3400)
    redis_server.set("mailroom:failed_total:bulk", 7)
    redis_server.set("mailroom:suppressed_total:bulk", 5)
    redis_server.set("mailroom:retried_total:high_priority:4xx", 2)
    redis_server.set("mailroom:retried_total:bulk:network", 9)
    redis_server.set("mailroom:smtp_connections_total:bulk", 35)
    families = scrape(client)
    sent = "mailroom_emails_sent"
    assert sample(families, sent, "mailroom_emails_sent_total", queue=HIGH) == 12
    assert sample(families, sent, "mailroom_emails_sent_total", queue=BULK) == 3400
    failed = ("mailroom_emails_failed", "mailroom_emails_failed_total")
    assert sample(families, *failed, queue=BULK) == 7
    assert sample(families, *failed, queue=HIGH) == 0
    suppressed = ("mailroom_emails_suppressed", "mailroom_emails_suppressed_total")
    assert sample(families, *suppressed, queue=BULK) == 5
    retried = ("mailroom_emails_retried", "mailroom_emails_retried_total")
    assert sample(families, *retried, queue=HIGH, reply_class="4xx") == 2
    assert sample(families, *retried, queue=BULK, reply_class="network") == 9
    assert sample(families, *retried, queue=BULK, reply_class="5xx") == 0
    connections = ("mailroom_smtp_connections_opened", "mailroom_smtp_connections_opened_total")
    assert sample(families, *connections, queue=BULK) == 35
    assert families["mailroom_emails_sent"].type == "counter"


def test_latency_histogram_is_cumulative(client: Client, redis_server: redis.Redis) -> None:
    for seconds in (0.03, 0.04, 0.2, 0.2, 3.0, 5000.0):
        observe(redis_server, HIGH, seconds)
    families = scrape(client)
    name = "mailroom_delivery_latency_seconds"
    assert families[name].type == "histogram"
    expected = {"0.05": 2, "0.1": 2, "0.25": 4, "0.5": 4, "1.0": 4, "2.5": 4, "5.0": 5}
    expected |= {"3600.0": 5, "+Inf": 6}
    for le, count in expected.items():
        assert sample(families, name, f"{name}_bucket", queue=HIGH, le=le) == count, le
    assert sample(families, name, f"{name}_count", queue=HIGH) == 6
    assert sample(families, name, f"{name}_sum", queue=HIGH) == pytest.approx(5003.47)
    assert sample(families, name, f"{name}_count", queue=BULK) == 0
    buckets = [s.value for s in families[name].samples if s.name.endswith("_bucket")]
    assert len(buckets) == 2 * (len(keys.LATENCY_BUCKETS) + 1)


def test_queue_depth_and_workers_online(client: Client, redis_server: redis.Redis) -> None:
    redis_server.rpush(BULK, "a", "b", "c")
    redis_server.set("mailroom:worker:bulk:bulk@host-1", 1)
    redis_server.set("mailroom:worker:bulk:bulk@host-2", 1)
    redis_server.set("mailroom:worker:bulk+high_priority:both@host-3", 1)
    redis_server.set("mailroom:worker:nonsense:x@host-4", 1)
    families = scrape(client)
    assert sample(families, "mailroom_queue_depth", queue=BULK) == 3
    assert sample(families, "mailroom_queue_depth", queue=HIGH) == 0
    assert sample(families, "mailroom_workers_online", pool="bulk") == 2
    assert sample(families, "mailroom_workers_online", pool="high_priority") == 0
    assert sample(families, "mailroom_workers_online", pool="bulk+high_priority") == 1


def test_campaigns_by_status_and_bulk_pause(client: Client, redis_server: redis.Redis) -> None:
    Campaign.objects.create(name="a", status=Campaign.Status.SENDING)
    Campaign.objects.create(name="b", status=Campaign.Status.SENDING)
    Campaign.objects.create(name="c", status=Campaign.Status.DRAFT)
    families = scrape(client)
    assert sample(families, "mailroom_campaigns", status="sending") == 2
    assert sample(families, "mailroom_campaigns", status="draft") == 1
    for status in ("scheduled", "paused", "completed", "cancelled"):
        assert sample(families, "mailroom_campaigns", status=status) == 0
    assert sample(families, "mailroom_bulk_paused") == 0
    services.pause_bulk()
    assert sample(scrape(client), "mailroom_bulk_paused") == 1


def test_rate_limiter(client: Client, redis_server: redis.Redis) -> None:
    with override_settings(MAILROOM_RATE_RESERVED_TRANSACTIONAL=0.1):
        ratelimit.set_limits(per_second=10, per_day=100_000)
        redis_server.set(ratelimit.WAITS_KEY, 6)
        families = scrape(client)
    assert sample(families, "mailroom_ratelimit_limit", period="second") == 10
    assert sample(families, "mailroom_ratelimit_limit", period="hour") == 0
    assert sample(families, "mailroom_ratelimit_limit", period="day") == 100_000
    assert sample(families, "mailroom_ratelimit_throttle_factor") == 1.0
    assert sample(families, "mailroom_ratelimit_bulk_rate_per_second") == pytest.approx(
        100_000 / 86400 * 0.9
    )
    waits = ("mailroom_ratelimit_waits", "mailroom_ratelimit_waits_total")
    assert sample(families, *waits) == 6
    assert sample(families, "mailroom_scrape_errors") == 0


def test_token_is_required_when_set(client: Client) -> None:
    with override_settings(MAILROOM_METRICS_TOKEN=TOKEN):
        missing = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        basic = client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"})
        for response in (missing, wrong, basic):
            assert response.status_code == 401
            assert response["WWW-Authenticate"].startswith("Bearer")
            assert b"mailroom_" not in response.content
        assert "mailroom_emails_sent" in scrape(client, Authorization=f"Bearer {TOKEN}")
    assert client.get("/metrics").status_code == 200  # unset: open


def test_get_only(client: Client) -> None:
    assert client.post("/metrics").status_code == 405
    assert client.put("/metrics").status_code == 405


def test_one_exposition_with_django_prometheus(client: Client) -> None:
    client.get("/healthz")
    families = scrape(client)
    assert "django_http_requests_total_by_method" in families
    assert "mailroom_emails_sent" in families


def test_labels_are_bounded(client: Client, redis_server: redis.Redis) -> None:
    """No mailroom_* label outside the allow-list, no value outside its finite set."""
    realistic_data(redis_server)
    Campaign.objects.create(name=f"to {ADDRESS}", status=Campaign.Status.SENDING)
    services.pause_bulk()
    ratelimit.set_limits(per_hour=5000)
    seen: set[str] = set()
    for name, labels in mailroom_samples(scrape(client)):
        for label, value in labels.items():
            assert label in ALLOWED_LABELS, f"{name} has unbounded label {label}={value!r}"
            assert value in ALLOWED_LABELS[label], f"{name}: {label}={value!r} not allowed"
            assert "@" not in value
            seen.add(label)
    assert seen == set(ALLOWED_LABELS)  # every kind of label was exercised


def test_redis_down_never_fails_the_scrape(
    client: Client, redis_server: redis.Redis, redis_process: RedisServer
) -> None:
    redis_server.set("mailroom:sent_total:bulk", 3)
    Campaign.objects.create(name="a", status=Campaign.Status.SENDING)
    redis_process.stop()
    try:
        families = scrape(client)
    finally:
        redis_process.start()
    assert "mailroom_emails_sent" not in families  # no zeros that look like a reset
    assert "mailroom_workers_online" not in families
    assert sample(families, "mailroom_campaigns", status="sending") == 1
    assert sample(families, "mailroom_bulk_paused") == 0  # from Postgres
    assert sample(families, "mailroom_scrape_errors") == 3


def test_module_reimports_and_registries_are_independent() -> None:
    importlib.reload(metrics)
    first, second = metrics.build_registry(), metrics.build_registry()
    assert first is not second
    assert list(keys.LATENCY_BUCKETS) == sorted(set(keys.LATENCY_BUCKETS))
