"""The dashboard's data endpoint with a million messages, against a trivial view, one run.

``GET /dashboard/data`` is what every open dashboard asks every two seconds: the delivery
totals, queue depths and workers (Redis), the throughput series (one MGET), the active
campaigns with their progress (the trigger-kept ``CampaignCount`` rows), the deferred
messages retried most and the latest failures (Postgres, partial indexes), and the live
sections rendered as HTML. The baseline is ``GET /healthz`` (a Django JSON view that
touches neither Postgres nor Redis), measured in the same run through the same stack.

Both are requested in-process through Django's test ``Client`` as a signed-in staff user,
so every middleware runs (sessions, authentication, CSRF, messages, WhiteNoise,
django-prometheus) but no socket or gunicorn is involved: the figure is the server's own
time. The two are requested alternately, one of each at a time, after a warm-up, so a
drifting machine favours neither. ``GET /dashboard/`` (the whole page, with the
suppression list) is measured the same way, for information.

The database ``mailroom_bench_dashboard`` is created, migrated and seeded once, then kept
between runs: ``--messages`` (default 1,000,000) messages inserted by ``generate_series``
in SQL, with a realistic mix (about 90 % sent, 3 % failed, 2 % deferred, 3 % queued, the
rest suppressed or cancelled) over 12 campaigns (4 sending, 1 paused, 1 scheduled, 5
completed, 1 cancelled) and transactional mail, then ``VACUUM ANALYZE``. A private
redis-server on a free port gets the counters the workers would have written (totals,
15 minutes of 10-second buckets, the retry hash, heartbeats, queue lengths).

Run ``make bench`` or ``.venv/bin/python bench/dashboard.py --help``. Remove the database
with ``dropdb -h 127.0.0.1 -U postgres mailroom_bench_dashboard``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.api import cpu_model, percentile, start_redis, stop_on_sigterm
from bench.benchlib import ensure_database, setup_django

REPO = Path(__file__).resolve().parents[1]

APP_DIR = REPO / "services" / "mailroom"
PG_URL = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "mailroom_bench_dashboard"
SEED_VERSION = 1
TARGET_P50_MS = 50.0
STAFF = "bench-dashboard"
# Campaign slots: messages with i % SLOTS < len(CAMPAIGNS) belong to that campaign, the
# rest are transactional.
SLOTS = 16
CAMPAIGNS = (
    ["sending"] * 4 + ["paused", "scheduled"] + ["completed"] * 5 + ["cancelled"]
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    label: str
    path: str


@dataclass(frozen=True)
class Timing:
    requests: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


TRIVIAL = Target("trivial Django JSON view: GET /healthz", "/healthz")
DATA = Target("dashboard data endpoint: GET /dashboard/data", "/dashboard/data")
PAGE = Target("whole dashboard page: GET /dashboard/", "/dashboard/")


# --------------------------------------------------------------------------------------
# The database: created, migrated and seeded once
# --------------------------------------------------------------------------------------


def app_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
            "REDIS_URL": redis_url,
            "SECRET_KEY": "bench",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "testserver,127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
        }
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def seed_mark(messages: int) -> str:
    return f"mailroom bench dashboard seed v{SEED_VERSION}: {messages} messages"


def seeded_with() -> str | None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT obj_description('email_service_message'::regclass, 'pg_class')")
        row = cursor.fetchone()
    return row[0] if row else None


# The status of message i: r spreads statuses evenly over the campaigns (c = i % SLOTS).
STATUS_SQL = f"""
CASE
  WHEN c = 5 THEN 'queued'
  WHEN c BETWEEN 6 AND 10 THEN
    CASE WHEN r < 960 THEN 'sent' WHEN r < 990 THEN 'failed' ELSE 'suppressed' END
  WHEN c = 11 THEN
    CASE WHEN r < 500 THEN 'sent' WHEN r < 510 THEN 'failed' ELSE 'cancelled' END
  ELSE
    CASE WHEN r < 900 THEN 'sent' WHEN r < 930 THEN 'failed' WHEN r < 950 THEN 'deferred'
         WHEN r < 980 THEN 'queued' WHEN r < 990 THEN 'suppressed'
         WHEN c < {len(CAMPAIGNS)} THEN 'cancelled' ELSE 'sent' END
END
"""

# Only constants are formatted in; the values are bound parameters.
INSERT_SQL = f"""
INSERT INTO email_service_message (
    id, queue, campaign_id, from_email, to_email, subject, template, context, status,
    attempts, next_attempt_at, dispatch_token, dispatched_at, last_smtp_code,
    last_smtp_reply, status_reason, message_id_header, created_at, updated_at, sent_at)
