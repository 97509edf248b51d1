"""Accepting one email: the suppression check inside the INSERT, the commit before the task.

``services.send_email`` writes its row with one statement (the suppression check folded
in); these tests pin what that statement must decide, and when the task may be enqueued.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis
from django.db import IntegrityError, connection, transaction

from email_service import publisher, services
from email_service.models import Message
from email_service.services import accepting

pytestmark = pytest.mark.django_db(transaction=True)


def _tasks(r: redis.Redis, queue: str) -> int:
    return int(r.llen(queue))


@pytest.mark.parametrize(
    ("reason", "queue", "expected"),
    [
        ("hard_bounce", "high_priority", "suppressed"),
        ("complaint", "bulk", "suppressed"),
        ("manual", "high_priority", "suppressed"),
        # An unsubscribe stops bulk mail only: a password reset still arrives.
        ("unsubscribe", "high_priority", "queued"),
        ("unsubscribe", "bulk", "suppressed"),
    ],
)
def test_the_suppression_list_decides_the_status(
    redis_server: redis.Redis, reason: str, queue: str, expected: str
) -> None:
    services.suppress("Gone@Example.com", reason)

    message = services.send_email(
        to="gone@example.COM", subject="Hi", template="welcome", queue=queue
    )

    stored = Message.objects.get(id=message.id)
    assert stored.status == message.status == expected
    if expected == "suppressed":
        assert stored.dispatch_token == message.dispatch_token == ""
        assert _tasks(redis_server, queue) == 0
    else:
        assert stored.dispatch_token == message.dispatch_token != ""
        assert _tasks(redis_server, queue) == 1


def test_the_row_as_returned_is_the_row_as_stored(redis_server: redis.Redis) -> None:
    message = services.send_email(
        to="ann@example.com",
        subject="Hi {{ name }}",
        template="welcome",
        context={"name": "Ann", "nested": {"list": [1, "two", None]}},
        from_email="Shop <shop@example.com>",
        idempotency_key="order-17",
    )

    stored = Message.objects.get(id=message.id)
    for field in Message._meta.concrete_fields:
        assert getattr(stored, field.attname) == getattr(message, field.attname), field.name
    assert stored.context == {"name": "Ann", "nested": {"list": [1, "two", None]}}
    assert stored.campaign_id is None
    assert stored.attempts == 0


def test_the_row_is_committed_before_its_task_is_enqueued(
    redis_server: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real = publisher.publish

    def publish(task: str, args: Any, *rest: Any) -> bool:
        # Another connection sees the row, or the task would race its own commit.
        db = connection.settings_dict
        with psycopg.connect(
            host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
        ) as other:
            row = other.execute(
                "SELECT status FROM email_service_message WHERE id = %s", [args[0][0]]
            ).fetchone()
            seen.append(row)
        return real(task, args, *rest)

    monkeypatch.setattr(publisher, "publish", publish)

    services.send_email(to="ann@example.com", subject="Hi", template="welcome")

    assert seen == [("queued",)]


def test_inside_a_transaction_the_task_waits_for_the_commit(redis_server: redis.Redis) -> None:
    with transaction.atomic():
        message = services.send_email(to="ann@example.com", subject="Hi", template="welcome")
        assert _tasks(redis_server, "high_priority") == 0

    assert _tasks(redis_server, "high_priority") == 1
    assert Message.objects.get(id=message.id).status == "queued"


def test_a_rolled_back_transaction_enqueues_nothing(redis_server: redis.Redis) -> None:
    def accept_then_fail() -> None:
        with transaction.atomic():
            services.send_email(to="ann@example.com", subject="Hi", template="welcome")
            raise RuntimeError("the caller fails after accepting")

    with pytest.raises(RuntimeError):
        accept_then_fail()

    assert _tasks(redis_server, "high_priority") == 0
    assert Message.objects.count() == 0


def test_an_idempotency_race_inside_a_transaction_leaves_it_usable(
    redis_server: redis.Redis,
) -> None:
    services.send_email(
        to="ann@example.com", subject="Hi", template="welcome", idempotency_key="k1"
    )
    request = accepting.validated_request("Hi", "welcome", None, None, "high_priority")

    with transaction.atomic():
        # What the loser of two racing requests meets: the unique key, in a savepoint
        # (send_email then returns the winner's message), and the caller's transaction
        # goes on.
        with pytest.raises(IntegrityError):
            accepting.accept_rows(["ann@example.com"], request, None, ["k1"])
        assert Message.objects.count() == 1
