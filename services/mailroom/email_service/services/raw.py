"""Raw messages: content the caller rendered (the Django email backend).

``prepare_raw_email`` checks an email as Django describes one (addresses, headers from
an allow-list, bodies, attachments) without storing anything; ``send_raw_emails``
stores prepared emails in one transaction, one ``Message`` per recipient.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.errors import MessageError
from typing import Any

from django.conf import settings
from django.db import router, transaction
from inscriptis import get_text

from email_service.exceptions import InvalidEmailRequest
from email_service.models import (
    Message,
    Queue,
)
from email_service.rendering import (
    RAW_TEMPLATE,
    RawMessage,
)
from email_service.services.accepting import EmailRequest, accept_rows, allowed_sender
from email_service.validation import (
    check_header,
    parse_mailbox,
    parse_mailboxes,
)

logger = logging.getLogger(__name__)


# Headers a caller may set besides X-* ones. Mailroom writes the others itself: From,
# To, Cc and Reply-To from their own arguments; Subject, Date, Message-ID, MIME-Version,
# Content-* and DKIM-Signature. X-Mailroom-* names are reserved for Mailroom.
RAW_HEADER_NAMES = (
    "Reply-To", "In-Reply-To", "References", "Keywords", "Comments", "Organization",
    "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Help", "List-Archive",
    "List-Owner", "List-Post", "List-Subscribe", "Auto-Submitted", "Precedence",
    "Priority", "Importance", "Sensitivity", "Feedback-ID", "Content-Language",
    "Thread-Topic", "Thread-Index", "Disposition-Notification-To",
)  # fmt: skip


_RAW_HEADERS = frozenset(name.lower() for name in RAW_HEADER_NAMES)


MAX_RAW_HEADERS = 50


DEFAULT_MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024


_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII without ":" (RFC 5322)


_MIME_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*", re.ASCII)


_MIME_SUBTYPE = re.compile(r"[a-z][a-z0-9.+-]{0,40}")


RawAttachment = tuple[str | None, bytes | str, str | None] | bytes


@dataclass(frozen=True)
class RawEmail:
    """A caller-rendered email that passed every check; ``send_raw_emails`` stores it."""

    addresses: tuple[str, ...]
    request: EmailRequest


def max_attachment_bytes() -> int:
    return int(getattr(settings, "MAILROOM_MAX_ATTACHMENT_BYTES", DEFAULT_MAX_ATTACHMENT_BYTES))


def prepare_raw_email(
    *,
    subject: str,
    body: str = "",
    body_subtype: str = "plain",
    from_email: str | None = None,
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    reply_to: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    alternatives: Sequence[tuple[str, str]] = (),
    attachments: Sequence[RawAttachment] = (),
    mixed_subtype: str = "mixed",
    queue: str = Queue.HIGH_PRIORITY,
) -> RawEmail:
    """Check an email whose content the caller rendered, the way Django describes one.

    Every address in ``to``, ``cc`` and ``bcc`` gets its own message (one copy per
    address); the visible To and Cc headers show the lists as given, Bcc never appears.
    An HTML body (``body_subtype="html"``) or an HTML alternative without a text body
    gets a text part converted from the HTML. ``attachments`` are ``(filename, content,
    mimetype)`` or the bytes of a whole MIME part (an inline image with its Content-ID);
    together at most MAILROOM_MAX_ATTACHMENT_BYTES. Stored as template ``__raw__``
    whose context is the content; the worker builds the MIME once per batch.
    """
    if queue not in Queue.values:
        raise InvalidEmailRequest("queue", f"must be one of {', '.join(Queue.values)}")
    sender = allowed_sender(from_email)
    visible: dict[str, list[str]] = {"to": [], "cc": [], "reply_to": []}
    addresses: dict[str, str] = {}
    for field_name, values in (("to", to), ("cc", cc), ("bcc", bcc), ("reply_to", reply_to)):
        for index, value in enumerate(_address_list(values, field_name)):
            address, mailbox = _raw_mailbox(value, f"{field_name}[{index}]")
            if field_name != "bcc":
                visible[field_name].append(mailbox)
            if field_name != "reply_to":
                addresses.setdefault(address.lower(), address)
    if not addresses:
        raise InvalidEmailRequest("to", "at least one recipient (to, cc or bcc) is required")
    content: dict[str, Any] = {"ref": uuid.uuid4().hex}
    content["headers"] = _raw_headers(headers or {}, visible["reply_to"])
    content.update({key: values for key, values in visible.items() if values})
    content.update(_raw_body(body, body_subtype, alternatives))
    content["attachments"] = _raw_attachments(attachments)
    if mixed_subtype != "mixed":
        if not isinstance(mixed_subtype, str) or not _MIME_SUBTYPE.fullmatch(mixed_subtype):
            raise InvalidEmailRequest("mixed_subtype", f"{mixed_subtype!r} is not a MIME subtype")
        content["mixed_subtype"] = mixed_subtype
    content = {key: value for key, value in content.items() if value}
    request = EmailRequest(check_header(subject, "subject"), RAW_TEMPLATE, content, sender, queue)
    try:
        RawMessage(request.from_email, request.subject, content)
    except (ValueError, TypeError, LookupError, MessageError) as exc:
        # What cannot be built now would fail at send time: say so now.
        raise InvalidEmailRequest("message", f"cannot be built: {exc}") from exc
    return RawEmail(tuple(addresses.values()), request)


def send_raw_emails(emails: Sequence[RawEmail]) -> list[list[Message]]:
    """Store prepared emails, all in one transaction: one ``Message`` per recipient."""
    with transaction.atomic(using=router.db_for_write(Message)):
        return [
            accept_rows(e.addresses, e.request, None, [None] * len(e.addresses)) for e in emails
        ]


def _address_list(values: object, field_name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidEmailRequest(field_name, "must be a list of addresses, not one string")
    return list(values)


def _raw_mailbox(value: object, field_name: str) -> tuple[str, str]:
    """(the address, the mailbox as shown in a header: display name kept, quoted)."""
    return parse_mailbox(value, field_name)


def _raw_headers(headers: Mapping[str, str], reply_to: list[str]) -> list[list[str]]:
    if not isinstance(headers, Mapping):
        raise InvalidEmailRequest("headers", "must be a mapping of header names to values")
    if len(headers) > MAX_RAW_HEADERS:
        raise InvalidEmailRequest("headers", f"at most {MAX_RAW_HEADERS} custom headers")
    kept = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidEmailRequest("headers", f"{name!r} is not a valid header name")
        lowered = name.lower()
        if lowered.startswith("x-mailroom-") or not (
            lowered in _RAW_HEADERS or lowered.startswith("x-")
        ):
            raise InvalidEmailRequest(
                "headers",
                f"{name} cannot be set: Mailroom writes it, or it is not one of X-*, "
                + ", ".join(RAW_HEADER_NAMES),
            )
        check_header(value, f"headers[{name}]", max_length=998 - len(name) - 2)
        if lowered == "reply-to":
            if not reply_to:  # Django's rule: an explicit reply_to wins over the header
                reply_to.extend(
                    mailbox for _, mailbox in parse_mailboxes(value, "headers[Reply-To]")
                )
            continue
        kept.append([name, value])
    return kept


def _raw_body(
    body: object, subtype: object, alternatives: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    if not isinstance(body, str):
        raise InvalidEmailRequest("body", "must be a string")
    if subtype not in ("plain", "html"):
        raise InvalidEmailRequest("body", f"content subtype {subtype!r}: only plain or html")
    parts = [(body, "text/html")] if subtype == "html" and body else []
    for index, alternative in enumerate(alternatives):
        content, mimetype = alternative
        if not isinstance(content, str):
            raise InvalidEmailRequest(f"alternatives[{index}]", "content must be a string")
        parts.append((content, _mime_type(mimetype, f"alternatives[{index}]")))
    text = body if subtype == "plain" else ""
    if not text.strip():
        html = next((content for content, mimetype in parts if mimetype == "text/html"), "")
        text = get_text(html).strip() + "\n" if html.strip() else text
    if "\x00" in text or any("\x00" in content for content, _ in parts):
        raise InvalidEmailRequest("body", "must not contain NUL characters")
    return {
        "text": text,
        "alternatives": [{"content": content, "mimetype": mime} for content, mime in parts],
    }


def _raw_attachments(attachments: Sequence[RawAttachment]) -> list[dict[str, Any]]:
    if isinstance(attachments, bytes | str) or not isinstance(attachments, Sequence):
        raise InvalidEmailRequest("attachments", "must be a list")
    stored: list[dict[str, Any]] = []
    total = 0
    for index, attachment in enumerate(attachments):
        field_name = f"attachments[{index}]"
        if isinstance(attachment, bytes):
            total += len(attachment)
            stored.append({"part": True, "content": base64.b64encode(attachment).decode()})
            continue
        if not isinstance(attachment, tuple | list) or len(attachment) != 3:
            raise InvalidEmailRequest(field_name, "must be (filename, content, mimetype)")
        filename, data, mimetype = attachment
        if filename is not None:
            check_header(filename, f"{field_name}.filename", max_length=255)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise InvalidEmailRequest(field_name, "content must be bytes or a string")
        guessed = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
        total += len(data)
        stored.append(
            {
                "filename": filename,
                "mimetype": _mime_type(mimetype or guessed, field_name),
                "content": base64.b64encode(data).decode(),
            }
        )
    limit = max_attachment_bytes()
    if total > limit:
        raise InvalidEmailRequest(
            "attachments",
            f"{total} bytes in all, over the limit of {limit} (MAILROOM_MAX_ATTACHMENT_BYTES)",
        )
    return stored


def _mime_type(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not _MIME_TYPE.fullmatch(value):
        raise InvalidEmailRequest(field_name, f"{value!r} is not a MIME type")
    return value.lower()
