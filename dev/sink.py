"""A development SMTP sink: accepts every message, delivers none, prints each one.

For every message it prints the From, To and Subject headers, the envelope, and the
text/plain part (not the HTML), between two marker lines. ``dev/run.py`` (``make dev``)
runs it as the ``smtp`` role; on its own::

    .venv/bin/python dev/sink.py --port 1025

It stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_TEXT_LINES = 60


def text_part(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    if body is None:
        return "(no text/plain part)"
    return str(body.get_content()).strip()


def _clipped(text: str) -> list[str]:
    lines = text.splitlines()
    if len(lines) <= MAX_TEXT_LINES:
        return lines
    return [*lines[:MAX_TEXT_LINES], f"... ({len(lines) - MAX_TEXT_LINES} more lines)"]


def summary(number: int, envelope: Envelope) -> str:
    """What the sink prints for one received message."""
    parsed = message_from_bytes(envelope.original_content or b"", policy=policy.default)
    if not isinstance(parsed, EmailMessage):  # Always one with policy.default.
        raise TypeError(f"unexpected message type {type(parsed).__name__}")
    recipients = ", ".join(envelope.rcpt_tos)
    lines = [
        f"----- message {number} -----",
        f"From:     {parsed.get('From', '')}",
        f"To:       {parsed.get('To', '')}",
        f"Subject:  {parsed.get('Subject', '')}",
        f"Envelope: MAIL FROM <{envelope.mail_from}> RCPT TO <{recipients}>",
        "",
        *_clipped(text_part(parsed)),
        f"----- end of message {number} -----",
    ]
    return "\n".join(lines)


class PrintingHandler:
    """aiosmtpd handler: print the message, answer 250."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received += 1
        try:
            print(summary(self.received, envelope), flush=True)
        except Exception as exc:  # A message we cannot parse is still accepted.
            print(f"----- message {self.received}: cannot print it: {exc!r}", flush=True)
        return "250 2.0.0 OK: printed by the dev sink, not delivered"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = PrintingHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mailroom-devsink"), host=host, port=port
    )
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    print(f"SMTP sink listening on {host}:{port}; messages are printed here", flush=True)
    await stopping.wait()
    server.close()
    await server.wait_closed()
    print(f"SMTP sink stopped after {handler.received} message(s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print every email sent to this SMTP port.")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1025, help="port (default: 1025)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except OSError as exc:
        print(f"SMTP sink cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
