"""A simulated far-away ESP relay on a real socket, for tests and benchmarks.

``RelaySimulator`` runs, in a background thread of the calling process (or in the
foreground: ``python -m mailroom_testkit.relay``), one asyncio event loop with two
listeners on 127.0.0.1:

* a TCP proxy (the port clients connect to) that forwards the bytes of each direction
  ``rtt / 2`` seconds after they arrived, in order, each chunk on its own clock (a chunk
  that arrives while an earlier one is still "in flight" is not held up by it). TLS
  passes through as bytes. The proxy also enforces the connection cap: a connection over
  ``max_connections`` is answered ``421 4.7.0 Too many connections, try again later``
  (after the TLS handshake in implicit-TLS mode) and closed, never reaching the server;
* an aiosmtpd server behind it (the style of ``smtp_sink``) that does STARTTLS or
  implicit TLS with a certificate from a ``trustme`` test CA made at start, AUTH
  PLAIN/LOGIN, offers or withholds PIPELINING (RFC 2920), answers programmed replies to
  RCPT TO for chosen addresses, counts every command and records what it accepted.

Pipelining is observed on the server, after TLS: a client pipelined when a command of
its was already waiting (or arrived) while the server was still answering the one
before. One *flight* is counted per group of such commands; it ends when the server has
answered everything it was sent and waits for the client. A client that waits for each
reply (the classic dialogue) never makes a flight, however the network splits or joins
its bytes.

Nothing is logged per message; aiosmtpd's own logger (``mail.log``) is raised to WARNING
while a simulator runs (``quiet=True``), as its per-line INFO records would otherwise
cost more than the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import re
import shutil
import signal
import ssl
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, Literal, cast

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

TLSMode = Literal["none", "starttls", "implicit"]
TLS_MODES: tuple[TLSMode, ...] = ("none", "starttls", "implicit")

TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later\r\n"
COUNTED_VERBS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS", "AUTH")


@dataclass
class RelayMessage:
    """One message the relay accepted (a 250 to the end of DATA)."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes
    at: float  # time.monotonic() when it was accepted
    session: int  # SessionRecord.number of the connection it came on

    def parsed(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)


@dataclass
class SessionRecord:
    """One SMTP session (one accepted connection), as the server saw it."""

    number: int
    opened_at: float
    tls: bool = False
    pipelining_offered: bool = False  # whether the last EHLO advertised PIPELINING
    pipelined_flights: int = 0
    pipelined_without_offer: bool = False
    authenticated_as: str | None = None
    messages: int = 0
    closed_at: float | None = None


@dataclass(frozen=True)
class RelayStats:
    connections_total: int  # every connection that reached the relay, refused ones too
    connections_refused: int  # answered 421 for the cap
    concurrent: int  # accepted connections open now
    max_concurrent: int  # the most accepted connections open at once
    commands: dict[str, int]
    auth_succeeded: int
    auth_failed: int
    pipelined_flights: int
    pipelined_without_offer: bool
    messages: int
    rcpt_replied: int  # RCPTs answered with a programmed reply

    @property
    def connections_accepted(self) -> int:
        return self.connections_total - self.connections_refused


@dataclass
class _RcptRule:
    reply: str
    times: int | None  # None: every time


@dataclass
class _State:
    messages: list[RelayMessage] = field(default_factory=list)
    sessions: list[SessionRecord] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    rcpt_rules: dict[str, _RcptRule] = field(default_factory=dict)
    rcpt_replied: list[tuple[str, str]] = field(default_factory=list)
    connections_total: int = 0
    connections_refused: int = 0
    concurrent: int = 0
    max_concurrent: int = 0
    auth_succeeded: int = 0
    auth_failed: int = 0
    pipelined_flights: int = 0
    pipelined_without_offer: bool = False


# --- the proxy -----------------------------------------------------------------------


