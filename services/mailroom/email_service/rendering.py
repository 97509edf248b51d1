"""Turning a template and its context into correct email bytes.

Rendering and MIME serialisation are the expensive part of a send, and in a batch they
are usually identical for every recipient. ``PreparedMessage`` does that work once and
adds only the per-recipient headers (To, Message-ID, Date) for each send.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from email.message import Message
from email.mime.base import MIMEBase
from email.parser import BytesParser
from email.policy import Policy, compat32
from email.utils import formatdate
from typing import Any, cast

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template import Template
from inscriptis import get_text

from email_service import template_engine
from email_service.validation import sender_domain


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


def render(template: str, subject: str, context: dict[str, Any]) -> RenderedEmail:
    """Render ``emails/<template>.html`` (autoescaped) and its text part.

    The text part comes from ``emails/<template>.txt`` when it exists, otherwise it is
    converted from the HTML by inscriptis, which keeps links, lists and tables readable.
    Both go through the restricted email engine, each within its work and output
    limits; raises ``template_engine.EmailTemplateError``.
    """
    html = template_engine.render(template_engine.get_template(f"emails/{template}.html"), context)
    text_template = template_engine.find_template(f"emails/{template}.txt")
    if text_template is None:
        text = get_text(html)
    else:
        text = template_engine.render(text_template, context)
    return RenderedEmail(subject=subject, html=html, text=text.strip() + "\n")


class PreparedMessage:
    """The MIME body and shared headers of one rendered email, serialised once.

    ``placeholders`` are strings rendered into the body in place of per-recipient values
    (the unsubscribe link); ``for_recipient`` swaps them in the serialised bytes, which is
    safe because Django sends ordinary text as 8bit, unencoded. When a body had to be
    encoded (very long lines), the swap is done before serialising instead.
    """

    def __init__(
        self, from_email: str, rendered: RenderedEmail, placeholders: tuple[str, ...] = ()
    ) -> None:
        self.from_email = from_email
        self.rendered = rendered
        self._shared = self._serialise(from_email, rendered)
        self._swappable = all(
            self._shared.count(p.encode()) == rendered.html.count(p) + rendered.text.count(p)
            for p in placeholders
        )

    @staticmethod
    def _serialise(from_email: str, rendered: RenderedEmail) -> bytes:
        email = EmailMultiAlternatives(
            subject=rendered.subject,
            body=rendered.text,
            from_email=from_email,
            # Placeholders stop Django from looking up the host name; replaced per send.
            headers={"Message-ID": "<placeholder@localhost>", "Date": "placeholder"},
        )
        email.attach_alternative(rendered.html, "text/html")
        mime = email.message()
        del mime["Message-ID"]
        del mime["Date"]
        return mime.as_bytes(linesep="\r\n")

    def for_recipient(
        self,
        to: str,
        message_id: str,
        extra_headers: tuple[tuple[str, str], ...] = (),
        substitutions: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        lines = [f"To: {to}", f"Message-ID: {message_id}", f"Date: {formatdate(usegmt=True)}"]
        lines.extend(f"{name}: {value}" for name, value in extra_headers)
        return ("\r\n".join(lines) + "\r\n").encode("ascii") + self._body(substitutions)

    def _body(self, substitutions: tuple[tuple[str, str], ...]) -> bytes:
        if not substitutions:
            return self._shared
        if self._swappable:
            body = self._shared
            for placeholder, value in substitutions:
                body = body.replace(placeholder.encode(), value.encode())
            return body
        html, text = self.rendered.html, self.rendered.text
        for placeholder, value in substitutions:
            html, text = html.replace(placeholder, value), text.replace(placeholder, value)
        return self._serialise(self.from_email, RenderedEmail(self.rendered.subject, html, text))


def message_id_header(message_id: uuid.UUID, from_email: str) -> str:
    """The Message-ID of the outbox row ``message_id``: ``<hex of the id@domain>``, so a
    report quoting it leads back to the row. ``MESSAGE_ID_SQL`` is the same form for the
    COPY ingest, which builds it in SQL; a test holds the two equal."""
    return f"<{message_id.hex}@{message_id_domain(from_email)}>"


# ``message_id_header`` in SQL: ``{id}`` is the uuid column, ``%s`` the domain parameter.
MESSAGE_ID_SQL = "'<' || replace({id}::text, '-', '') || '@' || %s || '>'"


def message_id_domain(from_email: str) -> str:
    """The right-hand side of our Message-IDs: configured, else the sender's domain (so
    receivers see ids on the sending domain, not the container's host name)."""
    domain = settings.MAILROOM_MESSAGE_ID_DOMAIN or _sender_domain(from_email)
    return str(domain or "mailroom.example.com")


