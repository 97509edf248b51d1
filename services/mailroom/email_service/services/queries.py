"""Read queries for the API, the dashboard and the commands: messages, suppressions,
templates and their previews, delivery figures. Nothing here changes state."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from django.db.models import Prefetch, Q
from django.template import engines

from email_service import (
    keys,
    metrics,
    redisstore,
    template_engine,
)
from email_service.exceptions import InvalidEmailRequest
from email_service.models import (
    DeliveryAttempt,
    Message,
    Suppression,
)
from email_service.rendering import (
    RenderedEmail,
    render,
    render_subject,
)
from email_service.switches import is_bulk_paused
from email_service.validation import (
    check_context,
    check_subject,
    check_template,
)

logger = logging.getLogger(__name__)


# A page position in the message list: the (created_at, id) of the last row shown.
MessageKey = tuple[datetime, uuid.UUID]


# Templates that only lay out others ({% extends %}), never sent on their own.
LAYOUT_TEMPLATES = template_engine.LAYOUT_TEMPLATES


def get_message(message_id: uuid.UUID) -> Message:
    """One message with its attempts in order; raises ``Message.DoesNotExist``."""
    attempts = DeliveryAttempt.objects.order_by("attempt", "id")
    return Message.objects.prefetch_related(Prefetch("attempts_log", queryset=attempts)).get(
        id=message_id
    )


def list_messages(
    *,
    status: str | None = None,
    to: str | None = None,
    campaign_id: uuid.UUID | None = None,
    after: MessageKey | None = None,
    limit: int = 50,
) -> tuple[list[Message], MessageKey | None]:
    """Messages newest first, a page at a time, and the key of the next page (None at
    the end). Keyset pagination on (created_at, id): a page costs the same however deep
    it is, and rows arriving meanwhile neither repeat nor skip rows."""
    rows = Message.objects.defer("context").order_by("-created_at", "-id")
    if status:
        rows = rows.filter(status=status)
    if to:
        rows = rows.filter(to_email__iexact=to.strip())
    if campaign_id:
        rows = rows.filter(campaign_id=campaign_id)
    if after is not None:
        created_at, last_id = after
        rows = rows.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=last_id))
    page = list(rows[: limit + 1])
    if len(page) <= limit:
        return page, None
    last = page[limit - 1]
    return page[:limit], (last.created_at, last.id)


def list_suppressions(
    *, q: str | None = None, after: str | None = None, limit: int = 50
) -> tuple[list[Suppression], str | None]:
    """Suppressed addresses in address order (``q``: a case-insensitive part of the
    address), a page at a time, and the last address of the page when more follow."""
    rows = Suppression.objects.order_by("address")
    if q:
        rows = rows.filter(address__icontains=q.strip())
    if after is not None:
        rows = rows.filter(address__gt=after)
    page = list(rows[: limit + 1])
    if len(page) <= limit:
        return page, None
    return page[:limit], page[limit - 1].address


def get_suppression(address: str) -> Suppression:
    """The suppression of ``address`` (any case); raises ``Suppression.DoesNotExist``."""
    return Suppression.objects.get(address=address.strip().lower())


def template_names() -> list[str]:
    """The email templates that can be sent: ``emails/<name>.html`` in every template
    directory, without the layouts."""
    names: set[str] = set()
    for engine in engines.all():
        for directory in engine.template_dirs:
            for path in Path(directory, "emails").glob("*.html"):
                if path.stem not in LAYOUT_TEMPLATES and not path.stem.startswith("_"):
                    names.add(path.stem)
    return sorted(names)


def preview_template(template: str, subject: str, context: dict[str, Any] | None) -> RenderedEmail:
    """What ``template`` renders to for ``context``; nothing is stored or sent.

    The subject is rendered as a template too, as a campaign's is (a transactional
    subject without ``{{ }}`` or ``{% %}`` comes out unchanged).
    """
    name = check_template(template)
    checked_subject = check_subject(subject)
    checked_context = check_context(context)
    try:
        rendered_subject = render_subject(checked_subject, checked_context)
    except template_engine.EmailTemplateError as exc:
        raise InvalidEmailRequest("subject", f"is not a valid template: {exc}") from exc
    try:
        return render(name, rendered_subject, checked_context)
    except template_engine.EmailTemplateError as exc:
        raise InvalidEmailRequest("template", f"cannot render {name!r}: {exc}") from exc


def delivery_stats() -> dict[str, Any]:
    """The dashboard's figures: outcomes counted by the workers (Redis), the success
    rate, queue depths, the bulk switch and live workers per pool. Raises
    ``redis.RedisError`` when Redis does not answer."""
    client = redisstore.client()
    found = metrics.read_redis(client)
    queues = {
        queue: {
            "sent": _as_count(found["sent"][(queue,)]),
            "failed": _as_count(found["failed"][(queue,)]),
            "suppressed": _as_count(found["suppressed"][(queue,)]),
            "depth": _as_count(found["depth"][(queue,)]),
        }
        for queue in keys.QUEUES
    }
    sent = sum(q["sent"] for q in queues.values())
    failed = sum(q["failed"] for q in queues.values())
    return {
        "sent": sent,
        "failed": failed,
        "suppressed": sum(q["suppressed"] for q in queues.values()),
        # Of the emails that reached an end, the share the relay accepted.
        "success_rate": round(sent / (sent + failed), 4) if sent + failed else None,
        "queues": queues,
        "bulk_paused": is_bulk_paused(),
        "workers": metrics.workers_online(client),
    }


def _as_count(raw: object) -> int:
    """A Redis counter as an int; missing or garbled counts as 0."""
    try:
        return int(raw) if isinstance(raw, int | bytes | str) else 0
    except ValueError:
        return 0