class _Pipe:
    """One direction of a proxied connection. Each chunk is written ``delay`` after it
    arrived: a FIFO of (deliver_at, chunk) drained by one timer, so chunks keep their
    order and their own clocks. ``None`` in the queue is the end: the destination is
    closed (after its buffered bytes are written) when it comes due."""

    __slots__ = ("_closed", "_delay", "_last", "_loop", "_queue", "_timer", "dest")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: Callable[[], float]) -> None:
        self._loop = loop
        self._delay = delay
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._closed = False
        self.dest: asyncio.Transport | None = None

    def send(self, data: bytes | None) -> None:
        if self._closed:
            return
        if data is None:
            self._closed = True
        delay = self._delay()
        if delay <= 0 and not self._queue and self.dest is not None:
            self._deliver(data)
            return
        # max(): if rtt is lowered while bytes are in flight, order still holds.
        at = max(self._loop.time() + delay, self._last)
        self._last = at
        self._queue.append((at, data))
        if self._timer is None and self.dest is not None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def attach(self, dest: asyncio.Transport) -> None:
        self.dest = dest
        if self._queue and self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def cancel(self) -> None:
        """The destination is gone: drop what is in flight and anything sent later."""
        self._closed = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time()
        queue = self._queue
        while queue and queue[0][0] <= now:
            self._deliver(queue.popleft()[1])
        if queue:
            self._timer = self._loop.call_at(queue[0][0], self._flush)

    def _deliver(self, data: bytes | None) -> None:
        dest = self.dest
        assert dest is not None
        if dest.is_closing():
            return
        if data is None:
            dest.close()
        else:
            dest.write(data)


class _ProxyConnection:
    __slots__ = ("_released", "client", "core", "refused", "to_client", "to_server", "upstream")

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.to_server = _Pipe(core.loop, core.one_way)
        self.to_client = _Pipe(core.loop, core.one_way)
        self.refused = False
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            if not self.refused:
                self.core.release()


class _ClientSide(asyncio.Protocol):
    """The proxy's end of a client's connection."""

    def __init__(self, core: _Core) -> None:
        self.core = core
        self.conn = _ProxyConnection(core)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conn
        conn.client = cast(asyncio.Transport, transport)
        conn.to_client.attach(conn.client)
        self.core.transports.add(transport)
        if not self.core.admit():
            conn.refused = True
            self.core.spawn(self.core.refuse(conn), delay=2 * self.core.one_way())
            return
        self.core.spawn(self.core.connect_upstream(conn), delay=self.core.one_way())

    def data_received(self, data: bytes) -> None:
        if not self.conn.refused:
            self.conn.to_server.send(data)

    def eof_received(self) -> bool:
        # The client is done; the slot is free now. Keep the transport open for the
        # replies still in flight: it is closed when the upstream's end reaches it.
        self.conn.release()
        self.conn.to_server.send(None)
        return not self.conn.refused

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        self.core.transports.discard(conn.client)
        conn.release()
        conn.to_client.cancel()
        conn.to_server.send(None)

    def pause_writing(self) -> None:
        if self.conn.upstream is not None:
            self.conn.upstream.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.conn.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.resume_reading()


