"""SMTP transport: warm sessions, pipelined transactions, verified TLS, every failure
classified.

``SMTPTransport.send`` never raises for an SMTP or network problem; it returns a
``SendResult`` saying whether the failure is permanent (5xx: never retry), transient
(4xx, timeouts, dropped connections: retry later) or a configuration error (the relay's
certificate does not verify, the login is refused: nothing will go until an operator
acts, so the caller stops the batch instead of retrying every message). After any
failed transaction the session is reset or dropped, so one bad reply never poisons the
messages after it.

When the server offers PIPELINING (RFC 2920), a message costs two round trips instead
of four: ``MAIL``, ``RCPT`` and ``DATA`` go in one flight and their replies are read and
classified one by one; then the content. A server that does not offer it gets the
classic dialogue (smtplib's ``sendmail``).

Sessions outlive a task: ``TransportPool`` keeps idle, logged-in sessions per process
(an idle timeout, a messages-per-connection cap, and a NOOP before reusing one that sat
idle), so a password reset finds a warm TLS session whenever one exists.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

# Replies by which a server asks us to slow down rather than to give up.
THROTTLE_CODES = frozenset({421, 450, 451, 452, 454})
_ENHANCED_BAD_MAILBOX = re.compile(r"^\s*5\.1\.\d{1,3}\b")
_LEADING_DOT = re.compile(rb"(?m)^\.")
# Reuse a session idle longer than this only after a NOOP says it is still there.
CHECK_AFTER_IDLE_SECONDS = 2.0


@dataclass(frozen=True)
class SendResult:
    code: int | None  # the SMTP reply code, or None when no reply came (network error)
    reply: str
    # The relay cannot be used as configured (certificate, login): not this message's
    # fault, and no retry helps until an operator changes something.
    config_error: bool = False
    # Nothing was tried: no connection slot was free (MAILROOM_SMTP_MAX_CONNECTIONS).
    untried: bool = False

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code is not None and 500 <= self.code < 600 and not self.config_error

    @property
    def bad_mailbox(self) -> bool:
        """A 5.1.x enhanced status: the address itself is bad; suppress it."""
        return self.permanent and bool(_ENHANCED_BAD_MAILBOX.match(self.reply))

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLE_CODES

    @property
    def reply_class(self) -> str:
        """A bounded label for metrics: 2xx, 4xx, 5xx or network."""
        return "network" if self.code is None else f"{self.code // 100}xx"


class RelayConfigError(Exception):
    """The relay refused us for a reason no retry fixes (TLS verification, AUTH)."""


class NoSlot(Exception):
    """The fleet holds every connection the budget allows."""


class Budget(Protocol):
    """Slots for open connections (``smtp_budget.ConnectionBudget``)."""

    def acquire(self, slot: str) -> bool: ...
    def renew(self, slot: str) -> None: ...
    def release(self, slot: str) -> None: ...


def _decode(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


@dataclass(frozen=True)
class TLSOptions:
    """How the relay's certificate is checked, and the certificate we show it."""

    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    # Loudly named on purpose: for a local self-signed relay only.
    insecure_skip_verify: bool = False

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert_file:
            context.load_cert_chain(self.client_cert_file, self.client_key_file or None)
        return context


def tls_options_from_settings() -> TLSOptions:
    from django.conf import settings

    return TLSOptions(
        ca_file=settings.MAILROOM_SMTP_CA_FILE,
        client_cert_file=settings.MAILROOM_SMTP_CLIENT_CERT_FILE,
        client_key_file=settings.MAILROOM_SMTP_CLIENT_KEY_FILE,
        insecure_skip_verify=settings.MAILROOM_SMTP_TLS_INSECURE_SKIP_VERIFY,
    )


