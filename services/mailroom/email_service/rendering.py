"""Turning a template and its context into correct email bytes.

Rendering and MIME serialisation are the expensive part of a send, and in a batch they
are usually identical for every recipient. ``PreparedMessage`` does that work once and
adds only the per-recipient headers (To, Message-ID, Date) for each send.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from django.core.mail import EmailMultiAlternatives
from django.template import TemplateDoesNotExist
from django.template.loader import get_template
from inscriptis import get_text


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


def render(template: str, subject: str, context: dict[str, Any]) -> RenderedEmail:
    """Render ``emails/<template>.html`` (autoescaped) and its text part.

    The text part comes from ``emails/<template>.txt`` when it exists, otherwise it is
    converted from the HTML by inscriptis, which keeps links, lists and tables readable.
    """
    html = get_template(f"emails/{template}.html").render(context)
    try:
        text = get_template(f"emails/{template}.txt").render(context)
    except TemplateDoesNotExist:
        text = get_text(html)
    return RenderedEmail(subject=subject, html=html, text=text.strip() + "\n")


class PreparedMessage:
    """The MIME body and shared headers of one rendered email, serialised once."""

    def __init__(self, from_email: str, rendered: RenderedEmail) -> None:
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
        self._shared = mime.as_bytes(linesep="\r\n")

    def for_recipient(
        self, to: str, message_id: str, extra_headers: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        lines = [f"To: {to}", f"Message-ID: {message_id}", f"Date: {formatdate(usegmt=True)}"]
        lines.extend(f"{name}: {value}" for name, value in extra_headers)
        return ("\r\n".join(lines) + "\r\n").encode("ascii") + self._shared


class PreparedCache:
    """A small LRU of prepared messages: a batch usually shares one template and context."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._items: OrderedDict[str, PreparedMessage] = OrderedDict()

    def get(
        self, from_email: str, subject: str, template: str, context: dict[str, Any]
    ) -> PreparedMessage:
        key = json.dumps([from_email, subject, template, context], sort_keys=True)
        prepared = self._items.get(key)
        if prepared is None:
            prepared = PreparedMessage(from_email, render(template, subject, context))
            self._items[key] = prepared
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return prepared
