"""Delivery to a relay that is far away, behind TLS, and caps connections: the relay
simulator (mailroom_testkit.relay) on a real socket, with a round trip in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from django.conf import settings
from more_itertools import chunked

from email_service import keys, redisstore, smtp_health
from email_service.models import DeliveryAttempt, Message
from email_service.smtp import SMTPTransport, TLSOptions
from email_service.tasks import send_bulk_email_batch
from mailroom_testkit.processes import Role
from mailroom_testkit.relay import RelaySimulator
from tests.conftest import wait_for

DATA = b"Subject: hi\r\nTo: x@example.com\r\n\r\nbody\r\n.leading dot\r\n"


@pytest.fixture
def relay() -> Iterator[RelaySimulator]:
    with RelaySimulator(rtt=0.02, tls="starttls") as simulator:
        yield simulator


def _transport(relay: RelaySimulator, host: str = "127.0.0.1", **kwargs: object) -> SMTPTransport:
    options: dict = {
        "timeout": 5.0,
        "use_tls": True,
        "tls": TLSOptions(ca_file=str(relay.ca_pem_path)),
    } | kwargs
    return SMTPTransport(host, relay.port, **options)


def test_a_pipelined_flight_is_two_round_trips_and_keeps_the_content_intact(
    relay: RelaySimulator,
) -> None:
    transport = _transport(relay)
    results = [transport.send("a@example.com", f"r{i}@example.com", DATA) for i in range(5)]
    transport.close()

    assert all(r.ok for r in results)
    assert relay.pipelined_flights >= 5  # MAIL, RCPT, DATA went together each time
    assert relay.stats().connections_accepted == 1
    [first, *_] = relay.messages
    assert first.data.endswith(b".leading dot\r\n")  # dot-stuffing undone by the relay
    assert relay.sessions()[0].tls


def test_a_4xx_to_one_rcpt_in_a_flight_defers_that_recipient_only(relay: RelaySimulator) -> None:
    relay.set_rcpt_reply("busy@example.com", "451 4.3.0 mailbox busy, try later")
    transport = _transport(relay)

    results = {
        to: transport.send("a@example.com", to, DATA)
        for to in ("one@example.com", "busy@example.com", "two@example.com")
    }
    transport.close()

    assert results["busy@example.com"].code == 451
    assert not results["busy@example.com"].permanent
    assert results["one@example.com"].ok
    assert results["two@example.com"].ok
    assert relay.copies() == {"one@example.com": 1, "two@example.com": 1}
    assert relay.stats().connections_accepted == 1, "the refusal must not cost the session"


def test_a_relay_without_pipelining_gets_the_classic_dialogue() -> None:
    with RelaySimulator(rtt=0.01, tls="starttls", pipelining=False) as relay:
        transport = _transport(relay)
        assert transport.send("a@example.com", "b@example.com", DATA).ok
        transport.close()
        assert relay.count() == 1
        assert not relay.pipelined_without_offer
        assert relay.pipelined_flights == 0


def test_a_certificate_for_another_name_is_refused_clearly_and_nothing_is_sent() -> None:
    with RelaySimulator(tls="starttls", cert_hostnames=("relay.test",)) as relay:
        result = _transport(relay).send("a@example.com", "b@example.com", DATA)

        assert result.config_error
        assert not result.permanent, "the message is not at fault: it must not fail"
        assert "failed TLS verification" in result.reply
        assert "MAILROOM_SMTP_CA_FILE" in result.reply
        assert relay.count() == 0


def test_a_wrong_password_is_a_configuration_error() -> None:
    with RelaySimulator(tls="starttls", username="app", password="right") as relay:
        good = _transport(relay, username="app", password="right")
        bad = _transport(relay, username="app", password="wrong")

        assert good.send("a@example.com", "b@example.com", DATA).ok
        refused = bad.send("a@example.com", "c@example.com", DATA)
        good.close()

        assert refused.config_error
        assert "refused the login" in refused.reply
        assert relay.copies() == {"b@example.com": 1}


def _worker_env(relay: RelaySimulator, **extra: object) -> dict[str, object]:
    return {
        "EMAIL_PORT": relay.port,
        "EMAIL_USE_TLS": "true",
        "MAILROOM_SMTP_CA_FILE": relay.ca_pem_path,
        **extra,
    }


def _settled(count: int) -> Callable[[], bool]:
    return lambda: Message.objects.filter(status="sent").count() >= count


def test_the_connection_budget_holds_across_two_worker_processes(
    start_role: Callable[..., Role], relay: RelaySimulator
) -> None:
    env = _worker_env(relay, MAILROOM_SMTP_MAX_CONNECTIONS=3)
    start_role("worker", queues="bulk", concurrency=2, name="bulk-a", env=env)
    start_role("worker", queues="bulk", concurrency=2, name="bulk-b", env=env)
    recipients = [f"c{i}@example.com" for i in range(150)]
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {}, "newsletter")

    wait_for(_settled(150), 90, "every recipient to be delivered")
    copies = relay.copies()
    assert set(copies) == set(recipients)
    assert max(copies.values()) == 1
    # Four processes of eight lanes each wanted 32 connections; the relay saw 3 at most.
    assert relay.max_concurrent <= 3
    assert relay.connections_refused == 0


def test_a_worker_with_a_bad_ca_stops_delivery_and_says_so(
    start_role: Callable[..., Role], relay: RelaySimulator, tmp_path: object
) -> None:
    other = RelaySimulator(tls="starttls").start()  # its CA did not sign our relay
    try:
        env = _worker_env(relay, MAILROOM_SMTP_CA_FILE=other.ca_pem_path)
        start_role("worker", queues="bulk", concurrency=1, name="bulk-bad-ca", env=env)
        send_bulk_email_batch.delay(
            [f"t{i}@example.com" for i in range(20)], "Newsletter", {}, "newsletter"
        )
        wait_for(lambda: smtp_health.relay_error() is not None, 30, "the error to be published")
        wait_for(
            lambda: Message.objects.filter(status="deferred").count() == 20,
            30,
            "the batch to be given back",
        )
    finally:
        other.stop()
    assert "failed TLS verification" in (smtp_health.relay_error() or "")
    assert relay.count() == 0
    # Untried: no attempt counted against the messages, nothing failed.
    assert not Message.objects.filter(status="failed").exists()
    assert set(Message.objects.values_list("attempts", flat=True)) == {0}
    assert DeliveryAttempt.objects.count() == 0
    assert redisstore.client().ttl(keys.SMTP_RELAY_ERROR_KEY) > 0
    assert settings.MAILROOM_SMTP_TLS_INSECURE_SKIP_VERIFY is False