SELECT gen_random_uuid(),
       CASE WHEN c < {len(CAMPAIGNS)} THEN 'bulk' ELSE 'high_priority' END,
       (%(campaigns)s::uuid[])[c + 1],
       'Mailroom <noreply@mailroom.example.com>', 'user' || i || '@example.com',
       'Hello', 'newsletter', jsonb_build_object('name', 'User ' || i), status,
       CASE status WHEN 'sent' THEN 1 + (r %% 3 = 0)::int WHEN 'failed' THEN 1 + r %% 6
                   WHEN 'deferred' THEN 1 + r %% 5 ELSE 0 END,
       CASE WHEN status = 'deferred' THEN now() + (r %% 600) * interval '1 second' END,
       '', CASE WHEN status <> 'queued' OR c <> 5 THEN at END,
       CASE status WHEN 'sent' THEN 250 WHEN 'failed' THEN 550 WHEN 'deferred' THEN 451 END,
       CASE status WHEN 'sent' THEN '2.0.0 OK queued' WHEN 'failed' THEN '5.1.1 No such user'
                   WHEN 'deferred' THEN '4.7.1 Try again later' ELSE '' END,
       '', '<' || i || '@mailroom.example.com>', at, at + interval '5 seconds',
       CASE WHEN status = 'sent' THEN at + interval '5 seconds' END
  FROM (SELECT i, c, r, {STATUS_SQL} AS status,
               now() - (%(total)s - i) * interval '2 seconds' AS at
          FROM (SELECT i, i %% {SLOTS} AS c, (i * 7919) %% 1000 AS r
                  FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i) AS n) AS s
