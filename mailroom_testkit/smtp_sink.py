"""An SMTP server on a real socket that records every delivery and can misbehave.

It runs aiosmtpd in a thread of the test process. Faults are programmed per test:
answer 4xx/5xx for chosen messages or addresses, drop the connection mid-DATA (before
the message is accepted) or right after accepting it (the relay has the message, the
client never hears its 250), refuse every connection ("down"), or slow every message
down. Everything the sink *accepted* is in ``messages``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_to: str
    data: bytes
    at: float

    def parsed(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)


# A rule sees (message number, recipient) and returns an SMTP reply to refuse with, or
# None to let the message through. Message numbers count DATA commands, from 1.
Rule = Callable[[int, str], str | None]


@dataclass
class SinkState:
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    data_commands: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    drop_at: set[int] = field(default_factory=set)
    drop_after_accept_at: set[int] = field(default_factory=set)
    dropped_after_accept: int = 0
    delay: float = 0.0
    down: bool = False


class _Handler:
    def __init__(self, state: SinkState, lock: threading.Lock) -> None:
        self.state = state
        self.lock = lock

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.state.data_commands += 1
            number = self.state.data_commands
            rcpt = envelope.rcpt_tos[0] if envelope.rcpt_tos else ""
            drop = number in self.state.drop_at
            drop_after = number in self.state.drop_after_accept_at
            reply = (
                None
                if drop
                else next((r for r in (rule(number, rcpt) for rule in self.state.rules) if r), None)
            )
        if self.state.delay:
            await asyncio.sleep(self.state.delay)
        if drop:
            # The relay dies after reading the message and before queueing it.
            cast(asyncio.Transport, server.transport).abort()
            return "421 4.3.2 connection dropped by test"
        if reply:
            with self.lock:
                self.state.refused.append((rcpt, reply))
            return reply
        with self.lock:
            self.state.messages.append(
                Received(
                    mail_from=str(envelope.mail_from),
                    rcpt_to=rcpt,
                    data=bytes(envelope.original_content or b""),
                    at=time.monotonic(),
                )
            )
            if drop_after:
                self.state.dropped_after_accept += 1
        if drop_after:
            # The relay queued the message and died before saying so.
            cast(asyncio.Transport, server.transport).abort()
            return "421 4.3.2 connection dropped by test after accepting"
        return "250 2.0.0 OK queued"


class _CountingSMTP(SMTP):
    def __init__(self, *args: Any, sink_state: SinkState, lock: threading.Lock, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._sink_state = sink_state
        self._sink_lock = lock
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self._sink_lock:
            self._sink_state.connections += 1
            down = self._sink_state.down
        self._refused = down
        if down:
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return  # never set up: aiosmtpd's own teardown would assert on the session
        super().connection_lost(exc)


class SMTPSink:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.lock = threading.Lock()
        self.state = SinkState()
        handler = _Handler(self.state, self.lock)
        state, lock = self.state, self.lock

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return _CountingSMTP(self.handler, sink_state=state, lock=lock, **self.SMTP_kwargs)

        self._controller = _Controller(handler, hostname=host, port=port)

    def start(self) -> SMTPSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def reset(self) -> None:
        with self.lock:
            self.state.messages.clear()
            self.state.refused.clear()
            self.state.rules.clear()
            self.state.drop_at.clear()
            self.state.drop_after_accept_at.clear()
            self.state.dropped_after_accept = 0
            self.state.connections = 0
            self.state.data_commands = 0
            self.state.delay = 0.0
            self.state.down = False

    # --- what was received ---------------------------------------------------------
    @property
    def received(self) -> list[Received]:
        with self.lock:
            return list(self.state.messages)

    def count(self) -> int:
        with self.lock:
            return len(self.state.messages)

    def copies(self) -> Counter[str]:
        """How many copies each recipient received."""
        return Counter(m.rcpt_to for m in self.received)

    @property
    def connections(self) -> int:
        with self.lock:
            return self.state.connections

    # --- faults --------------------------------------------------------------------
    def add_rule(self, rule: Rule) -> None:
        with self.lock:
            self.state.rules.append(rule)

    def refuse_every(self, nth: int, reply: str, until_message: int) -> None:
        """Refuse every ``nth`` message with ``reply`` while fewer than ``until_message``
        DATA commands have been seen ("for a while")."""
        self.add_rule(lambda n, _rcpt: reply if n % nth == 0 and n <= until_message else None)

    def refuse_address(self, address: str, reply: str) -> None:
        self.add_rule(lambda _n, rcpt: reply if rcpt.lower() == address.lower() else None)

    def drop_connection_at(self, *numbers: int) -> None:
        with self.lock:
            self.state.drop_at.update(numbers)

    def drop_after_accepting_at(self, *numbers: int) -> None:
        """Accept (and record) these DATA commands, then drop the connection before the
        250 reply: the client cannot know, so it sends again (an unavoidable duplicate)."""
        with self.lock:
            self.state.drop_after_accept_at.update(numbers)

    @property
    def data_commands(self) -> int:
        with self.lock:
            return self.state.data_commands

    @property
    def dropped_after_accept(self) -> int:
        with self.lock:
            return self.state.dropped_after_accept

    def set_delay(self, seconds: float) -> None:
        with self.lock:
            self.state.delay = seconds

    def set_down(self, down: bool) -> None:
        with self.lock:
            self.state.down = down
