"""The relay simulator (mailroom_testkit.relay) against plain smtplib and raw sockets on
127.0.0.1: its round-trip time, PIPELINING offered or withheld, STARTTLS and implicit
TLS with the test CA, AUTH, the connection cap, programmed RCPT replies, the counters
and the command line. Timing checks are lower bounds (what the fixture promises); the
one upper bound is loose and only tells overlapping delays from ones that add up."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from mailroom_testkit.processes import wait_until
from mailroom_testkit.relay import RelaySimulator

DATA = b"Subject: hi\r\nTo: b@example.com\r\n\r\nbody\r\n"
REPO = Path(__file__).resolve().parents[2]

StartRelay = Callable[..., RelaySimulator]


@pytest.fixture
def start_relay() -> Iterator[StartRelay]:
    started: list[RelaySimulator] = []

    def start(**kwargs: object) -> RelaySimulator:
        relay = RelaySimulator(**kwargs).start()  # type: ignore[arg-type]
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def _smtp(relay: RelaySimulator) -> smtplib.SMTP:
    return smtplib.SMTP(relay.host, relay.port, timeout=10)


def _read_reply(stream: BinaryIO) -> tuple[int, list[bytes]]:
    lines = []
    while True:
        line = stream.readline()
        assert line.endswith(b"\r\n"), f"connection closed mid-reply: {line!r}"
        lines.append(line[4:-2])
        if line[3:4] == b" ":
            return int(line[:3]), lines


class _Raw:
    """A client that writes exactly the bytes it is given, in one write each."""

    def __init__(self, relay: RelaySimulator) -> None:
        self.sock = socket.create_connection((relay.host, relay.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = self.sock.makefile("rb")
        code, _ = _read_reply(self.stream)
        assert code == 220

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, n: int) -> list[int]:
        return [_read_reply(self.stream)[0] for _ in range(n)]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def _wait(predicate: Callable[[], object], what: str) -> None:
    wait_until(predicate, 10, what, interval=0.01)


# --- round-trip time ------------------------------------------------------------------


def test_a_round_trip_takes_at_least_the_rtt(start_relay: StartRelay) -> None:
    relay = start_relay(rtt=0.05)
    started = time.monotonic()
    conn = _smtp(relay)  # connect + greeting: the greeting comes back one rtt later
    assert time.monotonic() - started >= 0.05
    conn.ehlo()

    started = time.monotonic()
    assert conn.noop()[0] == 250
    assert time.monotonic() - started >= 0.05
    conn.quit()


def test_chunks_in_flight_overlap_rather_than_queue_behind_each_other(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(rtt=0.2)
    raw = _Raw(relay)
    raw.send(b"EHLO me\r\n")
    raw.replies(1)

    started = time.monotonic()
    for _ in range(3):  # three writes 20 ms apart, each on its own 100 ms clock
        raw.send(b"NOOP\r\n")
        time.sleep(0.02)
    assert raw.replies(3) == [250, 250, 250]
    elapsed = time.monotonic() - started
    # ~0.24 s if each chunk keeps its own clock; >= 0.6 s if the delays added up.
    assert 0.2 <= elapsed < 0.5
    raw.close()


def test_rtt_zero_delivers_many_messages_on_one_connection(start_relay: StartRelay) -> None:
    relay = start_relay()
    conn = _smtp(relay)
    for i in range(200):
        conn.sendmail("a@example.com", [f"r{i}@example.com"], DATA)
    conn.quit()

    assert relay.count() == 200
    assert relay.copies() == {f"r{i}@example.com": 1 for i in range(200)}
    assert relay.stats().connections_total == 1


# --- PIPELINING -----------------------------------------------------------------------


@pytest.mark.parametrize("offered", [True, False])
def test_pipelining_is_advertised_only_when_offered(start_relay: StartRelay, offered: bool) -> None:
    relay = start_relay(pipelining=offered)
    conn = _smtp(relay)
    conn.ehlo()
    assert conn.has_extn("pipelining") is offered
    assert ("pipelining" in conn.esmtp_features) is offered
    conn.quit()
    [session] = relay.sessions()
    assert session.pipelining_offered is offered


def test_pipelined_input_is_answered_in_order_and_counted(start_relay: StartRelay) -> None:
    relay = start_relay(rtt=0.02)
    raw = _Raw(relay)
    raw.send(b"EHLO me\r\n")
    raw.replies(1)

    raw.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    assert raw.replies(3) == [250, 250, 354]
    raw.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\n")
    assert raw.replies(1) == [250]
    raw.send(b"QUIT\r\n")
    assert raw.replies(1) == [221]
    raw.close()

    [message] = relay.messages
    assert (message.mail_from, message.rcpt_to) == ("a@x.example", ["b@y.example"])
    assert message.parsed()["Subject"] == "pipelined"
    assert relay.pipelined_flights == 1
    assert relay.pipelined_without_offer is False
    [session] = relay.sessions()
    assert session.pipelined_flights == 1


def test_each_pipelined_message_is_one_flight(start_relay: StartRelay) -> None:
    relay = start_relay()
    raw = _Raw(relay)
    raw.send(b"EHLO me\r\n")
    raw.replies(1)
    for i in range(3):
        raw.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<r%d@y.example>\r\nDATA\r\n" % i)
        assert raw.replies(3) == [250, 250, 354]
        raw.send(b"body\r\n.\r\n")
        assert raw.replies(1) == [250]
    raw.close()

    assert relay.count() == 3
    assert relay.pipelined_flights == 3


def test_pipelining_against_a_relay_that_withheld_it_is_flagged(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(pipelining=False)
    raw = _Raw(relay)
    raw.send(b"EHLO me\r\n")
    raw.replies(1)
    raw.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    assert raw.replies(3) == [250, 250, 354]  # aiosmtpd copes; the flag says it happened
    raw.send(b"body\r\n.\r\n")
    assert raw.replies(1) == [250]
    raw.close()

    assert relay.pipelined_flights == 1
    assert relay.pipelined_without_offer is True
    assert relay.stats().pipelined_without_offer is True


@pytest.mark.parametrize("offered", [True, False])
def test_the_classic_dialogue_is_not_pipelining(start_relay: StartRelay, offered: bool) -> None:
    # smtplib waits for every reply: no flight, whatever the network does to its bytes.
    relay = start_relay(rtt=0.01, pipelining=offered)
    conn = _smtp(relay)
    for i in range(5):
        conn.sendmail("a@example.com", [f"r{i}@example.com", f"s{i}@example.com"], DATA)
    conn.rset()
    conn.quit()

    assert relay.count() == 5
    assert relay.pipelined_flights == 0
    assert relay.pipelined_without_offer is False


# --- TLS ------------------------------------------------------------------------------


def test_starttls_with_the_test_ca_and_a_matching_name_delivers(start_relay: StartRelay) -> None:
    relay = start_relay(tls="starttls", cert_hostnames=("127.0.0.1", "localhost"))
    assert relay.ca is not None
    assert relay.ca_pem_path is not None
    assert Path(relay.ca_pem_path).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")

    conn = _smtp(relay)
    conn.ehlo()
    assert conn.has_extn("starttls")
    conn.starttls(context=ssl.create_default_context(cafile=relay.ca_pem_path))
    conn.ehlo()
    assert not conn.has_extn("starttls")
    conn.sendmail("a@example.com", ["b@example.com"], DATA)
    conn.quit()

    assert relay.copies() == {"b@example.com": 1}
    [session] = relay.sessions()
    assert session.tls is True
    assert session.pipelined_flights == 0
    assert relay.commands()["STARTTLS"] == 1
    assert relay.commands()["EHLO"] == 2


def test_a_certificate_for_another_name_fails_hostname_verification(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(tls="starttls", cert_hostnames=("relay.test",))
    assert relay.ca_pem_path is not None
    conn = _smtp(relay)
    conn.ehlo()
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.starttls(context=ssl.create_default_context(cafile=relay.ca_pem_path))
    conn.close()
    assert relay.count() == 0


def test_without_the_test_ca_the_certificate_is_not_trusted(start_relay: StartRelay) -> None:
    relay = start_relay(tls="starttls")
    conn = _smtp(relay)
    conn.ehlo()
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.starttls(context=ssl.create_default_context(cafile=None, cadata=None))
    conn.close()


def test_require_starttls_refuses_mail_before_it(start_relay: StartRelay) -> None:
    relay = start_relay(tls="starttls", require_starttls=True)
    conn = _smtp(relay)
    conn.ehlo()
    assert conn.mail("a@example.com")[0] == 530
    conn.starttls(context=relay.client_context())
    conn.ehlo()
    conn.sendmail("a@example.com", ["b@example.com"], DATA)
    conn.quit()
    assert relay.count() == 1


def test_implicit_tls_with_smtp_ssl_delivers(start_relay: StartRelay) -> None:
    relay = start_relay(tls="implicit", rtt=0.01)
    assert relay.ca_pem_path is not None
    context = ssl.create_default_context(cafile=relay.ca_pem_path)
    conn = smtplib.SMTP_SSL(relay.host, relay.port, timeout=10, context=context)
    conn.ehlo()
    assert not conn.has_extn("starttls")
    conn.sendmail("a@example.com", ["b@example.com"], DATA)
    conn.quit()

    assert relay.copies() == {"b@example.com": 1}
    [session] = relay.sessions()
    assert session.tls is True


# --- AUTH -----------------------------------------------------------------------------


def _auth(conn: smtplib.SMTP, mechanism: str, user: str, password: str) -> None:
    conn.user, conn.password = user, password
    method = {"PLAIN": conn.auth_plain, "LOGIN": conn.auth_login}[mechanism]
    # LOGIN without an initial response: the 334 Username/Password exchange.
    conn.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_succeeds_with_the_right_password(start_relay: StartRelay, mechanism: str) -> None:
    relay = start_relay(username="mailroom", password="s3cret")
    conn = _smtp(relay)
    conn.ehlo()
    assert set(conn.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
    _auth(conn, mechanism, "mailroom", "s3cret")
    conn.sendmail("a@example.com", ["b@example.com"], DATA)
    conn.quit()

    assert relay.count() == 1
    assert (relay.auth_succeeded, relay.auth_failed) == (1, 0)
    [session] = relay.sessions()
    assert session.authenticated_as == "mailroom"
    assert session.pipelined_flights == 0  # the LOGIN exchange is not pipelining


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_fails_with_535_for_a_wrong_password(start_relay: StartRelay, mechanism: str) -> None:
    relay = start_relay(username="mailroom", password="s3cret")
    conn = _smtp(relay)
    conn.ehlo()
    with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
        _auth(conn, mechanism, "mailroom", "wrong")
    assert failure.value.smtp_code == 535
    # Not authenticated: the relay wants AUTH before MAIL.
    assert conn.mail("a@example.com")[0] == 530
    conn.quit()

    assert relay.count() == 0
    assert (relay.auth_succeeded, relay.auth_failed) == (0, 1)


def test_auth_over_starttls_is_offered_only_after_it(start_relay: StartRelay) -> None:
    relay = start_relay(tls="starttls", username="mailroom", password="s3cret")
    conn = _smtp(relay)
    conn.ehlo()
    assert not conn.has_extn("auth")
    conn.starttls(context=relay.client_context())
    conn.ehlo()
    assert conn.has_extn("auth")
    conn.login("mailroom", "s3cret")
    conn.sendmail("a@example.com", ["b@example.com"], DATA)
    conn.quit()
    assert relay.count() == 1
    assert relay.stats().auth_succeeded == 1


def test_a_relay_without_credentials_does_not_offer_auth(start_relay: StartRelay) -> None:
    relay = start_relay()
    conn = _smtp(relay)
    conn.ehlo()
    assert not conn.has_extn("auth")
    conn.quit()


# --- the connection cap ---------------------------------------------------------------


def test_a_connection_over_the_cap_gets_421(start_relay: StartRelay) -> None:
    relay = start_relay(max_connections=2, rtt=0.01)
    first, second = _smtp(relay), _smtp(relay)
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        _smtp(relay)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error == b"4.7.0 Too many connections, try again later"

    stats = relay.stats()
    assert (stats.connections_total, stats.connections_refused) == (3, 1)
    assert stats.connections_accepted == 2
    assert stats.max_concurrent == 2
    assert first.noop()[0] == second.noop()[0] == 250  # the two admitted ones are fine

    first.quit()
    _wait(lambda: relay.concurrent == 1, "the first connection's slot to free")
    third = _smtp(relay)
    third.sendmail("a@example.com", ["b@example.com"], DATA)
    third.quit()
    second.quit()
    assert relay.max_concurrent == 2
    assert relay.count() == 1


def test_the_421_comes_inside_tls_in_implicit_mode(start_relay: StartRelay) -> None:
    relay = start_relay(tls="implicit", max_connections=1)
    context = relay.client_context()
    conn = smtplib.SMTP_SSL(relay.host, relay.port, timeout=10, context=context)
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP_SSL(relay.host, relay.port, timeout=10, context=context)
    assert refused.value.smtp_code == 421
    conn.quit()
    assert relay.max_concurrent == 1
    assert relay.connections_refused == 1


def test_concurrent_clients_never_exceed_the_cap(start_relay: StartRelay) -> None:
    relay = start_relay(max_connections=2, rtt=0.004)
    codes: list[int] = []

    def client() -> None:
        for _ in range(10):
            try:
                conn = _smtp(relay)
            except smtplib.SMTPConnectError as refused:
                codes.append(refused.smtp_code)
                continue
            conn.noop()
            conn.quit()
            codes.append(250)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stats = relay.stats()
    assert set(codes) <= {250, 421}
    assert stats.connections_total == len(codes) == 40
    assert stats.connections_refused == codes.count(421)
    assert stats.max_concurrent <= 2
    _wait(lambda: relay.concurrent == 0, "every slot to free")


@pytest.mark.parametrize("polite", [True, False], ids=["quit", "close"])
def test_a_client_that_keeps_to_the_cap_is_never_refused(
    start_relay: StartRelay, polite: bool
) -> None:
    # The slot is freed when the relay sees the close, before it sees the next connect.
    relay = start_relay(max_connections=1, rtt=0.004)
    for i in range(15):
        conn = _smtp(relay)
        conn.sendmail("a@example.com", [f"r{i}@example.com"], DATA)
        if polite:
            conn.quit()
        else:
            conn.close()
    assert relay.connections_refused == 0
    assert relay.max_concurrent == 1
    assert relay.count() == 15


# --- programmed RCPT replies ----------------------------------------------------------


def test_a_rcpt_reply_is_given_for_that_address_only(start_relay: StartRelay) -> None:
    relay = start_relay()
    relay.set_rcpt_reply("Later@Example.com", "451 4.3.0 try later")
    relay.set_rcpt_reply("gone@example.com", "550 5.1.1 no such user")
    conn = _smtp(relay)
    refused = conn.sendmail(
        "a@example.com", ["ok@example.com", "later@example.com", "gone@example.com"], DATA
    )
    conn.quit()

    assert refused == {
        "later@example.com": (451, b"4.3.0 try later"),
        "gone@example.com": (550, b"5.1.1 no such user"),
    }
    [message] = relay.messages
    assert message.rcpt_to == ["ok@example.com"]
    assert relay.rcpt_replied == [
        ("later@example.com", "451 4.3.0 try later"),
        ("gone@example.com", "550 5.1.1 no such user"),
    ]
    assert relay.stats().rcpt_replied == 2


def test_a_4xx_inside_a_pipelined_flight_defers_only_that_recipient(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(rtt=0.01)
    relay.set_rcpt_reply("later@y.example", "451 4.3.0 try later")
    raw = _Raw(relay)
    raw.send(b"EHLO me\r\n")
    raw.replies(1)
    raw.send(
        b"MAIL FROM:<a@x.example>\r\n"
        b"RCPT TO:<one@y.example>\r\n"
        b"RCPT TO:<later@y.example>\r\n"
        b"RCPT TO:<two@y.example>\r\n"
        b"DATA\r\n"
    )
    assert raw.replies(5) == [250, 250, 451, 250, 354]
    raw.send(b"Subject: flight\r\n\r\nhi\r\n.\r\n")
    assert raw.replies(1) == [250]
    raw.close()

    [message] = relay.messages
    assert message.rcpt_to == ["one@y.example", "two@y.example"]
    assert relay.pipelined_flights == 1


def test_a_rcpt_reply_can_be_given_a_number_of_times(start_relay: StartRelay) -> None:
    relay = start_relay()
    relay.set_rcpt_reply("b@example.com", "451 4.3.0 try later", times=1)
    conn = _smtp(relay)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        conn.sendmail("a@example.com", ["b@example.com"], DATA)
    conn.rset()
    conn.sendmail("a@example.com", ["b@example.com"], DATA)  # the retry gets through
    conn.quit()
    assert relay.copies() == {"b@example.com": 1}


def test_a_rcpt_reply_must_be_a_failure() -> None:
    relay = RelaySimulator()
    with pytest.raises(ValueError, match="4xx or 5xx"):
        relay.set_rcpt_reply("b@example.com", "250 fine")


# --- counters and reset ---------------------------------------------------------------


def test_every_verb_is_counted_across_connections(start_relay: StartRelay) -> None:
    relay = start_relay()
    for _ in range(2):
        conn = _smtp(relay)
        conn.ehlo()
        conn.noop()
        conn.sendmail("a@example.com", ["b@example.com", "c@example.com"], DATA)
        conn.rset()
        conn.quit()

    commands = relay.commands()
    assert {verb: commands[verb] for verb in ("EHLO", "MAIL", "RCPT", "DATA")} == {
        "EHLO": 2,
        "MAIL": 2,
        "RCPT": 4,
        "DATA": 2,
    }
    assert (commands["NOOP"], commands["RSET"], commands["QUIT"]) == (2, 2, 2)
    assert (commands["STARTTLS"], commands["AUTH"], commands["HELO"]) == (0, 0, 0)
    assert relay.stats().commands == commands
    assert relay.copies() == {"b@example.com": 2, "c@example.com": 2}
    assert [m.rcpt_to for m in relay.received] == [["b@example.com", "c@example.com"]] * 2


def test_helo_withdraws_the_pipelining_offer(start_relay: StartRelay) -> None:
    relay = start_relay()
    raw = _Raw(relay)
    raw.send(b"HELO me\r\n")
    raw.replies(1)
    raw.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n")
    assert raw.replies(2) == [250, 250]
    raw.close()
    assert relay.pipelined_without_offer is True


def test_reset_forgets_messages_counters_and_rcpt_replies(start_relay: StartRelay) -> None:
    relay = start_relay(max_connections=1)
    relay.set_rcpt_reply("gone@example.com", "550 5.1.1 no such user")
    conn = _smtp(relay)
    conn.sendmail("a@example.com", ["b@example.com", "gone@example.com"], DATA)
    with pytest.raises(smtplib.SMTPConnectError):
        _smtp(relay)

    relay.reset()
    stats = relay.stats()
    assert relay.count() == 0
    assert (stats.connections_total, stats.connections_refused, stats.messages) == (0, 0, 0)
    assert set(stats.commands.values()) == {0}
    assert (stats.concurrent, stats.max_concurrent) == (1, 1), "the open one still counts"
    conn.sendmail("a@example.com", ["gone@example.com"], DATA)  # no reply programmed now
    conn.quit()
    assert relay.copies() == {"gone@example.com": 1}
    assert [s.messages for s in relay.sessions()] == [1]


# --- the command line -----------------------------------------------------------------


@pytest.mark.integration  # starts a process
def test_the_command_line_runs_a_relay_until_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailroom_testkit.relay",
            "--port",
            "0",
            "--rtt",
            "0.02",
            "--tls",
            "starttls",
            "--no-pipelining",
            "--max-connections",
            "3",
            "--cert-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "pipelining withheld" in banner, banner
        assert "max connections 3" in banner, banner
        port = int(banner.split("127.0.0.1:")[1].split()[0])
        ca_line = proc.stdout.readline().strip()
        ca_path = ca_line.removeprefix("CA certificate: ")
        assert Path(ca_path) == tmp_path / "relay-ca.pem"

        conn = smtplib.SMTP("127.0.0.1", port, timeout=10)
        conn.ehlo()
        assert not conn.has_extn("pipelining")
        conn.starttls(context=ssl.create_default_context(cafile=ca_path))
        conn.sendmail("a@example.com", ["b@example.com"], DATA)
        conn.quit()

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["messages"] == 1
    assert stats["commands"]["STARTTLS"] == 1
    assert stats["pipelined_without_offer"] is False
