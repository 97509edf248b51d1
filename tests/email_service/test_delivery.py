"""End-to-end delivery: a real Celery worker, Postgres, Redis and an SMTP socket."""

from __future__ import annotations

import email.utils
import os
from collections.abc import Callable
from email.message import EmailMessage

import pytest
from django.conf import settings
from more_itertools import chunked

from email_service import keys, redisstore, services
from email_service.models import DeliveryAttempt, Message, Suppression
from email_service.tasks import QueuedResult, send_bulk_email_batch, send_high_priority_email
from mailroom_testkit.processes import RedisServer, Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _part(mail: EmailMessage, subtype: str) -> str:
    body = mail.get_body(preferencelist=(subtype,))
    assert body is not None, f"no text/{subtype} part"
    return str(body.get_content())


def _status_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in Message.objects.values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def _all_settled(total: int) -> Callable[[], bool]:
    def check() -> bool:
        return Message.objects.filter(status__in=["sent", "failed", "suppressed"]).count() == total

    return check


def test_a_transactional_email_arrives_as_multipart_alternative(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    result = send_high_priority_email.delay(
        "ann@example.com",
        "Welcome aboard",
        {"name": "Ann <script>", "action_url": "https://app.example.com/start"},
        "welcome",
    )

    wait_for(lambda: smtp_sink.count() == 1, 30, "the email to arrive")
    assert isinstance(result, QueuedResult), ".delay() records the message and says which"
    [received] = smtp_sink.received
    mail = received.parsed()
    message = Message.objects.get(id=result.message_ids[0])
    assert message.status == "sent"
    assert received.rcpt_to == "ann@example.com"
    assert mail.get_content_type() == "multipart/alternative"
    assert mail["Subject"] == "Welcome aboard"
    assert mail["To"] == "ann@example.com"
    assert mail["Message-ID"] == message.message_id_header
    assert mail["Message-ID"].endswith("@mailroom.example.com>")
    assert email.utils.parsedate_to_datetime(mail["Date"]) is not None
    text = _part(mail, "plain")
    html = _part(mail, "html")
    # Context is autoescaped in HTML; the text part is readable, not markup.
    assert "Ann &lt;script&gt;" in html
    assert "<script>" not in html
    assert "Welcome, Ann <script>!" in text
    assert "https://app.example.com/start" in text
    assert "<p>" not in text


def test_a_template_without_txt_gets_a_text_part_converted_from_html(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    services.send_email(
        to="bob@example.com",
        subject="News",
        template="newsletter",
        context={
            "headline": "Spring & more",
            "items": [{"title": "First", "url": "https://x.example.com/1"}],
        },
    )

    wait_for(lambda: smtp_sink.count() == 1, 30, "the email to arrive")
    mail = smtp_sink.received[0].parsed()
    text = _part(mail, "plain")
    assert "Spring & more" in text
    assert "* First" in text
    assert "<" not in text


def test_2000_bulk_recipients_each_get_one_copy_over_sessions_kept_across_batches(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    recipients = [f"user{i}@example.com" for i in range(2000)]
    batches = 0
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {"headline": "Hello"}, "newsletter")
        batches += 1

    wait_for(lambda: smtp_sink.count() >= 2000, 120, "2,000 deliveries")
    wait_for(_all_settled(2000), 30, "every row to be recorded")
    copies = smtp_sink.copies()
    assert set(copies) == set(recipients)
    assert max(copies.values()) == 1
    # Sessions outlive their task: a session per lane of each of the two processes,
    # renewed after MAILROOM_MESSAGES_PER_CONNECTION, not one (or more) per batch.
    lanes = 2 * settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS
    renewals = 2000 // settings.MAILROOM_MESSAGES_PER_CONNECTION
    assert smtp_sink.connections <= lanes + renewals < batches
    assert _status_counts() == {"sent": 2000}
    assert int(redisstore.client().get(keys.SENT_TOTAL) or 0) == 2000


def test_it_retries_451_and_every_recipient_gets_exactly_one_copy(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_every(7, "451 4.3.0 Try again later", until_message=400)
    recipients = [f"r{i}@example.com" for i in range(350)]
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {}, "newsletter")

    wait_for(_all_settled(350), 90, "every recipient to be delivered")
    copies = smtp_sink.copies()
    assert set(copies) == set(recipients)
    assert max(copies.values()) == 1
    retried = Message.objects.filter(attempts__gt=1)
    assert retried.count() >= 45  # one in seven was refused at least once
    assert _status_counts() == {"sent": 350}
    assert DeliveryAttempt.objects.filter(outcome="deferred", smtp_code=451).count() >= 45
    # Delivered addresses leave the retry hash: it stays bounded.
    client = redisstore.client()
    assert client.hlen(keys.RETRY_COUNTS) == 0
    # Retries are counted by reply class; every delivery lands in the latency histogram.
    assert int(client.get("mailroom:retried_total:bulk:4xx") or 0) >= 45
    latency = {os.fsdecode(k): float(v) for k, v in client.hgetall("mailroom:latency:bulk").items()}
    assert latency["count"] == 350
    assert sum(v for k, v in latency.items() if k not in ("sum", "count")) == 350
    assert int(client.get("mailroom:smtp_connections_total:bulk") or 0) >= 7


def test_it_does_not_retry_on_550_and_suppresses_the_bad_mailbox(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_address("ghost@example.com", "550 5.1.1 No such user here")
    recipients = [f"p{i}@example.com" for i in range(30)] + ["ghost@example.com"]
    send_bulk_email_batch.delay(recipients, "Newsletter", {}, "newsletter")

    wait_for(_all_settled(31), 30, "the batch to finish")
    ghost = Message.objects.get(to_email="ghost@example.com")
    assert ghost.status == "failed"
    assert ghost.attempts == 1
    assert ghost.last_smtp_code == 550
    assert Suppression.objects.filter(address="ghost@example.com", reason="hard_bounce").exists()
    assert _status_counts() == {"sent": 30, "failed": 1}
    assert "ghost@example.com" not in smtp_sink.copies()

    # A suppressed address is never sent to again.
    later = services.send_email(to="Ghost@example.com", subject="Hi", template="welcome")
    assert later.status == "suppressed"


def test_a_dropped_connection_mid_batch_loses_and_duplicates_nobody(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    smtp_sink.drop_connection_at(10, 25, 26)
    recipients = [f"d{i}@example.com" for i in range(100)]
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {}, "newsletter")

    wait_for(_all_settled(100), 60, "every recipient to be delivered")
    copies = smtp_sink.copies()
    assert set(copies) == set(recipients)
    assert max(copies.values()) == 1
    assert _status_counts() == {"sent": 100}
    assert DeliveryAttempt.objects.filter(outcome="deferred", smtp_code=None).count() == 3


def test_a_worker_killed_mid_batch_loses_nothing(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_delay(0.01)
    first = start_role("worker", queues="high_priority,bulk", concurrency=2)
    start_role("beat")
    recipients = [f"k{i}@example.com" for i in range(600)]
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {}, "newsletter")

    wait_for(lambda: smtp_sink.count() >= 150, 60, "the run to be under way")
    first.kill()
    assert smtp_sink.count() < 600, "the kill must happen mid-run"
    start_role("worker", queues="high_priority,bulk", concurrency=2, name="worker-restarted")

    wait_for(_all_settled(600), 120, "every recipient to be delivered after the restart")
    copies = smtp_sink.copies()
    assert set(copies) == set(recipients)
    duplicated = sum(n - 1 for n in copies.values())
    # The stated bound: per killed process, one message per lane in flight and one
    # whose record was on its way (docs/reliability.md).
    bound = 2 * (settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS + 1)
    assert duplicated <= bound, f"{duplicated} duplicates; at most {bound} for 2 processes"
    assert _status_counts() == {"sent": 600}


def test_a_flushed_redis_is_recovered_by_the_sweeper(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_delay(0.01)
    start_role("worker", queues="high_priority,bulk", concurrency=2)
    start_role("beat")
    recipients = [f"f{i}@example.com" for i in range(600)]
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {}, "newsletter")

    wait_for(lambda: smtp_sink.count() >= 100, 60, "the run to be under way")
    redisstore.client().flushall()  # the queue, the tokens, the counters: all gone
    assert smtp_sink.count() < 600, "the flush must happen mid-run"

    wait_for(_all_settled(600), 120, "the sweeper to bring every row to sent")
    copies = smtp_sink.copies()
    assert set(copies) == set(recipients)
    assert max(copies.values()) == 1
    assert _status_counts() == {"sent": 600}


def test_pause_stops_bulk_after_the_messages_in_flight_and_resume_delivers_the_rest(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_delay(0.02)
    start_role("worker", queues="bulk", concurrency=2, name="worker-bulk")
    start_role("worker", queues="high_priority", concurrency=1, name="worker-high")
    recipients = [f"z{i}@example.com" for i in range(400)]
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {}, "newsletter")
    wait_for(lambda: smtp_sink.count() >= 40, 60, "bulk to be under way")

    services.pause_bulk()
    at_pause = smtp_sink.count()
    wait_for(lambda: not Message.objects.filter(status="sending").exists(), 10, "batches to stop")
    settled = smtp_sink.count()
    # Each of the two bulk processes may finish the conversations it had in flight;
    # none starts a new one.
    assert settled - at_pause <= 2 * settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS
    services.send_email(to="reset@example.com", subject="Reset your password", template="welcome")
    wait_for(lambda: "reset@example.com" in smtp_sink.copies(), 20, "transactional mail")
    assert smtp_sink.count() - settled == 1, "only the transactional email went out while paused"
    assert Message.objects.filter(queue="bulk", status="queued").count() == 400 - settled

    services.resume_bulk()
    wait_for(_all_settled(401), 90, "the rest of the bulk mail after resume")
    copies = smtp_sink.copies()
    assert set(copies) == {*recipients, "reset@example.com"}
    assert max(copies.values()) == 1


def test_retries_stop_after_the_budget_and_the_message_fails(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_address("full@example.com", "452 4.2.2 Mailbox full")
    start_role(
        "worker", queues="high_priority,bulk", concurrency=1, env={"MAILROOM_MAX_RETRIES": 2}
    )
    services.send_email(to="full@example.com", subject="Hi", template="welcome")

    wait_for(_all_settled(1), 30, "the retries to run out")
    message = Message.objects.get()
    assert message.status == "failed"
    assert message.attempts == 3, "one try and two retries"
    outcomes = list(message.attempts_log.order_by("attempt").values_list("outcome", "smtp_code"))
    assert outcomes == [("deferred", 452), ("deferred", 452), ("failed", 452)]
    assert not Suppression.objects.exists(), "a full mailbox is not a bad address"
    assert redisstore.client().hlen(keys.RETRY_COUNTS) == 0


def test_a_relay_that_is_down_defers_the_batch_and_delivers_it_when_back(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_down(True)
    recipients = [f"w{i}@example.com" for i in range(50)]
    send_bulk_email_batch.delay(recipients, "Newsletter", {}, "newsletter")

    wait_for(
        lambda: Message.objects.filter(status="deferred").count() == 50, 30, "the batch to defer"
    )
    # Three failed connections, not fifty: the rest of the batch was deferred untried.
    assert DeliveryAttempt.objects.count() == 3
    smtp_sink.set_down(False)

    wait_for(_all_settled(50), 60, "delivery once the relay is back")
    copies = smtp_sink.copies()
    assert set(copies) == set(recipients)
    assert max(copies.values()) == 1


def test_a_task_sent_by_name_twice_delivers_once(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    from celery import current_app

    for _ in range(2):  # the same task id: as if Redis redelivered it
        current_app.send_task(
            "email_service.send_high_priority_email",
            args=["byname@example.com", "Hello", {"name": "B"}, "welcome"],
            task_id="7d1b4b8e-1111-4d8e-9a51-5f0e2f3a0c11",
        )
    start_role("worker", queues="high_priority", concurrency=2)

    client = redisstore.client()
    wait_for(
        lambda: client.llen("high_priority") == 0 and client.hlen("unacked") == 0,
        30,
        "both copies of the task and the delivery task to be consumed",
    )
    wait_for(_all_settled(1), 10, "the row to be recorded")
    assert Message.objects.count() == 1
    assert smtp_sink.copies() == {"byname@example.com": 1}


def test_a_redelivered_delivery_task_sends_nothing_twice(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    from celery import current_app

    smtp_sink.set_delay(0.01)
    messages = services.send_bulk_batch(
        [f"again{i}@example.com" for i in range(40)], "News", {}, "newsletter"
    )
    ids = [str(m.id) for m in messages]
    for _ in range(3):  # Redis may deliver a task again: after a visibility timeout, say
        current_app.send_task("email_service.deliver_bulk", args=[ids, ""])
    start_role("worker", queues="bulk", concurrency=2)

    wait_for(_all_settled(40), 30, "the batch to be delivered")
    client = redisstore.client()
    wait_for(lambda: client.llen("bulk") == 0 and client.hlen("unacked") == 0, 30, "all tasks")
    copies = smtp_sink.copies()
    assert len(copies) == 40
    assert max(copies.values()) == 1
    assert DeliveryAttempt.objects.count() == 40


def test_email_is_accepted_while_redis_is_down_and_delivered_when_it_is_back(
    redis_process: RedisServer, start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    redis_process.stop()

    message = services.send_email(to="patient@example.com", subject="Hi", template="welcome")

    assert Message.objects.get(id=message.id).status == "queued", "stored, not lost"
    redis_process.start()  # empty: the task was never enqueued
    start_role("worker", queues="high_priority", concurrency=1)
    start_role("beat")
    wait_for(_all_settled(1), 30, "the sweeper to deliver it")
    assert smtp_sink.copies() == {"patient@example.com": 1}