class SMTPTransport:
    """One SMTP session, opened lazily, with a cap on messages per connection."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        use_tls: bool = False,
        use_ssl: bool = False,
        username: str = "",
        password: str = "",
        max_per_connection: int = 100,
        tls: TLSOptions | None = None,
        pipelining: bool = True,
        budget: Budget | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.use_tls = use_tls
        self.use_ssl = use_ssl
        self.username = username
        self.password = password
        self.max_per_connection = max_per_connection
        self.tls = tls or TLSOptions()
        self.pipelining = pipelining
        self.budget = budget
        self._slot = ""  # the budget slot this session holds while open
        self._renew_at = 0.0
        self.connections_opened = 0
        self._context: ssl.SSLContext | None = None
        self._conn: smtplib.SMTP | None = None
        self._sent_on_connection = 0
        self.last_used = 0.0  # time.monotonic() of the last reply, 0.0 when closed
        self._replied = False  # a reply came in the current transaction

    @classmethod
    def from_settings(cls) -> SMTPTransport:
        from django.conf import settings

        from email_service import smtp_budget

        return cls(
            settings.EMAIL_HOST,
            settings.EMAIL_PORT,
            timeout=settings.EMAIL_TIMEOUT,
            use_tls=settings.EMAIL_USE_TLS,
            use_ssl=settings.EMAIL_USE_SSL,
            username=settings.EMAIL_HOST_USER,
            password=settings.EMAIL_HOST_PASSWORD,
            max_per_connection=settings.MAILROOM_MESSAGES_PER_CONNECTION,
            tls=tls_options_from_settings(),
            pipelining=settings.MAILROOM_SMTP_PIPELINING,
            budget=smtp_budget.shared(),
        )

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = self.tls.context()
        return self._context

    def _open(self) -> smtplib.SMTP:
        if self.budget is not None:
            from email_service.smtp_budget import LEASE_SECONDS, new_slot_id

            slot = new_slot_id()
            if not self.budget.acquire(slot):
                raise NoSlot
            self._slot, self._renew_at = slot, time.monotonic() + LEASE_SECONDS / 3
        try:
            return self._connect()
        except BaseException:
            self._give_slot()
            raise

    def _give_slot(self) -> None:
        slot, self._slot = self._slot, ""
        if slot and self.budget is not None:
            self.budget.release(slot)

    def _connect(self) -> smtplib.SMTP:
        conn: smtplib.SMTP
        try:
            if self.use_ssl:
                conn = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=self._tls_context()
                )
            else:
                conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise RelayConfigError(self._tls_failure(exc)) from exc
        self.connections_opened += 1
        try:
            conn.ehlo()
            if self.use_tls:
                conn.starttls(context=self._tls_context())
                conn.ehlo()
            if self.username:
                conn.login(self.username, self.password)
        except ssl.SSLCertVerificationError as exc:
            self._discard(conn)
            raise RelayConfigError(self._tls_failure(exc)) from exc
        except smtplib.SMTPAuthenticationError as exc:
            self._discard(conn)
            raise RelayConfigError(
                f"the relay {self.host}:{self.port} refused the login of "
                f"EMAIL_HOST_USER={self.username!r}: {exc.smtp_code} {_decode(exc.smtp_error)}"
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            self._discard(conn)
            raise RelayConfigError(
                f"the relay {self.host}:{self.port} does not offer what the settings ask "
                f"for (STARTTLS or AUTH): {exc}"
            ) from exc
        except BaseException:
            self._discard(conn)
            raise
        self._sent_on_connection = 0
        return conn

    def _tls_failure(self, exc: ssl.SSLCertVerificationError) -> str:
        return (
            f"the relay {self.host}:{self.port} failed TLS verification: "
            f"{exc.verify_message or exc}. Give its CA in MAILROOM_SMTP_CA_FILE, or fix "
            "EMAIL_HOST to the name on its certificate."
        )

    def check(self) -> bool:
        """NOOP on an open session; False (and closed) if it is no longer usable."""
        if self._conn is None:
            return False
        try:
            code, _ = self._conn.noop()
        except (smtplib.SMTPException, OSError):
            self.close(quit=False)
            return False
        if code != 250:
            self.close(quit=False)
            return False
        self.last_used = time.monotonic()
        return True

    def connect(self) -> None:
        """Open (and log in) now, so the first message pays no handshake; raises
        ``RelayConfigError`` or an ``OSError``/``SMTPException``."""
        if self._conn is None:
            self._conn = self._open()
            self.last_used = time.monotonic()

    def send(self, from_addr: str, to_addr: str, data: bytes) -> SendResult:
        """Send one message to one recipient; never raises for SMTP or network errors."""
        fresh = self._conn is None
        try:
            if self._conn is None:
                self._conn = self._open()
            try:
                self._replied = False
                result = self._transaction(self._conn, from_addr, to_addr, data)
            except smtplib.SMTPServerDisconnected:
                if fresh or self._replied:
                    raise
                # A warm session the server had closed meanwhile, before its first reply
                # to this message: nothing was accepted, so it goes again on a new one.
                self.close(quit=False)
                self._conn = self._open()
                result = self._transaction(self._conn, from_addr, to_addr, data)
        except RelayConfigError as exc:
            self.close(quit=False)
            return SendResult(code=None, reply=str(exc), config_error=True)
        except NoSlot:
            return SendResult(
                code=None,
                reply="no connection slot free: MAILROOM_SMTP_MAX_CONNECTIONS are all open",
                untried=True,
            )
        except smtplib.SMTPResponseException as exc:
            # 421 on connect, EHLO errors...
            return self._failed(exc.smtp_code, _decode(exc.smtp_error))
        except (smtplib.SMTPException, OSError) as exc:
            # Dropped connection, timeout, refused connect: no reply to classify.
            self.close(quit=False)
            return SendResult(code=None, reply=f"{type(exc).__name__}: {exc}".strip())
        self.last_used = time.monotonic()
        if self._slot and self.last_used > self._renew_at and self.budget is not None:
            from email_service.smtp_budget import LEASE_SECONDS

            self.budget.renew(self._slot)
            self._renew_at = self.last_used + LEASE_SECONDS / 3
        if not result.ok:
            return self._failed(result.code, result.reply)
        self._sent_on_connection += 1
        if self._sent_on_connection >= self.max_per_connection:
            self.close()
        return result

    def _transaction(
        self, conn: smtplib.SMTP, from_addr: str, to_addr: str, data: bytes
    ) -> SendResult:
        """One message; raises only for the network (the caller classifies that)."""
        if not (self.pipelining and conn.has_extn("pipelining") and _ascii(from_addr, to_addr)):
            return self._classic(conn, from_addr, to_addr, data)
        options = f" SIZE={len(data)}" if conn.has_extn("size") else ""
        conn.send(f"MAIL FROM:<{from_addr}>{options}\r\nRCPT TO:<{to_addr}>\r\nDATA\r\n")
        # Every reply of the flight is read, in order, whatever the first ones said.
        replies = [conn.getreply()]
        self._replied = True
        replies += [conn.getreply(), conn.getreply()]
        (mail_code, mail_reply), (rcpt_code, rcpt_reply), (data_code, data_reply) = replies
        if data_code == 354:
            if mail_code != 250 or rcpt_code not in (250, 251):
                # A server that says 354 with no valid recipient: end the empty message.
                conn.send(b".\r\n")
                conn.getreply()
            else:
                conn.send(_dot_stuffed(data))
                code, reply = conn.getreply()
                return SendResult(code=code, reply=_decode(reply) if code != 250 else "OK")
        if mail_code != 250:
            return SendResult(code=mail_code, reply=_decode(mail_reply))
        if rcpt_code not in (250, 251):
            return SendResult(code=rcpt_code, reply=_decode(rcpt_reply))
        return SendResult(code=data_code, reply=_decode(data_reply))

    def _classic(self, conn: smtplib.SMTP, from_addr: str, to_addr: str, data: bytes) -> SendResult:
        """MAIL, RCPT, DATA, each awaited: for servers without PIPELINING, and for
        addresses that need SMTPUTF8."""
        options = [f"SIZE={len(data)}"] if conn.has_extn("size") else []
        if not _ascii(from_addr, to_addr):
            if not conn.has_extn("smtputf8"):
                return SendResult(553, "5.6.7 the relay does not offer SMTPUTF8 for this address")
            options.append("SMTPUTF8")
        code, reply = conn.mail(from_addr, options)
        self._replied = True
        if code != 250:
            return SendResult(code=code, reply=_decode(reply))
        code, reply = conn.rcpt(to_addr)
        if code not in (250, 251):
            return SendResult(code=code, reply=_decode(reply))
        try:
            code, reply = conn.data(data)
        except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
            return SendResult(code=exc.smtp_code, reply=_decode(exc.smtp_error))
        return SendResult(code=code, reply="OK" if code == 250 else _decode(reply))

    def _failed(self, code: int | None, reply: str) -> SendResult:
        if code == 421 or not self._reset():
            # 421: the server is closing the channel; anything else broken: reconnect.
            self.close(quit=False)
        return SendResult(code=code, reply=reply)

    def _reset(self) -> bool:
        """RSET after a failed transaction; False if the session is no longer usable."""
        if self._conn is None:
            return False
        try:
            code, _ = self._conn.rset()
        except (smtplib.SMTPException, OSError):
            return False
        return code == 250

    def close(self, *, quit: bool = True) -> None:
        conn, self._conn = self._conn, None
        self.last_used = 0.0
        if conn is not None:
            if quit:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    conn.quit()
            self._discard(conn)
            self._give_slot()

    @staticmethod
    def _discard(conn: smtplib.SMTP) -> None:
        try:
            conn.close()
        except OSError:
            logger.debug("error closing SMTP connection", exc_info=True)


def _ascii(*addresses: str) -> bool:
    return all(address.isascii() for address in addresses)


def _dot_stuffed(data: bytes) -> bytes:
    """The DATA content as sent: leading dots doubled, CRLF-terminated, then ``.``."""
    stuffed = _LEADING_DOT.sub(b"..", data)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


class TransportPool:
    """Idle SMTP sessions of this process, kept warm between tasks.

    ``take()`` hands out the most recently used idle session (checked with a NOOP if it
    sat idle more than CHECK_AFTER_IDLE_SECONDS, dropped past ``idle_timeout``) or a new
    one; ``give()`` takes it back. Thread-safe: delivery lanes share one pool.
    """

    def __init__(
        self, factory: Callable[[], SMTPTransport], *, idle_timeout: float, max_idle: int
    ) -> None:
        self._factory = factory
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._idle: list[SMTPTransport] = []
        self._lock = threading.Lock()

    def take(self) -> SMTPTransport:
        while True:
            with self._lock:
                transport = self._idle.pop() if self._idle else None
            if transport is None:
                return self._factory()
            idle = time.monotonic() - transport.last_used
            if not transport.is_open or idle > self._idle_timeout:
                transport.close()
                continue
            if idle <= CHECK_AFTER_IDLE_SECONDS or transport.check():
                return transport

    def give(self, transport: SMTPTransport) -> None:
        if not transport.is_open:
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(transport)
                return
        transport.close()

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for transport in idle:
            transport.close()


_pool: TransportPool | None = None
_pool_lock = threading.Lock()


def pool() -> TransportPool:
    """This process's pool, made on first use (after a prefork child's fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from django.conf import settings

            _pool = TransportPool(
                SMTPTransport.from_settings,
                idle_timeout=settings.MAILROOM_SMTP_IDLE_SECONDS,
                max_idle=settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS,
            )
        return _pool


def close_pool() -> None:
    """Close every idle session (worker shutdown, tests that change the relay)."""
    global _pool
    with _pool_lock:
        current, _pool = _pool, None
    if current is not None:
        current.close()
