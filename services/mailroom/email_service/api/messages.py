"""API: send one email, and ask what happened to it.

``POST /api/v1/messages`` accepts one email for one recipient and answers 202 at once;
a worker delivers it. With an ``Idempotency-Key`` header a client may retry freely: the
same key with the same body answers 202 again with the *original* message (nothing is
sent twice), the same key with another body answers 409.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from django.http import HttpRequest
from django.urls import register_converter
from ninja import Field, Header, Query, Router, Schema, Status
from pydantic import AfterValidator, AwareDatetime

from email_service import services
from email_service.api.auth import requires
from email_service.api.errors import COMMON_ERRORS, ApiError, ErrorOut
from email_service.models import DeliveryAttempt, Message
from email_service.validation import storable_json, storable_text

router = Router(tags=["messages"], auth=requires("send"))

MessageStatus = Literal[
    "queued", "sending", "sent", "deferred", "failed", "cancelled", "suppressed"
]
QueueName = Literal["high_priority", "bulk"]


class AnyTextConverter:
    """Django's ``path`` converter, line breaks included: a path parameter holding one
    still reaches the view (and a JSON answer), not Django's HTML 404 page."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(AnyTextConverter, "anytext")


Text = Annotated[str, AfterValidator(storable_text)]
JsonObject = Annotated[dict[str, Any], AfterValidator(storable_json)]


# --------------------------------------------------------------------------------------
# Cursors
# --------------------------------------------------------------------------------------


def encode_cursor(*parts: str) -> str:
    """An opaque page cursor holding ``parts`` (clients pass it back untouched)."""
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def bad_cursor() -> ApiError:
    message = "not a cursor this API returned"
    return ApiError(422, "invalid", f"cursor: {message}", [{"field": "cursor", "message": message}])


def decode_cursor(raw: str, count: int) -> list[str]:
    """The ``count`` parts of a cursor made by :func:`encode_cursor`, or a 422 naming
    ``cursor``."""
    try:
        data = base64.urlsafe_b64decode(raw.encode("ascii") + b"=" * (-len(raw) % 4))
        parts = json.loads(data)
    except (UnicodeError, binascii.Error, ValueError):
        raise bad_cursor() from None
    if not isinstance(parts, list) or len(parts) != count:
        raise bad_cursor()
    if not all(isinstance(p, str) and "\x00" not in p for p in parts):
        raise bad_cursor()
    return parts


def _message_cursor(key: services.MessageKey | None) -> str | None:
    if key is None:
        return None
    created_at, message_id = key
    return encode_cursor(created_at.isoformat(), message_id.hex)


def _message_key(cursor: str) -> services.MessageKey:
    created_at, message_id = decode_cursor(cursor, 2)
    try:
        when, ident = datetime.fromisoformat(created_at), uuid.UUID(hex=message_id)
    except ValueError:
        raise bad_cursor() from None
    if when.tzinfo is None:
        raise bad_cursor()
    return when, ident


# --------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------


class SendIn(Schema):
    to: Text = Field(..., max_length=320, description="One recipient address.")
    subject: Text = Field(..., max_length=998)
    template: Text = Field(
        ..., max_length=100, description="A template name, see `GET /api/v1/templates`."
    )
    context: JsonObject | None = Field(None, description="Values for the template.")
    from_email: Text | None = Field(
        None, max_length=320, description="Sender, `Name <address>` allowed; default: ours."
    )
    queue: QueueName = Field(
        "high_priority", description="`high_priority` (transactional) or `bulk`."
    )
    send_at: AwareDatetime | None = Field(
        None, description="Not before then (ISO 8601 with a time zone); default: at once."
    )
    expires_at: AwareDatetime | None = Field(
        None, description='Unsent by then, it is cancelled (`status_reason` "expired").'
    )


class AcceptedOut(Schema):
    id: uuid.UUID
    status: MessageStatus
    queue: QueueName
    to: str
    created_at: datetime