"""  # noqa: S608


def seed_database(messages: int, chunk: int = 200_000) -> None:
    """Empty the outbox, then insert the campaigns and ``messages`` messages."""
    from datetime import timedelta

    from django.db import connection, transaction
    from django.utils import timezone

    from email_service.models import Campaign, CampaignCount, DeliveryAttempt, Message

    tables = [m._meta.db_table for m in (DeliveryAttempt, CampaignCount, Message, Campaign)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    started = time.monotonic()
    now = timezone.now()
    with transaction.atomic():
        campaigns = [
            Campaign.objects.create(
                name=f"Bench campaign {n + 1} ({status})",
                subject="Hello {{ name }}",
                template="newsletter",
                from_email="Mailroom <noreply@mailroom.example.com>",
                status=status,
                send_at=now + timedelta(days=1) if status == "scheduled" else None,
                started_at=None if status == "scheduled" else now - timedelta(days=n + 1),
            )
            for n, status in enumerate(CAMPAIGNS)
        ]
        ids = [str(c.id) for c in campaigns] + [None] * (SLOTS - len(campaigns))
        with connection.cursor() as cursor:
            for first in range(1, messages + 1, chunk):
                last = min(first + chunk - 1, messages)
                params: dict[str, Any] = {
                    "campaigns": ids,
                    "total": messages,
                    "first": first,
                    "last": last,
                }
                cursor.execute(INSERT_SQL, params)
                print(f"seeded {last:,} / {messages:,} messages", file=sys.stderr)
            cursor.execute(f"COMMENT ON TABLE email_service_message IS '{seed_mark(messages)}'")
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    print(f"seeded in {time.monotonic() - started:.0f} s", file=sys.stderr)


def status_mix() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT status, count(*) FROM email_service_message GROUP BY status")
        return dict(sorted(cursor.fetchall()))


# --------------------------------------------------------------------------------------
# Redis: what the workers would have written
# --------------------------------------------------------------------------------------


def seed_redis(rng: random.Random) -> None:
    from email_service import keys, redisstore
    from email_service.models import Campaign, Message

    client = redisstore.client()
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    sent = {"bulk": 850_000, "high_priority": 60_000}
    failed = {"bulk": 28_000, "high_priority": 2_000}
    for queue in ("bulk", "high_priority"):
        pipe.set(keys.counter_key("sent", queue), sent[queue])
        pipe.set(keys.counter_key("failed", queue), failed[queue])
        pipe.set(keys.counter_key("suppressed", queue), 9_000)
    pipe.set(keys.SENT_TOTAL, sum(sent.values()))
    pipe.set(keys.FAILED_TOTAL, sum(failed.values()))
    pipe.set(keys.BULK_PAUSE, "0")
    now_bucket = keys.bucket_of(time.time())
    sending = [
        str(c) for c in Campaign.objects.filter(status="sending").values_list("id", flat=True)
    ]
    for bucket in range(now_bucket - 95, now_bucket + 1):
        for name, low, high in (
            ("sent:bulk", 800, 1_200),
            ("failed:bulk", 0, 30),
            ("sent:high_priority", 50, 150),
            ("failed:high_priority", 0, 3),
        ):
            pipe.set(keys.series_key(name, bucket), rng.randint(low, high), ex=3600)
        for campaign_id in sending:
            pipe.set(keys.series_key(f"campaign:{campaign_id}:sent", bucket), 250, ex=3600)
    for n in range(4):
        pipe.set(f"mailroom:worker:bulk:bulk-{n}@bench", "1", ex=3600)
    for n in range(2):
        pipe.set(f"mailroom:worker:high_priority:high-{n}@bench", "1", ex=3600)
    pipe.rpush("bulk", *[b"{}"] * 40)
    pipe.rpush("high_priority", b"{}", b"{}")
    pipe.execute()
    deferred = Message.objects.filter(status="deferred").values_list("to_email", "attempts")
    batch: dict[str, int] = {}
    for address, attempts in deferred.iterator(chunk_size=10_000):
        batch[address] = attempts
        if len(batch) == 10_000:
            client.hset(keys.RETRY_COUNTS, mapping=batch)  # type: ignore[arg-type]
            batch.clear()
    if batch:
        client.hset(keys.RETRY_COUNTS, mapping=batch)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Measure
# --------------------------------------------------------------------------------------


def staff_client() -> Any:
    from django.contrib.auth.models import User
    from django.test import Client

    user, _ = User.objects.get_or_create(username=STAFF, defaults={"is_staff": True})
    client = Client()
    client.force_login(user)
    return client


def fetch(client: Any, target: Target) -> float:
    """One request; its time in seconds. Anything but a 200 stops the benchmark."""
    began = time.perf_counter()
    response = client.get(target.path)
    elapsed = time.perf_counter() - began
    if response.status_code != 200:
        raise RuntimeError(f"{target.path} answered {response.status_code}")
    return elapsed


def timing(samples: list[float]) -> Timing:
    ordered = sorted(samples)
    return Timing(
        requests=len(ordered),
        p50_ms=percentile(ordered, 0.50) * 1000,
        p99_ms=percentile(ordered, 0.99) * 1000,
        mean_ms=statistics.fmean(ordered) * 1000,
    )


def measure_all(client: Any, targets: list[Target], requests: int, warmup: int) -> list[Timing]:
    """Round-robin over ``targets`` (the order rotates every round)."""
    samples: list[list[float]] = [[] for _ in targets]
    for round_number in range(warmup + requests):
        for offset in range(len(targets)):
            index = (round_number + offset) % len(targets)
            elapsed = fetch(client, targets[index])
            if round_number >= warmup:
                samples[index].append(elapsed)
    return [timing(s) for s in samples]


def queries_per_request(client: Any, target: Target) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        fetch(client, target)
    return len(captured.captured_queries)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def row(target: Target, result: Timing, baseline: Timing) -> str:
    return (
        f"| {target.label} | {result.requests:,} | {result.p50_ms:.1f} | {result.p99_ms:.1f} "
        f"| {result.mean_ms:.1f} | {result.p50_ms / baseline.p50_ms:.1f} |"
    )


def report(results: dict[str, Timing], facts: dict[str, Any]) -> str:
    trivial, data, page = results["trivial"], results["data"], results["page"]
    verdict = "meets" if data.p50_ms < TARGET_P50_MS else "MISSES"
    mix = ", ".join(f"{status} {count:,}" for status, count in facts["status_mix"].items())
    lines = [
        f"## Dashboard data endpoint with {facts['messages']:,} messages vs a trivial view",
        "",
        "| request | requests | p50 ms | p99 ms | mean ms | p50 ratio vs trivial |",
        "|---|---:|---:|---:|---:|---:|",
        row(TRIVIAL, trivial, trivial),
        row(DATA, data, trivial),
        row(PAGE, page, trivial),
        "",
        f"p50 of the data endpoint {data.p50_ms:.1f} ms: {verdict} the target < "
        f"{TARGET_P50_MS:.0f} ms. SQL queries per data request: "
        f"{facts['queries_per_data_request']} (session and user included).",
        f"Outbox: {mix}.",
        f"Machine: {facts['cpu_count']} CPU(s) ({facts['cpu']}), {facts['system']}, Python "
        f"{facts['python']}. In-process Django test Client as a staff user, every middleware; "
        f"requests alternate between the three after {facts['warmup']} warm-up rounds.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages seeded")
    parser.add_argument("--requests", type=int, default=300, help="measured requests each")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured rounds first")
    parser.add_argument("--reseed", action="store_true", help="seed again even if seeded")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.messages, args.requests) < 1 or args.warmup < 0:
        parser.error("--messages and --requests must be at least 1, --warmup not negative")
    return args


def measure(args: argparse.Namespace, logs: Path) -> tuple[dict[str, Timing], dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        env = app_env(start_redis(stack, logs))
        ensure_database(DB_NAME, env)
        setup_django(env)
        if args.reseed or seeded_with() != seed_mark(args.messages):
            seed_database(args.messages)
        seed_redis(random.Random(5))
        client = staff_client()
        targets = [TRIVIAL, DATA, PAGE]
        trivial, data, page = measure_all(client, targets, args.requests, args.warmup)
        facts = {
            "messages": args.messages,
            "status_mix": status_mix(),
            "queries_per_data_request": queries_per_request(client, DATA),
            "cpu_count": os.cpu_count(),
            "cpu": cpu_model(),
            "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "warmup": args.warmup,
        }
        return {"trivial": trivial, "data": data, "page": page}, facts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="mailroom-bench-dashboard-"))
    try:
        results, facts = measure(args, logs)
    except KeyboardInterrupt:
        print("benchmark interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    except Exception:
        print(f"benchmark failed; logs kept in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    print(report(results, facts))
    if args.json:
        figures = {name: asdict(t) for name, t in results.items()}
        ratio = results["data"].p50_ms / results["trivial"].p50_ms
        payload = {"facts": facts, **figures, "data_p50_ratio": ratio, "target_p50_ms": 50.0}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
