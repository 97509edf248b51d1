"""Accepting email: a request is validated and its ``Message`` rows are written in one
transaction; only after commit is a task enqueued that carries the row ids.

Used by the API, Python calls (``send_email``, the original tasks' ``.delay()``), the
commands, and ``raw`` (the email backend). Who may send as whom (``allowed_sender``)
and idempotency keys are decided here.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connections, router, transaction
from django.utils import timezone

from email_service import (
    redisstore,
    template_engine,
)
from email_service.exceptions import IdempotencyConflict, InvalidEmailRequest
from email_service.models import (
    ApiKey,
    Campaign,
    Message,
    Queue,
    Suppression,
)
from email_service.redisstore import Outcome
from email_service.rendering import (
    message_id_header,
    render,
)
from email_service.services.dispatch import enqueue, suppressed_addresses
from email_service.validation import (
    check_context,
    check_header,
    check_sender_allowed,
    check_subject,
    check_template,
    envelope_address,
    normalize_address,
    normalize_from,
    sender_domain,
)

logger = logging.getLogger(__name__)


def send_email(
    *,
    to: str,
    subject: str,
    template: str,
    context: dict[str, Any] | None = None,
    from_email: str | None = None,
    queue: str = Queue.HIGH_PRIORITY,
    idempotency_key: str | None = None,
    campaign: Campaign | None = None,
    api_key: ApiKey | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> Message:
    """Accept one email for one recipient. Transactional (``high_priority``) by default.

    ``send_at``: not before then (Celery's ``eta``); ``expires_at``: unsent by then, it is
    cancelled with reason ``expired`` (Celery's ``expires``). Naive times are UTC.

    With ``idempotency_key``, a second call with the same key and the same request
    returns the first message instead of sending again; the same key with a different
    request raises ``IdempotencyConflict``. Idempotency keys are scoped by ``api_key``
    (the caller of the HTTP API; None for Python calls), which also decides which
    senders are allowed (``SenderNotAllowed``).
    """
    address = normalize_address(to, "to")
    mine = Message.objects.filter(api_key=api_key)
    if idempotency_key is not None:
        check_header(idempotency_key, "idempotency_key", max_length=200)
        existing = mine.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return _same_request(existing, address, subject, template, context, from_email, queue)
    request = validated_request(
        subject, template, context, from_email, queue, api_key, send_at, expires_at
    )
    try:
        [message] = accept_rows([address], request, campaign, [idempotency_key])
    except IntegrityError:
        # Another request with the same key got there first; it owns the send.
        if idempotency_key is None:
            raise
        existing = mine.get(idempotency_key=idempotency_key)
        return _same_request(existing, address, subject, template, context, from_email, queue)
    return message


def _same_request(
    existing: Message,
    address: str,
    subject: object,
    template: object,
    context: object,
    from_email: object,
    queue: object,
) -> Message:
    """The stored message when it was accepted for this very request, else a conflict."""
    sender = normalize_from(from_email or settings.DEFAULT_FROM_EMAIL, "from_email")
    same = (
        existing.to_email == address
        and existing.subject == subject
        and existing.template == template
        and existing.context == (context or {})
        and existing.from_email == sender
        and existing.queue == queue
    )
    if not same:
        raise IdempotencyConflict(str(existing.idempotency_key), existing.id)
    return existing


def send_bulk_batch(
    recipients: Iterable[str],
    subject: str,
    context: dict[str, Any] | None,
    template: str,
    *,
    from_email: str | None = None,
    campaign: Campaign | None = None,
    idempotency_prefix: str | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> list[Message]:
    """Accept one email per recipient on the ``bulk`` queue, all or nothing
    (``send_at`` and ``expires_at`` as for ``send_email``).

    Duplicate addresses collapse to one message. Any invalid address refuses the
    whole batch (naming it) and stores nothing.
    """
    if isinstance(recipients, str):
        raise InvalidEmailRequest("recipients", "must be a list of addresses, not one string")
    addresses: list[str] = []
    seen: set[str] = set()
    for index, raw in enumerate(recipients):
        address = normalize_address(raw, f"recipients[{index}]")
        if address.lower() not in seen:
            seen.add(address.lower())
            addresses.append(address)
    if not addresses:
        raise InvalidEmailRequest("recipients", "at least one recipient is required")
    request = validated_request(
        subject, template, context, from_email, Queue.BULK, None, send_at, expires_at
    )
    keys: list[str | None] = (
        [f"{idempotency_prefix}:{i}" for i in range(len(addresses))]
        if idempotency_prefix
        else [None] * len(addresses)
    )
    if idempotency_prefix:
        existing = list(Message.objects.filter(api_key=None, idempotency_key__in=keys))
        if existing:
            return existing
    return accept_rows(addresses, request, campaign, keys)


@dataclass(frozen=True)
class EmailRequest:
    subject: str
    template: str
    context: dict[str, Any]
    from_email: str
    queue: str
    api_key_id: int | None = None
    send_at: datetime | None = None
    expires_at: datetime | None = None
    # Due too late for a Celery countdown: no task now, the sweeper enqueues the rows once
    # due (long countdowns are never used: Redis would redeliver them after its
    # visibility timeout, again and again). Decided once, so a batch is held or not whole.
    held: bool = False


def validated_request(
    subject: object,
    template: object,
    context: object,
    from_email: object,
    queue: object,
    api_key: ApiKey | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> EmailRequest:
    if queue not in Queue.values:
        raise InvalidEmailRequest("queue", f"must be one of {', '.join(Queue.values)}")
    send_at, expires_at = _when(send_at, "send_at"), _when(expires_at, "expires_at")
    now = timezone.now()
    if send_at is not None and send_at <= now:
        send_at = None
    wait = (send_at - now).total_seconds() if send_at else 0.0
    request = EmailRequest(
        subject=check_subject(subject),
        template=check_template(template),
        context=check_context(context),
        from_email=allowed_sender(from_email, api_key),
        queue=str(queue),
        api_key_id=api_key.pk if api_key else None,
        send_at=send_at,
        expires_at=expires_at,
        held=wait > settings.MAILROOM_MAX_COUNTDOWN_SECONDS,
    )
    try:
        render(request.template, request.subject, request.context)
    except template_engine.EmailTemplateError as exc:
        # A template that cannot render this context would fail at send time: say so now.
        raise InvalidEmailRequest("template", f"cannot render {template!r}: {exc}") from exc
    return request


def _when(value: object, field: str) -> datetime | None:
    """A moment as stored: aware (a naive one is UTC, as Celery reads ``eta``)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidEmailRequest(field, "must be a datetime")
    return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)


def allowed_sender(from_email: object, api_key: ApiKey | None = None) -> str:
    """The sender as stored (one quoted mailbox), if ``api_key`` (or, without one, the
    process's own code) may send as it; else ``SenderNotAllowed`` naming ``from_email``.

    A key's own ``allowed_senders`` win; without them MAILROOM_ALLOWED_SENDERS applies,
    and when that is empty too, DEFAULT_FROM_EMAIL's domain. DEFAULT_FROM_EMAIL itself
    is always allowed: it is what a caller gets by sending none.
    """
    default = normalize_from(settings.DEFAULT_FROM_EMAIL, "DEFAULT_FROM_EMAIL")
    if not from_email:
        return default
    sender = normalize_from(from_email, "from_email")
    allowed = (api_key.allowed_senders if api_key else None) or _default_senders(default)
    check_sender_allowed(sender, [*allowed, envelope_address(default)])
    return sender


def _default_senders(default: str) -> list[str]:
    # getattr: another Django project may use the backend with settings of its own.
    return list(getattr(settings, "MAILROOM_ALLOWED_SENDERS", [])) or [sender_domain(default)]


def _new_row(
    address: str,
    request: EmailRequest,
    campaign: Campaign | None,
    idempotency_key: str | None,
    token: str,
    now: datetime,
    *,
    suppressed: bool = False,
) -> Message:
    """The one encoding of a new row for every accept path that stores through the ORM
    (the CSV/COPY ingest writes the same columns in SQL)."""
    message_uuid = uuid.uuid4()
    held = request.held
    return Message(
        id=message_uuid,
        queue=request.queue,
        campaign=campaign,
        from_email=request.from_email,
        to_email=address,
        subject=request.subject,
        template=request.template,
        context=request.context,
        status=Message.Status.SUPPRESSED if suppressed else Message.Status.QUEUED,
        dispatch_token="" if suppressed or held else token,
        dispatched_at=None if held else now,
        next_attempt_at=request.send_at,
        expires_at=request.expires_at,
        message_id_header=message_id_header(message_uuid, request.from_email),
        idempotency_key=idempotency_key,
        api_key_id=request.api_key_id,
        # Explicit values: a database default costs bulk_create an expression per row.
        created_at=now,
        updated_at=now,
    )


def accept_rows(
    addresses: Sequence[str],
    request: EmailRequest,
    campaign: Campaign | None,
    idempotency_keys: Sequence[str | None],
) -> list[Message]:
    """Write the rows in one transaction; enqueue their delivery after it commits."""
    if len(addresses) == 1:
        return [_accept_one(addresses[0], request, campaign, idempotency_keys[0])]
    return _accept_many(addresses, request, campaign, idempotency_keys)


def _accept_many(
    addresses: Sequence[str],
    request: EmailRequest,
    campaign: Campaign | None,
    idempotency_keys: Sequence[str | None],
) -> list[Message]:
    """The ORM writer: the suppression SELECT, then ``bulk_create`` in a transaction."""
    suppressed = suppressed_addresses(addresses, request.queue)
    batch_size = settings.MAILROOM_BATCH_SIZE
    now = timezone.now()
    rows = []
    batches: list[tuple[str, list[uuid.UUID]]] = []
    for position, (address, key) in enumerate(zip(addresses, idempotency_keys, strict=True)):
        if position % batch_size == 0:
            batches.append((uuid.uuid4().hex, []))
        token, batch = batches[-1]
        is_suppressed = address.lower() in suppressed
        row = _new_row(address, request, campaign, key, token, now, suppressed=is_suppressed)
        if row.dispatch_token:
            batch.append(row.id)
        rows.append(row)
    using = router.db_for_write(Message)
    with transaction.atomic(using=using):
        Message.objects.bulk_create(rows)
        skipped = sum(1 for row in rows if row.status == Message.Status.SUPPRESSED)
        transaction.on_commit(lambda: _after_accept(request, batches, skipped), using)
    return rows


def _accept_one(
    address: str, request: EmailRequest, campaign: Campaign | None, idempotency_key: str | None
) -> Message:
    """One row (every API send): the suppression check folded into the INSERT.

    One statement instead of a suppression SELECT, BEGIN, a bulk_create and COMMIT
    (``_accept_many``, the ORM writer): three round trips fewer, and 25-36 % off the
    whole in-process API request as bench/bypasses.py measures it against that writer
    (e.g. 4.2 ms against 6.5 ms); tests/email_service/test_bypasses.py holds the two
    writers to the same row. Outside a
    transaction the statement commits on its own (a single statement is atomic), so the
    row is committed before the task is enqueued; inside one (send_raw_emails, a caller's
    atomic block) it runs in a savepoint and the task waits for the outer commit.
    """
    message = _new_row(
        address, request, campaign, idempotency_key, uuid.uuid4().hex, timezone.now()
    )
    token = message.dispatch_token  # "" when held for the sweeper
    using = router.db_for_write(Message)
    conn = connections[using]
    sql, fields = _insert_one_sql()
    # The suppression rule (Suppression.reasons_blocking), checked inside the INSERT.
    blocked = [address.lower(), Suppression.reasons_blocking(request.queue)]
    params: list[Any] = []
    for f in fields:
        if f.attname == "status":
            params += [*blocked, Message.Status.SUPPRESSED, Message.Status.QUEUED]
        elif f.attname == "dispatch_token":
            params += [*blocked, "", token]
        else:
            params.append(f.get_db_prep_save(getattr(message, f.attname), conn))
    savepoint = transaction.atomic(using=using) if conn.in_atomic_block else nullcontext()
    with savepoint, conn.cursor() as cursor:
        cursor.execute(sql, params)
        [status] = cursor.fetchone()
    message.status = status
    message._state.adding = False
    message._state.db = using
    batches: list[tuple[str, list[uuid.UUID]]] = []
    if status == Message.Status.SUPPRESSED:
        message.dispatch_token = ""
    elif token:
        batches = [(token, [message.id])]
    # Outside a transaction on_commit runs the callback at once: the row is committed.
    skipped = 1 if status == Message.Status.SUPPRESSED else 0
    transaction.on_commit(lambda: _after_accept(request, batches, skipped), using)
    return message


@functools.cache
def _insert_one_sql() -> tuple[str, list[Any]]:
    """``INSERT INTO message (every column) VALUES (...) RETURNING status``, where status
    and dispatch_token are ``CASE WHEN EXISTS (a suppression) ...``: the suppression
    check runs in the INSERT's own snapshot, on the suppression table's primary key."""
    meta = Message._meta
    supp = Suppression._meta
    address = supp.get_field("address").column
    reason = supp.get_field("reason").column
    # Every name comes from the models' metadata; every value is a bound parameter.
    exists = (
        f'EXISTS (SELECT 1 FROM "{supp.db_table}" WHERE "{address}" = %s AND "{reason}" = ANY(%s))'  # noqa: S608
    )
    fields = list(meta.local_concrete_fields)
    values = [
        f"CASE WHEN {exists} THEN %s ELSE %s END"
        if f.attname in ("status", "dispatch_token")
        else "%s"
        for f in fields
    ]
    columns = ", ".join(f'"{f.column}"' for f in fields)
    status = meta.get_field("status").column
    sql = (
        f'INSERT INTO "{meta.db_table}" ({columns}) VALUES ({", ".join(values)}) '  # noqa: S608
        f'RETURNING "{status}"'
    )
    return sql, fields


def _after_accept(
    request: EmailRequest, batches: list[tuple[str, list[uuid.UUID]]], suppressed: int
) -> None:
    """Hand the committed rows to their pool; a row that must wait (``send_at``, not
    ``held``) rides a Celery countdown."""
    if suppressed:
        redisstore.count(request.queue, Outcome.SUPPRESSED, suppressed)
    countdown = 0.0
    if request.send_at is not None:
        countdown = max((request.send_at - timezone.now()).total_seconds(), 0.0)
    for token, ids in batches:
        if ids:
            enqueue(request.queue, ids, token, countdown=countdown)