@functools.lru_cache(maxsize=256)
def _sender_domain(from_email: str) -> str:
    """The domain of a sender (``Team <team@example.com>``); few senders, many messages."""
    return sender_domain(from_email)


def render_subject(subject: str, context: dict[str, Any]) -> str:
    """A campaign's subject is a template too (caller code, so the restricted engine
    with its limits renders it); the result is one clean header line. Raises
    ``template_engine.EmailTemplateError``."""
    if "{" not in subject:
        return subject
    rendered = template_engine.render(_subject_template(subject), context, autoescape=False)
    return " ".join(rendered.split())[:998]


@functools.lru_cache(maxsize=256)
def _subject_template(subject: str) -> Template:
    return template_engine.from_string(subject)


class PreparedCache:
    """A small LRU of prepared messages: a batch usually shares one template and context."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._items: OrderedDict[str, PreparedMessage] = OrderedDict()
        self._raw: OrderedDict[tuple[str, str, str], RawMessage] = OrderedDict()

    def get(
        self,
        from_email: str,
        subject: str,
        template: str,
        context: dict[str, Any],
        placeholders: tuple[str, ...] = (),
    ) -> PreparedMessage:
        key = json.dumps([from_email, subject, template, context], sort_keys=True)
        prepared = self._items.get(key)
        if prepared is None:
            rendered = render(template, subject, context)
            prepared = PreparedMessage(from_email, rendered, placeholders)
            self._items[key] = prepared
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return prepared

    def raw(self, from_email: str, subject: str, content: dict[str, Any]) -> RawMessage:
        """A caller-rendered message. Its recipients' rows share the content's ``ref``
        and are consecutive, so a cache of two is enough (and attachments are big)."""
        key = (str(content.get("ref", "")), from_email, subject)
        message = self._raw.get(key)
        if message is None:
            message = self._raw[key] = RawMessage(from_email, subject, content)
            if len(self._raw) > 2:
                self._raw.popitem(last=False)
        return message


# --------------------------------------------------------------------------------------
# Raw messages: content the caller rendered (the Django email backend)
# --------------------------------------------------------------------------------------

RAW_TEMPLATE = "__raw__"
"""The ``template`` of a message whose content the caller rendered. No real template
can have this name (template names start with a letter or a digit). Its ``context``
holds the content: see ``services.prepare_raw_email``."""


class RawMessage:
    """A caller-rendered email, serialised once for all of its recipients.

    The visible To and Cc headers are the lists the sender wrote, the same for every
    recipient (Bcc never appears); only Message-ID, Date and the queue's extra headers
    (List-Unsubscribe on bulk) are added per send.
    """

    def __init__(self, from_email: str, subject: str, content: dict[str, Any]) -> None:
        email = EmailMultiAlternatives(
            subject=subject,
            body=content.get("text", ""),
            from_email=from_email,
            to=content.get("to", []),
            cc=content.get("cc", []),
            reply_to=content.get("reply_to", []),
            headers={
                **dict(content.get("headers", [])),
                "Message-ID": "<placeholder@localhost>",
                "Date": "placeholder",
            },
        )
        email.mixed_subtype = content.get("mixed_subtype", "mixed")
        for alternative in content.get("alternatives", []):
            email.attach_alternative(alternative["content"], alternative["mimetype"])
        for attachment in content.get("attachments", []):
            data = base64.b64decode(attachment["content"])
            if attachment.get("part"):
                email.attach(_stored_part(data))
            else:
                email.attach(attachment["filename"], data, attachment["mimetype"])
        mime = email.message()
        del mime["Message-ID"]
        del mime["Date"]
        self._shared = mime.as_bytes(linesep="\r\n")
        self._own = frozenset(name.lower() for name in mime)
        self._to = b"" if "to" in self._own else b"To: undisclosed-recipients:;\r\n"

    def for_recipient(
        self,
        to: str,
        message_id: str,
        extra_headers: tuple[tuple[str, str], ...] = (),
        substitutions: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        lines = [f"Message-ID: {message_id}", f"Date: {formatdate(usegmt=True)}"]
        # The sender's own List-Unsubscribe (say) wins over the one Mailroom would add.
        lines.extend(f"{n}: {v}" for n, v in extra_headers if n.lower() not in self._own)
        return self._to + ("\r\n".join(lines) + "\r\n").encode("ascii") + self._shared


class _StoredPart(MIMEBase):
    """A MIME part the sender built (an inline image with its Content-ID, say), parsed
    back from its stored bytes; a MIMEBase so that Django attaches it as it is."""

    def __init__(self, policy: Policy | None = None) -> None:
        Message.__init__(self, policy=policy or compat32)


def _stored_part(data: bytes) -> MIMEBase:
    part = BytesParser(_class=_StoredPart).parsebytes(data)
    return cast(MIMEBase, part)
