"""The figures on the dashboard are the ones the workers recorded."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
import redis
from django.db import connection
from django.test import Client

from email_service import keys, services
from email_service.dashboard import chart, figures
from email_service.models import Campaign, Message
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for
from tests.dashboard.conftest import make_campaign

REFUSED = {"bad0@example.com", "bad1@example.com", "spring0@example.com"}
SLOW = "spring1@example.com"  # answered 441: deferred, its next try minutes away
HARD_BOUNCE = "550 5.1.1 No such user here"


def _figure(html: str, name: str) -> str:
    found = re.search(rf'data-figure="{re.escape(name)}">([^<]*)<', html)
    assert found, name
    return found.group(1)


@pytest.mark.django_db(transaction=True)
def test_the_figures_match_what_the_workers_recorded(
    start_role: Callable[..., Role],
    smtp_sink: SMTPSink,
    staff_client: Client,
    redis_server: redis.Redis,
) -> None:
    # A retry base of two minutes keeps the 441 deferred for the rest of the test.
    start_role(
        "worker", queues="high_priority,bulk", concurrency=2,
        env={"MAILROOM_RETRY_BASE_SECONDS": "120"},
    )  # fmt: skip
    for address in REFUSED:
        smtp_sink.refuse_address(address, HARD_BOUNCE)
    smtp_sink.refuse_address(SLOW, "441 4.4.1 No answer from host")
    for i in range(18):
        services.send_email(to=f"ok{i}@example.com", subject="Hi", template="welcome")
    for i in range(2):
        services.send_email(to=f"bad{i}@example.com", subject="Hi", template="welcome")
    campaign = make_campaign("Spring", count=10, start=True)

    def settled() -> bool:
        done = Message.objects.filter(status__in=["sent", "failed", "deferred"]).count()
        sent, failed = redis_server.mget(keys.SENT_TOTAL, keys.FAILED_TOTAL)
        return done == 30 and (sent, failed) == (b"26", b"3")

    wait_for(settled, 90, "30 messages delivered, refused or deferred, and counted")
    assert smtp_sink.count() == 26

    data = staff_client.get("/dashboard/data").json()
    numbers = data["figures"]
    stats = numbers["stats"]
    assert (stats["sent"], stats["failed"]) == (26, 3)
    assert stats["success_rate"] == round(26 / 29, 4)
    assert stats["queues"]["high_priority"]["sent"] == 18
    assert stats["queues"]["bulk"]["sent"] == 8
    assert stats == services.delivery_stats(), "the same figures as /api/v1/stats"

    assert numbers["retrying_addresses"] == 1
    [retry] = numbers["retries"]
    assert (retry["address"], retry["retries"], retry["campaign"]) == (SLOW, 1, "Spring")
    assert redis_server.hget(keys.RETRY_COUNTS, SLOW) == b"1"
    assert retry["smtp_code"] == 441

    failures = {f["recipient"]: f for f in numbers["failures"]}
    assert set(failures) == REFUSED
    for failure in failures.values():
        assert (failure["smtp_code"], failure["attempts"]) == (550, 1)
        assert failure["reply"] == "5.1.1 No such user here"
    assert failures["spring0@example.com"]["campaign"] == "Spring"
    assert failures["bad0@example.com"]["campaign"] == ""

    [card] = numbers["campaigns"]
    assert card["id"] == str(campaign.id)
    assert card["progress"] == services.campaign_progress(campaign) | {
        "rate_per_second": card["progress"]["rate_per_second"],
        "eta_seconds": card["progress"]["eta_seconds"],
    }
    progress = card["progress"]
    assert (progress["sent"], progress["failed"], progress["remaining"]) == (8, 1, 1)
    assert Message.objects.filter(campaign=campaign, status="sent").count() == 8

    series = numbers["throughput"]
    assert (sum(series["sent"]), sum(series["failed"])) == (26, 3)

    html = data["html"]
    assert _figure(html["summary"], "sent") == "26"
    assert _figure(html["summary"], "failed") == "3"
    assert _figure(html["summary"], "success-rate") == "89.7 %"
    assert _figure(html["campaigns"], "sent") == "8"
    assert _figure(html["campaigns"], "remaining") == "1"
    assert SLOW in html["retries"]
    for address in REFUSED:
        assert address in html["failures"]

    page = staff_client.get("/dashboard/").content.decode()
    assert _figure(page, "sent") == "26"
    assert _figure(page, "workers-bulk+high_priority") == "1"
    assert "Retry failed of “Spring”" in page


@pytest.mark.django_db
def test_without_redis_the_page_still_shows_what_postgres_knows(
    staff_client: Client, redis_process
) -> None:
    campaign = make_campaign("Quiet", count=2)
    Campaign.objects.filter(id=campaign.id).update(status="paused")
    redis_process.stop()
    try:
        response = staff_client.get("/dashboard/data")
    finally:
        redis_process.start()
    assert response.status_code == 200
    numbers = response.json()["figures"]
    assert numbers["stats"] is None
    assert numbers["errors"] == ["Redis does not answer: totals, queues and workers are unknown."]
    assert [c["name"] for c in numbers["campaigns"]] == ["Quiet"]


@pytest.mark.django_db
def test_the_lists_the_data_endpoint_reads_use_their_partial_indexes() -> None:
    plans = []
    for query in (figures.recent_failures_query(), figures.retries_query()):
        sql, params = query.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {sql}", params)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
    assert "msg_failed_recent_idx" in plans[0]
    assert "Sort" not in plans[0]
    assert "msg_deferred_attempts_idx" in plans[1]
    assert "Sort" not in plans[1]


def test_the_chart_draws_rates_per_bucket_and_scales_to_a_round_number() -> None:
    now = 1_000_000.0
    size = keys.SERIES_BUCKET_SECONDS
    first = (keys.bucket_of(now) - 89) * size
    sent = [0] * 88 + [95, 3]  # the current bucket: 3 in its first 4.0 s
    series = figures.Throughput(size, float(first), first + 89 * size + 4.0, sent, [0] * 90)
    drawn = chart.draw(series)
    assert series.rates(sent)[-2:] == [9.5, 0.75]
    assert [label for _, label in drawn.y_ticks] == ["0/s", "5/s", "10/s"]
    assert drawn.sent_total == 98
    assert "98 sent, 0 failed" in drawn.description
    assert chart.nice_ceiling(0) == 1
    assert chart.nice_ceiling(11) == 20
    assert chart.nice_ceiling(2.4) == 2.5


def test_throughput_reads_the_workers_series_keys(redis_server: redis.Redis) -> None:
    now = time.time()
    bucket = keys.bucket_of(now)
    redis_server.set(keys.series_key("sent:bulk", bucket), 5)
    redis_server.set(keys.series_key("sent:high_priority", bucket), 2)
    redis_server.set(keys.series_key("failed:bulk", bucket - 1), 1)
    redis_server.set(keys.series_key("sent:bulk", bucket - 90), 100)  # too old
    series = figures.throughput(now=now)
    assert series is not None
    assert len(series.sent) == 90
    assert series.sent[-1] == 7
    assert series.failed[-2:] == [1, 0]
    assert sum(series.sent) == 7
