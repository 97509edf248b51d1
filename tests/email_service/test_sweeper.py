"""The sweeper finds every row whose task is gone, and only those. No worker runs here:
what it enqueues is read straight off the Redis queues."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
import redis
from django.test import override_settings
from django.utils import timezone

from email_service import keys, services
from email_service.models import Campaign, DeliveryAttempt, Message

pytestmark = pytest.mark.django_db(transaction=True)


def _queued(r: redis.Redis, queue: str) -> list[str]:
    """Message ids in the tasks waiting on a Celery queue."""
    ids: list[str] = []
    for raw in r.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        ids.extend(body[0][0])
    return ids


def _accept(count: int, queue: str = "high_priority") -> list[Message]:
    addresses = [f"s{i}@example.com" for i in range(count)]
    if queue == "bulk":
        return services.send_bulk_batch(addresses, "News", {}, "newsletter")
    return [services.send_email(to=a, subject="Hi", template="welcome") for a in addresses]


def _age(messages: list[Message], seconds: float) -> None:
    Message.objects.filter(id__in=[m.id for m in messages]).update(
        dispatched_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_rows_whose_task_vanished_are_enqueued_again_once(redis_server: redis.Redis) -> None:
    messages = _accept(3)
    redis_server.flushall()  # the tasks and their dispatch tokens are gone
    _age(messages, 60)

    assert services.sweep().redispatched == 3
    assert sorted(_queued(redis_server, "high_priority")) == sorted(str(m.id) for m in messages)
    assert services.sweep().redispatched == 0, "a second sweep finds the new task alive"
    assert len(_queued(redis_server, "high_priority")) == 3


def test_rows_with_a_task_in_flight_are_left_alone(redis_server: redis.Redis) -> None:
    messages = _accept(2)
    _age(messages, 600)  # long in the queue, but their task still exists

    assert services.sweep().redispatched == 0
    assert len(_queued(redis_server, "high_priority")) == 2


def test_fresh_rows_are_left_alone_even_without_a_task(redis_server: redis.Redis) -> None:
    _accept(2)
    redis_server.flushall()

    assert services.sweep().redispatched == 0  # younger than MAILROOM_STALE_QUEUED_SECONDS


def test_an_expired_lease_goes_back_to_the_queue(redis_server: redis.Redis) -> None:
    [message] = _accept(1)
    Message.objects.filter(id=message.id).update(
        status="sending", attempts=1, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    redis_server.flushall()

    report = services.sweep()

    assert (report.reclaimed, report.failed, report.redispatched) == (1, 0, 1)
    message.refresh_from_db()
    assert message.status == "queued"
    assert _queued(redis_server, "high_priority") == [str(message.id)]


def test_a_live_lease_is_left_alone(redis_server: redis.Redis) -> None:
    [message] = _accept(1)
    Message.objects.filter(id=message.id).update(
        status="sending", attempts=1, lease_expires_at=timezone.now() + timedelta(seconds=30)
    )

    assert services.sweep().reclaimed == 0
    message.refresh_from_db()
    assert message.status == "sending"


@override_settings(MAILROOM_MAX_RETRIES=2)
def test_a_message_that_keeps_killing_its_worker_fails_after_the_retry_budget() -> None:
    [message] = _accept(1)
    Message.objects.filter(id=message.id).update(
        status="sending", attempts=3, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    assert services.sweep().failed == 1
    message.refresh_from_db()
    assert message.status == "failed"
    assert message.last_smtp_reply == "worker lost during every attempt"
    assert DeliveryAttempt.objects.get(message=message).outcome == "failed"


def test_due_deferred_rows_are_enqueued_and_later_ones_wait(redis_server: redis.Redis) -> None:
    due, later = _accept(2)
    now = timezone.now()
    Message.objects.filter(id=due.id).update(
        status="deferred", dispatch_token="", next_attempt_at=now - timedelta(seconds=1)
    )
    Message.objects.filter(id=later.id).update(
        status="deferred", dispatch_token="", next_attempt_at=now + timedelta(hours=1)
    )
    redis_server.flushall()

    assert services.sweep().redispatched == 1
    assert _queued(redis_server, "high_priority") == [str(due.id)]


def test_bulk_rows_wait_while_bulk_is_paused_and_resume_dispatches_them(
    redis_server: redis.Redis,
) -> None:
    bulk = _accept(3, queue="bulk")
    [transactional] = _accept(1)
    services.pause_bulk()
    redis_server.delete("bulk", "high_priority", *redis_server.keys("mailroom:dispatch:*"))
    _age([*bulk, transactional], 60)

    assert services.sweep().redispatched == 1
    assert _queued(redis_server, "bulk") == []
    assert _queued(redis_server, "high_priority") == [str(transactional.id)]

    assert services.resume_bulk() == 3
    assert sorted(_queued(redis_server, "bulk")) == sorted(str(m.id) for m in bulk)


def test_the_pause_switch_survives_a_redis_flush(redis_server: redis.Redis) -> None:
    services.pause_bulk()
    redis_server.flushall()

    assert services.is_bulk_paused() is True
    assert redis_server.get(keys.BULK_PAUSE) == b"1", "the mirror is restored"
    services.resume_bulk()
    redis_server.flushall()
    assert services.is_bulk_paused() is False


def test_a_legacy_redis_key_set_by_hand_still_pauses_bulk(redis_server: redis.Redis) -> None:
    redis_server.set("bulk_email_pause", "true")
    assert services.is_bulk_paused() is True
    redis_server.set("bulk_email_pause", "0")
    assert services.is_bulk_paused() is False


@override_settings(MAILROOM_RETRY_BASE_SECONDS=10, MAILROOM_RETRY_MAX_SECONDS=3600)
def test_the_retry_schedule_doubles_from_ten_seconds_up_to_an_hour() -> None:
    for attempts, base in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (9, 2560), (12, 3600)]:
        delays = [services.retry_delay(attempts) for _ in range(200)]
        assert min(delays) >= base
        assert max(delays) <= min(base * 1.25, 3600)
        assert len(set(delays)) > 1 or base == 3600, "retries are jittered"


def test_the_dispatcher_heals_a_stale_campaign_mirror(redis_server: redis.Redis) -> None:
    campaign = services.create_campaign(name="mirror", subject="Hi", template="newsletter")
    services.add_recipients(campaign, [{"email": "mirror@example.com"}])
    services.start_campaign(campaign)
    Campaign.objects.filter(id=campaign.id).update(status="paused")  # mirror now stale
    key = keys.campaign_state_key(campaign.id)
    assert redis_server.get(key) == b"sending"

    services.dispatch_campaigns()

    assert redis_server.get(key) == b"paused"
