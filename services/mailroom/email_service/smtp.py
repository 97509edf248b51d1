"""SMTP transport: one connection reused across a batch, every failure classified.

``SMTPTransport.send`` never raises for an SMTP or network problem; it returns a
``SendResult`` saying whether the failure is permanent (5xx: never retry) or transient
(4xx, timeouts, dropped connections: retry later). After any failed transaction the
session is reset or dropped, so one bad reply never poisons the messages after it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import ssl
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Replies by which a server asks us to slow down rather than to give up.
THROTTLE_CODES = frozenset({421, 450, 451, 452, 454})
_ENHANCED_BAD_MAILBOX = re.compile(r"^\s*5\.1\.\d{1,3}\b")


@dataclass(frozen=True)
class SendResult:
    code: int | None  # the SMTP reply code, or None when no reply came (network error)
    reply: str

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code is not None and 500 <= self.code < 600

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


def _decode(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


class SMTPTransport:
    """A lazily opened SMTP session with a cap on messages per connection."""

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
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.use_tls = use_tls
        self.use_ssl = use_ssl
        self.username = username
        self.password = password
        self.max_per_connection = max_per_connection
        self.connections_opened = 0
        self._conn: smtplib.SMTP | None = None
        self._sent_on_connection = 0

    @classmethod
    def from_settings(cls) -> SMTPTransport:
        from django.conf import settings

        return cls(
            settings.EMAIL_HOST,
            settings.EMAIL_PORT,
            timeout=settings.EMAIL_TIMEOUT,
            use_tls=settings.EMAIL_USE_TLS,
            use_ssl=settings.EMAIL_USE_SSL,
            username=settings.EMAIL_HOST_USER,
            password=settings.EMAIL_HOST_PASSWORD,
            max_per_connection=settings.MAILROOM_MESSAGES_PER_CONNECTION,
        )

    def _open(self) -> smtplib.SMTP:
        conn: smtplib.SMTP
        if self.use_ssl:
            conn = smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        else:
            conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        self.connections_opened += 1
        try:
            if self.use_tls:
                conn.starttls(context=ssl.create_default_context())
            if self.username:
                conn.login(self.username, self.password)
        except BaseException:
            self._discard(conn)
            raise
        self._sent_on_connection = 0
        return conn

    def send(self, from_addr: str, to_addr: str, data: bytes) -> SendResult:
        """Send one message to one recipient; never raises for SMTP or network errors."""
        try:
            if self._conn is None:
                self._conn = self._open()
            self._conn.sendmail(from_addr, [to_addr], data)
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = exc.recipients.get(to_addr, (None, b"recipient refused"))
            return self._failed(code, _decode(reply))
        except smtplib.SMTPResponseException as exc:
            # Sender refused, data refused, 421 on connect, EHLO/AUTH errors...
            return self._failed(exc.smtp_code, _decode(exc.smtp_error))
        except (smtplib.SMTPException, OSError) as exc:
            # Dropped connection, timeout, refused connect: no reply to classify.
            self.close(quit=False)
            return SendResult(code=None, reply=f"{type(exc).__name__}: {exc}".strip())
        self._sent_on_connection += 1
        if self._sent_on_connection >= self.max_per_connection:
            self.close()
        return SendResult(code=250, reply="OK")

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
        if conn is not None:
            if quit:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    conn.quit()
            self._discard(conn)

    @staticmethod
    def _discard(conn: smtplib.SMTP) -> None:
        try:
            conn.close()
        except OSError:
            logger.debug("error closing SMTP connection", exc_info=True)