class _ServerSide(asyncio.Protocol):
    """The proxy's connection to the SMTP server, for one client."""

    def __init__(self, conn: _ProxyConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.upstream = cast(asyncio.Transport, transport)
        self.conn.core.transports.add(transport)
        self.conn.to_server.attach(self.conn.upstream)

    def data_received(self, data: bytes) -> None:
        self.conn.to_client.send(data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost passes the end on

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        conn.core.transports.discard(conn.upstream)
        conn.release()
        conn.to_server.cancel()
        conn.to_client.send(None)

    def pause_writing(self) -> None:
        if self.conn.client is not None:
            self.conn.client.pause_reading()

    def resume_writing(self) -> None:
        client = self.conn.client
        if client is not None and not client.is_closing():
            client.resume_reading()


class _RefusedTLS(asyncio.Protocol):
    """Application side of a refused implicit-TLS connection: reads nothing."""


# --- the SMTP server -----------------------------------------------------------------


# "<local@domain>" in dot-atom form, the shape nearly every client sends: parsed with a
# regex; anything else goes to aiosmtpd's parser (the email package's, which is slower
# than the rest of a message's handling put together).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)")


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read by the SMTP state machine."""
    return len(reader._buffer)  # type: ignore[attr-defined]


class _Session(Session):
    """aiosmtpd's session without the deprecation warning it logs on every successful
    AUTH (smtp_AUTH still sets the legacy ``login_data``)."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _RelaySMTP(SMTP):
    def __init__(self, handler: _RelayHandler, *, core: _Core, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.core = core
        self.record: SessionRecord | None = None
        self.offered_pipelining = False
        self._busy = False  # answering a command
        self._awaiting_input = False  # after a 334 or 354: the client's next bytes are not commands
        self._in_flight = False
        self._first_transport: asyncio.BaseTransport | None = None
        methods = self._smtp_methods
        for verb, method in list(methods.items()):
            methods[verb] = self._watch(verb, method)

    def _watch(self, verb: str, method: Callable[[str | None], Any]) -> Callable[[str | None], Any]:
        core = self.core

        if verb == "STARTTLS":
            # The TLS handshake and the EHLO that follows it are not pipelining.
            async def starttls(arg: str | None) -> None:
                core.count(verb)
                await method(arg)

            return starttls

        async def run(arg: str | None) -> None:
            core.count(verb)
            if _buffered(self._reader):
                self._pipelined()  # more was waiting behind this command
            self._busy = True
            try:
                await method(arg)
            finally:
                self._busy = False
            if _buffered(self._reader):
                self._pipelined()  # arrived before this command's reply was written
            else:
                self._in_flight = False

        return run

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _SIMPLE_ADDRESS.fullmatch(arg)
        if match is None or (self.local_part_limit and match[1].index("@") > self.local_part_limit):
            return super()._getaddr(arg)
        return match[1], match[2].lstrip()

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _pipelined(self) -> None:
        if self._in_flight or self.record is None:
            return
        self._in_flight = True
        self.core.pipelined(self.record, offered=self.offered_pipelining)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrading = self._original_transport is not None  # STARTTLS done
        super().connection_made(transport)
        if upgrading:
            self.offered_pipelining = False
            if self.record is not None:
                self.core.mark_tls(self.record)
        else:
            tls = transport.get_extra_info("sslcontext") is not None
            self.record = self.core.open_session(tls)
            self._first_transport = transport
            self.core.transports.add(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.core.transports.discard(self._first_transport)
        if self.record is not None:
            self.core.close_session(self.record)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self._busy and not self._awaiting_input:
            self._pipelined()
        super().data_received(data)

    async def push(self, status: AnyStr) -> None:
        code = status[:3]
        self._awaiting_input = code in ("334", "354", b"334", b"354")
        await super().push(status)


class _RelayHandler:
    def __init__(self, core: _Core) -> None:
        self.core = core

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        smtp = cast(_RelaySMTP, server)
        smtp.offered_pipelining = False
        if smtp.record is not None:
            self.core.note_ehlo(smtp.record, False)
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the new-style hook must set it
        core = self.core
        if not core.has_auth:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        offered = core.pipelining
        if offered:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        smtp = cast(_RelaySMTP, server)
        smtp.offered_pipelining = offered
        if smtp.record is not None:
            core.note_ehlo(smtp.record, offered)
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.core.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.core.rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        core = self.core
        if core.data_delay > 0:
            await asyncio.sleep(core.data_delay)
        record = cast(_RelaySMTP, server).record
        number = core.accept(
            RelayMessage(
                mail_from=str(envelope.mail_from),
                rcpt_to=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                at=time.monotonic(),
                session=record.number if record is not None else 0,
            ),
            record,
        )
        return f"250 2.0.0 OK queued as {number}"


# --- shared state, used from the loop thread and from the caller's ---------------------


class _Core:
    """Configuration and state shared by the protocols (in the loop's thread) and the
    public API (any thread). Counters change under ``lock``."""

    def __init__(self, relay: RelaySimulator, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop
        self.lock = relay.lock
        self.state = relay._state
        self.has_auth = relay.username is not None
        self.auth_required = relay.auth_required
        # Every open transport of the proxy and the server, to abort on stop.
        self.transports: set[asyncio.BaseTransport | None] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.upstream_port = 0
        self.refusal_tls: ssl.SSLContext | None = None
        self.session_numbers = itertools.count(1)  # not reset: open sessions keep theirs

    # configuration read live, so a test may change it on a running simulator
    def one_way(self) -> float:
        return self.relay.rtt / 2

    @property
    def pipelining(self) -> bool:
        return self.relay.pipelining

    @property
    def data_delay(self) -> float:
        return self.relay.data_delay

    # proxy
    def spawn(self, coro: Any, delay: float = 0.0) -> None:
        def start() -> None:
            task = self.loop.create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        if delay > 0:
            self.loop.call_later(delay, start)
        else:
            start()

    def admit(self) -> bool:
        cap = self.relay.max_connections
        with self.lock:
            state = self.state
            state.connections_total += 1
            if cap is not None and state.concurrent >= cap:
                state.connections_refused += 1
                return False
            state.concurrent += 1
            state.max_concurrent = max(state.max_concurrent, state.concurrent)
            return True

    def release(self) -> None:
        with self.lock:
            self.state.concurrent -= 1

    async def connect_upstream(self, conn: _ProxyConnection) -> None:
        client = conn.client
        if client is None or client.is_closing():
            return
        try:
            await self.loop.create_connection(
                lambda: _ServerSide(conn), "127.0.0.1", self.upstream_port
            )
        except OSError:
            conn.release()
            client.abort()

    async def refuse(self, conn: _ProxyConnection) -> None:
        try:
            transport = conn.client
            if transport is None or transport.is_closing():
                return
            if self.refusal_tls is not None:  # implicit TLS: say it inside the TLS session
                try:
                    tls = await self.loop.start_tls(
                        transport, _RefusedTLS(), self.refusal_tls, server_side=True
                    )
                except OSError:  # SSLError, a reset, a handshake timeout
                    tls = None
                if tls is None:
                    transport.abort()
                    return
                transport = tls
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
        finally:
            conn.release()
            if self.refusal_tls is not None:  # its connection_lost goes to the TLS layer
                self.transports.discard(conn.client)

    # server
    def count(self, verb: str) -> None:
        with self.lock:
            self.state.commands[verb] += 1

    def open_session(self, tls: bool) -> SessionRecord:
        with self.lock:
            record = SessionRecord(
                number=next(self.session_numbers), opened_at=time.monotonic(), tls=tls
            )
            self.state.sessions.append(record)
            return record

    def close_session(self, record: SessionRecord) -> None:
        with self.lock:
            record.closed_at = time.monotonic()

    def mark_tls(self, record: SessionRecord) -> None:
        with self.lock:
            record.tls = True
            record.pipelining_offered = False

    def note_ehlo(self, record: SessionRecord, offered: bool) -> None:
        with self.lock:
            record.pipelining_offered = offered

    def pipelined(self, record: SessionRecord, offered: bool) -> None:
        with self.lock:
            record.pipelined_flights += 1
            self.state.pipelined_flights += 1
            if not offered:
                record.pipelined_without_offer = True
                self.state.pipelined_without_offer = True

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        relay = self.relay
        ok = (
            isinstance(auth_data, LoginPassword)
            and relay.username is not None
            and auth_data.login == relay.username.encode()
            and auth_data.password == (relay.password or "").encode()
        )
        with self.lock:
            if ok:
                self.state.auth_succeeded += 1
            else:
                self.state.auth_failed += 1
            record = cast(_RelaySMTP, server).record
            if ok and record is not None:
                record.authenticated_as = relay.username
        # handled=False: aiosmtpd answers a failure with its 535 (handled means "replied").
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def rcpt_reply(self, address: str) -> str | None:
        if not self.state.rcpt_rules:  # the common case, without the lock
            return None
        key = address.lower()
        with self.lock:
            rule = self.state.rcpt_rules.get(key)
            if rule is None:
                return None
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    del self.state.rcpt_rules[key]
            self.state.rcpt_replied.append((address, rule.reply))
            return rule.reply

    def accept(self, message: RelayMessage, record: SessionRecord | None) -> int:
        with self.lock:
            self.state.messages.append(message)
            if record is not None:
                record.messages += 1
            return len(self.state.messages)


# --- the public class ----------------------------------------------------------------

_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_saved_level = logging.NOTSET


def _quiet_aiosmtpd(on: bool) -> None:
    """Raise aiosmtpd's logger to WARNING while any quiet simulator runs, then put its
    level back."""
    global _quiet_users, _quiet_saved_level
    logger = logging.getLogger("mail.log")
    with _quiet_lock:
        if on:
            if _quiet_users == 0:
                _quiet_saved_level = logger.level
                if logger.getEffectiveLevel() < logging.WARNING:
                    logger.setLevel(logging.WARNING)
            _quiet_users += 1
        else:
            _quiet_users -= 1
            if _quiet_users == 0:
                logger.setLevel(_quiet_saved_level)


class RelaySimulator:
    """An SMTP relay on 127.0.0.1 that behaves like a far-away ESP relay.

    ``port`` 0 picks a free port (read ``port`` after ``start()``). ``rtt``,
    ``pipelining``, ``max_connections`` and ``data_delay`` may be changed while it runs
    (they apply to bytes, EHLOs and connections from then on); everything else is fixed
    at construction.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        rtt: float = 0.0,
        pipelining: bool = True,
        tls: TLSMode = "none",
        require_starttls: bool = False,
        cert_hostnames: Sequence[str] = ("127.0.0.1", "localhost"),
        cert_dir: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        auth_required: bool | None = None,
        auth_require_tls: bool | None = None,
        max_connections: int | None = None,
        data_delay: float = 0.0,
        server_name: str = "relay.test",
        timeout: float = 300,
        quiet: bool = True,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        if require_starttls and tls != "starttls":
            raise ValueError("require_starttls needs tls='starttls'")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if rtt < 0:
            raise ValueError("rtt must be >= 0")
        if max_connections is not None and max_connections < 0:
            raise ValueError("max_connections must be >= 0 or None")
        self.host = host
        self.port = port
        self.rtt = rtt
        self.pipelining = pipelining
        self.tls: TLSMode = tls
        self.require_starttls = require_starttls
        self.username = username
        self.password = password
        # A relay with credentials wants them, by default; AUTH over plain text only
        # when there is no TLS to do it over.
        self.auth_required = username is not None if auth_required is None else auth_required
        self.auth_require_tls = tls != "none" if auth_require_tls is None else auth_require_tls
        self.max_connections = max_connections
        self.data_delay = data_delay
        self.server_name = server_name
        self.timeout = timeout
        self.quiet = quiet
        self.cert_hostnames = tuple(cert_hostnames)

        self.lock = threading.Lock()
        self._state = _State()
        self.ca: trustme.CA | None = None
        self.ca_pem_path: str | None = None
        self._server_tls: ssl.SSLContext | None = None
        self._cert_dir = Path(cert_dir) if cert_dir is not None else None
        self._own_cert_dir: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._core: _Core | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._quieted = False

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> RelaySimulator:
        assert self._thread is None, "already running"
        if self.tls != "none" and self.ca is None:
            self._make_certificates()
        if self.quiet:
            _quiet_aiosmtpd(True)
            self._quieted = True
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._core = _Core(self, loop)
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="relay-simulator", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(self._core), loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread, core = self._loop, self._thread, self._core
        if loop is None or thread is None or core is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(core), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
        self._loop = self._thread = self._core = None
        self._servers = []
        if self._quieted:
            _quiet_aiosmtpd(False)
            self._quieted = False
        if self._own_cert_dir is not None:
            shutil.rmtree(self._own_cert_dir, ignore_errors=True)
            self._own_cert_dir = None
            self.ca = None
            self.ca_pem_path = None
            self._server_tls = None

    def __enter__(self) -> RelaySimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def upstream_port(self) -> int:
        """The SMTP server's own port, behind the proxy (no delay, no cap): for debugging."""
        return self._core.upstream_port if self._core is not None else 0

    # --- TLS ---------------------------------------------------------------------------
    def _make_certificates(self) -> None:
        self.ca = trustme.CA(organization_name="Mailroom relay simulator")
        cert = self.ca.issue_cert(*self.cert_hostnames)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        cert.configure_cert(context)
        self._server_tls = context
        if self._cert_dir is None:
            self._own_cert_dir = Path(tempfile.mkdtemp(prefix="relay-ca-"))
            directory = self._own_cert_dir
        else:
            directory = self._cert_dir
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / "relay-ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        self.ca_pem_path = str(path)

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context that trusts the test CA (and nothing else)."""
        assert self.ca_pem_path is not None, "no TLS: construct with tls='starttls' or 'implicit'"
        context = ssl.create_default_context(cafile=self.ca_pem_path)
        context.check_hostname = check_hostname
        return context

    # --- the loop's side ---------------------------------------------------------------
    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _serve(self, core: _Core) -> None:
        loop = core.loop
        handler = _RelayHandler(core)
        starttls = self._server_tls if self.tls == "starttls" else None
        kwargs: dict[str, Any] = {
            "core": core,
            "loop": loop,
            "hostname": self.server_name,
            "ident": "ESMTP relay simulator",
            "enable_SMTPUTF8": True,
            "tls_context": starttls,
            "require_starttls": self.require_starttls,
            "auth_require_tls": self.auth_require_tls,
            "timeout": self.timeout,
        }
        if self.username is not None:
            kwargs["authenticator"] = core.authenticate

        def factory() -> _RelaySMTP:
            return _RelaySMTP(handler, **kwargs)

        implicit = self._server_tls if self.tls == "implicit" else None
        core.refusal_tls = implicit
        upstream = await loop.create_server(factory, "127.0.0.1", 0, ssl=implicit)
        self._servers.append(upstream)
        core.upstream_port = int(upstream.sockets[0].getsockname()[1])
        proxy = await loop.create_server(lambda: _ClientSide(core), self.host, self.port)
        self._servers.append(proxy)
        self.port = int(proxy.sockets[0].getsockname()[1])

    async def _shutdown(self, core: _Core) -> None:
        for server in self._servers:
            server.close()
        for transport in list(core.transports):
            if transport is not None:
                cast(asyncio.Transport, transport).abort()
        for server in self._servers:
            await server.wait_closed()
        for _ in range(3):  # let the aborts' connection_lost callbacks run
            await asyncio.sleep(0)

    # --- what was received ---------------------------------------------------------------
    @property
    def messages(self) -> list[RelayMessage]:
        with self.lock:
            return list(self._state.messages)

    received = messages  # the SMTPSink name

    def count(self) -> int:
        with self.lock:
            return len(self._state.messages)

    def copies(self) -> Counter[str]:
        """How many copies each recipient received."""
        return Counter(rcpt for m in self.messages for rcpt in m.rcpt_to)

    def sessions(self) -> list[SessionRecord]:
        """A copy of every session's record, in the order they were opened."""
        with self.lock:
            return [dataclasses.replace(s) for s in self._state.sessions]

    def commands(self) -> dict[str, int]:
        """How many times each verb was received (and handled), across all connections."""
        with self.lock:
            counts = dict.fromkeys(COUNTED_VERBS, 0)
            counts.update(self._state.commands)
            return counts

    def stats(self) -> RelayStats:
        """A consistent snapshot of every counter."""
        with self.lock:
            s = self._state
            commands = dict.fromkeys(COUNTED_VERBS, 0)
            commands.update(s.commands)
            return RelayStats(
                connections_total=s.connections_total,
                connections_refused=s.connections_refused,
                concurrent=s.concurrent,
                max_concurrent=s.max_concurrent,
                commands=commands,
                auth_succeeded=s.auth_succeeded,
                auth_failed=s.auth_failed,
                pipelined_flights=s.pipelined_flights,
                pipelined_without_offer=s.pipelined_without_offer,
                messages=len(s.messages),
                rcpt_replied=len(s.rcpt_replied),
            )

    @property
    def rcpt_replied(self) -> list[tuple[str, str]]:
        """(address, reply) for every RCPT answered with a programmed reply."""
        with self.lock:
            return list(self._state.rcpt_replied)

    def _read(self, name: str) -> Any:
        with self.lock:
            return getattr(self._state, name)

    @property
    def connections_total(self) -> int:
        return int(self._read("connections_total"))

    @property
    def connections_refused(self) -> int:
        return int(self._read("connections_refused"))

    @property
    def concurrent(self) -> int:
        return int(self._read("concurrent"))

    @property
    def max_concurrent(self) -> int:
        return int(self._read("max_concurrent"))

    @property
    def auth_succeeded(self) -> int:
        return int(self._read("auth_succeeded"))

    @property
    def auth_failed(self) -> int:
        return int(self._read("auth_failed"))

    @property
    def pipelined_flights(self) -> int:
        return int(self._read("pipelined_flights"))

    @property
    def pipelined_without_offer(self) -> bool:
        return bool(self._read("pipelined_without_offer"))

    # --- programmed replies ------------------------------------------------------------
    def set_rcpt_reply(self, address: str, reply: str, *, times: int | None = None) -> None:
        """Answer RCPT TO:<address> (case-insensitive) with ``reply`` (a 4xx or 5xx line,
        e.g. "451 4.3.0 try later"), ``times`` times (None: until cleared). The
        recipient is not added to the envelope; the other recipients are unaffected."""
        if not (len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "45"):
            raise ValueError(f"a RCPT reply must be a 4xx or 5xx reply, not {reply!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self.lock:
            self._state.rcpt_rules[address.lower()] = _RcptRule(reply, times)

    def clear_rcpt_replies(self) -> None:
        with self.lock:
            self._state.rcpt_rules.clear()

    def reset(self) -> None:
        """Forget what was received, the counters and the programmed RCPT replies; the
        settings are kept. Connections open now stay open, counted in ``concurrent``
        (and so in ``max_concurrent``); their sessions stay listed, counters zeroed."""
        with self.lock:
            old = self._state
            new = _State(concurrent=old.concurrent, max_concurrent=old.concurrent)
            for record in old.sessions:
                if record.closed_at is None:
                    record.pipelined_flights = record.messages = 0
                    record.pipelined_without_offer = False
                    new.sessions.append(record)
            self._state = new
            if self._core is not None:
                self._core.state = new


# --- the command line ----------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mailroom_testkit.relay",
        description="Run the relay simulator in the foreground until SIGINT/SIGTERM; "
        "print its counters as JSON when it stops.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--rtt", type=float, default=0.0, help="round-trip time, seconds")
    parser.add_argument("--tls", choices=TLS_MODES, default="none")
    parser.add_argument("--require-starttls", action="store_true")
    parser.add_argument(
        "--pipelining", action=argparse.BooleanOptionalAction, default=True, help="offer it"
    )
    parser.add_argument("--max-connections", type=int, default=None)
    parser.add_argument("--cert-dir", default=None, help="where to write relay-ca.pem")
    parser.add_argument(
        "--cert-hostname",
        action="append",
        default=None,
        help="a name the certificate is issued for (repeatable; default 127.0.0.1, localhost)",
    )
    parser.add_argument("--username", default=None)
    parser.add_argument("--password", default=None)
    parser.add_argument("--data-delay", type=float, default=0.0, help="seconds before DATA's 250")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _until_signalled() -> Iterator[threading.Event]:
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    relay = RelaySimulator(
        args.port,
        host=args.host,
        rtt=args.rtt,
        pipelining=args.pipelining,
        tls=args.tls,
        require_starttls=args.require_starttls,
        cert_hostnames=tuple(args.cert_hostname or ("127.0.0.1", "localhost")),
        cert_dir=args.cert_dir,
        username=args.username,
        password=args.password,
        max_connections=args.max_connections,
        data_delay=args.data_delay,
    )
    with _until_signalled() as stop, relay:
        offered = "offered" if relay.pipelining else "withheld"
        cap = relay.max_connections if relay.max_connections is not None else "unlimited"
        print(
            f"relay simulator listening on {relay.host}:{relay.port} "
            f"(rtt {relay.rtt:.3f} s, tls {relay.tls}, pipelining {offered}, "
            f"max connections {cap})",
            flush=True,
        )
        if relay.ca_pem_path is not None:
            print(f"CA certificate: {relay.ca_pem_path}", flush=True)
        while not stop.wait(0.5):
            pass
        stats = dataclasses.asdict(relay.stats())
    print(json.dumps(stats, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
