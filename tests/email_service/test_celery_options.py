"""``apply_async`` keeps Celery's meaning: countdown and eta (not sent before), expires
(cancelled unsent), queue, task_id; what it cannot honour is a TypeError.

Against a real worker and beat where delivery is the point; the scheduling rules
themselves (what the sweeper enqueues when) are read straight off the Redis queues.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from django.test import Client, override_settings
from django.utils import timezone

from email_service import outbox, services
from email_service.models import Message
from email_service.tasks import send_bulk_email_batch, send_high_priority_email
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ARGS = ("ann@example.com", "Hello", {"name": "Ann"}, "welcome")


def _queued_ids(r: redis.Redis, queue: str = "high_priority") -> list[str]:
    ids: list[str] = []
    for raw in r.lrange(queue, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.extend(body[0][0])
    return ids


# --------------------------------------------------------------------------------------
# Against a worker: what the recipient sees
# --------------------------------------------------------------------------------------


def test_countdown_delays_the_send_until_then(running_worker: Role, smtp_sink: SMTPSink) -> None:
    before, started = time.time(), time.monotonic()  # the sink stamps monotonic time
    result = send_high_priority_email.apply_async(ARGS, countdown=3)

    [message] = Message.objects.filter(id__in=result.message_ids)
    assert message.next_attempt_at is not None
    assert message.next_attempt_at.timestamp() == pytest.approx(before + 3, abs=1)
    wait_for(lambda: smtp_sink.count() == 1, 30, "the delayed email")
    assert smtp_sink.received[0].at >= started + 3 - 0.1
    assert Message.objects.get(id=message.id).status == Message.Status.SENT


@override_settings(MAILROOM_MAX_COUNTDOWN_SECONDS=1)
def test_an_eta_beyond_the_countdown_horizon_is_picked_up_by_the_sweeper_on_time(
    start_role: Callable[..., Role], smtp_sink: SMTPSink, redis_server: redis.Redis
) -> None:
    start_role("worker", queues="high_priority,bulk", concurrency=2)
    start_role("beat")
    eta, due = datetime.now(UTC) + timedelta(seconds=4), time.monotonic() + 4

    result = send_high_priority_email.apply_async(ARGS, eta=eta)

    assert _queued_ids(redis_server) == [], "no long broker countdown: the row waits"
    wait_for(lambda: smtp_sink.count() == 1, 30, "the scheduled email")
    assert smtp_sink.received[0].at >= due - 0.1
    [message] = Message.objects.all()
    assert str(message.id) in result.message_ids


def test_expires_cancels_what_was_not_sent_in_time(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    start_role("worker", queues="high_priority,bulk", concurrency=2)
    start_role("beat")

    result = send_high_priority_email.apply_async(ARGS, countdown=4, expires=1.5)

    def reason() -> str:
        return str(Message.objects.get(id=result.message_ids[0]).status_reason)

    wait_for(lambda: reason() == "expired", 30, "the message to expire")
    message = Message.objects.get(id=result.message_ids[0])
    assert message.status == Message.Status.CANCELLED
    # Past the countdown: its task ran and found nothing to send.
    wait_for(lambda: time.time() > message.created_at.timestamp() + 5, 10)
    assert smtp_sink.count() == 0


def test_send_at_through_the_api_holds_the_message(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    key = services.create_api_key("t", ["send"])[1]
    send_at, due = datetime.now(UTC) + timedelta(seconds=2), time.monotonic() + 2
    body = {"to": "ann@example.com", "subject": "Later", "template": "welcome"}

    response = Client().post(
        "/api/v1/messages",
        data=json.dumps({**body, "send_at": send_at.isoformat()}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    )

    assert response.status_code == 202, response.content
    wait_for(lambda: smtp_sink.count() == 1, 30, "the scheduled email")
    assert smtp_sink.received[0].at >= due - 0.1


# --------------------------------------------------------------------------------------
# The rules, without a worker
# --------------------------------------------------------------------------------------


@override_settings(MAILROOM_MAX_COUNTDOWN_SECONDS=60)
def test_a_far_send_at_is_enqueued_by_the_sweeper_only_once_due(
    redis_server: redis.Redis,
) -> None:
    later = timezone.now() + timedelta(hours=2)
    message = services.send_email(
        to="a@example.com", subject="Hi", template="welcome", send_at=later
    )

    services.sweep()
    assert _queued_ids(redis_server) == []
    assert outbox.claim([message.id], 10) == [], "not claimable before its time"

    Message.objects.filter(id=message.id).update(next_attempt_at=timezone.now())
    services.sweep()
    services.sweep()
    assert _queued_ids(redis_server) == [str(message.id)]


def test_expired_rows_are_cancelled_by_the_sweeper_and_never_claimed(
    redis_server: redis.Redis,
) -> None:
    soon = timezone.now() + timedelta(milliseconds=200)
    messages = send_bulk_email_batch.apply_async(
        (["a@example.com", "b@example.com"], "News", {}, "newsletter"), expires=soon
    ).message_ids
    kept = services.send_email(to="c@example.com", subject="Hi", template="welcome")
    wait_for(lambda: timezone.now() > soon, 5)

    assert outbox.claim(messages, 10) == []
    report = services.sweep()

    assert report.expired == 2
    rows = Message.objects.filter(id__in=messages)
    assert {(m.status, m.status_reason) for m in rows} == {("cancelled", "expired")}
    assert Message.objects.get(id=kept.id).status == Message.Status.QUEUED


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"priority": 9}, "cannot honour priority"),
        ({"link": "x", "routing_key": "y"}, "cannot honour link, routing_key"),
        ({"countdown": 5, "eta": timezone.now()}, "countdown or eta, not both"),
        ({"countdown": "soon"}, "countdown must be a number of seconds"),
        ({"eta": 30}, "eta must be a datetime"),
        ({"queue": "urgent"}, "the queues are high_priority, bulk"),
    ],
)
def test_an_option_it_cannot_honour_raises_and_stores_nothing(
    options: dict[str, Any], words: str
) -> None:
    with pytest.raises(TypeError, match=words):
        send_high_priority_email.apply_async(ARGS, **options)
    assert Message.objects.count() == 0


def test_queue_and_task_id_are_honoured(redis_server: redis.Redis) -> None:
    first = send_high_priority_email.apply_async(ARGS, queue="bulk", task_id="order-7")
    again = send_high_priority_email.apply_async(ARGS, queue="bulk", task_id="order-7")

    [message] = Message.objects.all()
    assert message.queue == "bulk"
    assert first.message_ids == again.message_ids == [str(message.id)]
    assert first.id == "order-7"
