"""The SMTP transport against a real socket: reuse, reset, caps, timeouts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from email_service.smtp import SendResult, SMTPTransport
from mailroom_testkit.smtp_sink import SMTPSink

DATA = b"Subject: hi\r\nTo: x@example.com\r\n\r\nbody\r\n"


def _transport(sink: SMTPSink, **kwargs: object) -> SMTPTransport:
    options: dict = {"timeout": 2.0, "max_per_connection": 100} | kwargs
    return SMTPTransport(sink.host, sink.port, **options)


def test_it_reuses_one_connection_for_many_messages(smtp_sink: SMTPSink) -> None:
    transport = _transport(smtp_sink)
    results = [transport.send("a@example.com", f"r{i}@example.com", DATA) for i in range(20)]
    transport.close()

    assert all(r.ok for r in results)
    assert smtp_sink.count() == 20
    assert smtp_sink.connections == 1
    assert transport.connections_opened == 1


def test_it_caps_messages_per_connection(smtp_sink: SMTPSink) -> None:
    transport = _transport(smtp_sink, max_per_connection=3)
    for i in range(7):
        assert transport.send("a@example.com", f"r{i}@example.com", DATA).ok
    transport.close()

    assert smtp_sink.connections == 3


def test_a_4xx_is_transient_and_the_session_is_reset_for_the_next_message(
    smtp_sink: SMTPSink,
) -> None:
    smtp_sink.refuse_address("busy@example.com", "451 4.7.1 Greylisted, try later")
    transport = _transport(smtp_sink)

    refused = transport.send("a@example.com", "busy@example.com", DATA)
    after = transport.send("a@example.com", "next@example.com", DATA)
    transport.close()

    assert (refused.code, refused.permanent, refused.throttled) == (451, False, True)
    assert "Greylisted" in refused.reply
    assert after.ok
    assert smtp_sink.copies() == {"next@example.com": 1}
    assert smtp_sink.connections == 1, "a failed transaction must not cost the connection"


def test_a_5xx_is_permanent_and_a_5_1_x_reply_marks_a_bad_mailbox(smtp_sink: SMTPSink) -> None:
    smtp_sink.refuse_address("gone@example.com", "550 5.1.1 User unknown")
    smtp_sink.refuse_address("big@example.com", "552 5.3.4 Message too big")
    transport = _transport(smtp_sink)

    gone = transport.send("a@example.com", "gone@example.com", DATA)
    big = transport.send("a@example.com", "big@example.com", DATA)
    transport.close()

    assert (gone.code, gone.permanent, gone.bad_mailbox) == (550, True, True)
    assert (big.code, big.permanent, big.bad_mailbox) == (552, True, False)


def test_a_421_closes_the_session_and_the_next_message_reconnects(smtp_sink: SMTPSink) -> None:
    smtp_sink.refuse_address("slow@example.com", "421 4.7.0 Too many messages, closing")
    transport = _transport(smtp_sink)

    first = transport.send("a@example.com", "slow@example.com", DATA)
    second = transport.send("a@example.com", "fine@example.com", DATA)
    transport.close()

    assert first.code == 421
    assert second.ok
    assert smtp_sink.connections == 2


def test_a_dropped_connection_is_transient_with_no_reply_code(smtp_sink: SMTPSink) -> None:
    smtp_sink.drop_connection_at(2)
    transport = _transport(smtp_sink)

    results = [transport.send("a@example.com", f"r{i}@example.com", DATA) for i in range(3)]
    transport.close()

    assert [r.ok for r in results] == [True, False, True]
    assert results[1].code is None
    assert results[1].reply_class == "network"
    assert smtp_sink.connections == 2


def test_a_refused_connection_is_a_result_not_an_exception() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    transport = SMTPTransport("127.0.0.1", port, timeout=1.0)

    result = transport.send("a@example.com", "b@example.com", DATA)

    assert result == SendResult(code=None, reply=result.reply)
    assert "ConnectionRefused" in result.reply


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_every_call_is_bounded_by_the_timeout(silent_server: int) -> None:
    transport = SMTPTransport("127.0.0.1", silent_server, timeout=0.5)

    started = time.monotonic()
    result = transport.send("a@example.com", "b@example.com", DATA)
    elapsed = time.monotonic() - started

    assert result.code is None
    assert "timed out" in result.reply
    assert elapsed < 5