class AttemptOut(Schema):
    attempt: int
    at: datetime
    outcome: Literal["sent", "deferred", "failed"]
    smtp_code: int | None
    smtp_reply: str


class MessageSummary(Schema):
    id: uuid.UUID
    status: MessageStatus
    status_reason: str = Field(description='Why it ended unsent: "expired", "unsubscribed", ...')
    queue: QueueName
    to: str
    from_email: str
    subject: str
    template: str
    campaign_id: uuid.UUID | None
    attempt_count: int
    last_smtp_code: int | None
    last_smtp_reply: str
    next_attempt_at: datetime | None = Field(
        description="Not before then: a retry's backoff, or the `send_at` it was sent with."
    )
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


class MessageOut(MessageSummary):
    attempts: list[AttemptOut]


class MessagePage(Schema):
    items: list[MessageSummary]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class MessageFilters(Schema):
    status: MessageStatus | None = None
    to: Text | None = Field(None, max_length=320, description="Recipient, any case.")
    campaign: uuid.UUID | None = None
    limit: int = Field(50, ge=1, le=200)
    cursor: Text | None = Field(None, max_length=500, description="`next_cursor` of a page.")


def _accepted(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "status": message.status,
        "queue": message.queue,
        "to": message.to_email,
        "created_at": message.created_at,
    }


def _summary(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "status": message.status,
        "status_reason": message.status_reason,
        "queue": message.queue,
        "to": message.to_email,
        "from_email": message.from_email,
        "subject": message.subject,
        "template": message.template,
        "campaign_id": message.campaign_id,
        "attempt_count": message.attempts,
        "last_smtp_code": message.last_smtp_code,
        "last_smtp_reply": message.last_smtp_reply,
        "next_attempt_at": message.next_attempt_at,
        "expires_at": message.expires_at,
        "created_at": message.created_at,
        "updated_at": message.updated_at,
        "sent_at": message.sent_at,
    }


def _attempt(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "at": attempt.created_at,
        "outcome": attempt.outcome,
        "smtp_code": attempt.smtp_code,
        "smtp_reply": attempt.smtp_reply,
    }


# --------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------


@router.post(
    "",
    response={202: AcceptedOut, 400: ErrorOut, 409: ErrorOut, **COMMON_ERRORS},
    summary="Send one email",
    description=(
        "Accepts one email for one recipient and answers 202 at once; a worker delivers "
        "it. Retry safely with `Idempotency-Key`: the same key and the same body answer "
        "202 with the original message (status as it is now; nothing is sent twice); "
        "the same key with another body answers 409."
    ),
)
def send_message(
    request: HttpRequest,
    payload: SendIn,
    idempotency_key: Annotated[
        Text | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> Status[dict[str, Any]]:
    message = services.send_email(
        to=payload.to,
        subject=payload.subject,
        template=payload.template,
        context=payload.context,
        from_email=payload.from_email,
        queue=payload.queue,
        idempotency_key=idempotency_key,
        api_key=request.auth,  # type: ignore[attr-defined]
        send_at=payload.send_at,
        expires_at=payload.expires_at,
    )
    return Status(202, _accepted(message))


@router.get(
    "",
    response={200: MessagePage, **COMMON_ERRORS},
    summary="List messages, newest first",
)
def list_messages(request: HttpRequest, filters: Query[MessageFilters]) -> dict[str, Any]:
    after = _message_key(filters.cursor) if filters.cursor else None
    rows, next_key = services.list_messages(
        status=filters.status,
        to=filters.to,
        campaign_id=filters.campaign,
        after=after,
        limit=filters.limit,
    )
    return {"items": [_summary(m) for m in rows], "next_cursor": _message_cursor(next_key)}


@router.get(
    "/{message_id}",
    response={200: MessageOut, 404: ErrorOut, **COMMON_ERRORS},
    summary="One message, with every delivery attempt",
)
def get_message(request: HttpRequest, message_id: uuid.UUID) -> dict[str, Any]:
    message = services.get_message(message_id)
    return {**_summary(message), "attempts": [_attempt(a) for a in message.attempts_log.all()]}
