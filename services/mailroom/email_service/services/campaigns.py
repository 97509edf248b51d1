"""Campaigns: create, add recipients, start, pause, resume, cancel, retry; the
dispatcher that feeds their rows to the bulk pool; progress as the dashboard shows it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, BinaryIO, cast

import redis
from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from email_service import (
    ingest,
    keys,
    outbox,
    redisstore,
    template_engine,
)
from email_service.exceptions import IllegalState, InvalidEmailRequest
from email_service.models import (
    ApiKey,
    Campaign,
    Queue,
)
from email_service.redisstore import Outcome
from email_service.rendering import (
    render_subject,
)
from email_service.services.accepting import allowed_sender
from email_service.services.delivery import redispatch_orphans
from email_service.services.dispatch import enqueue
from email_service.switches import is_bulk_paused
from email_service.validation import (
    check_subject,
    check_template,
)

logger = logging.getLogger(__name__)


def create_campaign(
    *,
    name: str,
    subject: str,
    template: str,
    from_email: str | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    api_key: ApiKey | None = None,
) -> Campaign:
    """A draft campaign; add recipients, then ``start_campaign``. ``api_key`` (the HTTP
    API's caller) decides which senders are allowed, as for ``send_email``."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidEmailRequest("name", "must not be empty")
    check_subject(subject)
    try:
        render_subject(subject, {})
    except template_engine.EmailTemplateError as exc:
        raise InvalidEmailRequest("subject", f"is not a valid template: {exc}") from exc
    if send_at and expires_at and expires_at <= send_at:
        raise InvalidEmailRequest("expires_at", "must be later than send_at")
    return Campaign.objects.create(
        name=name.strip()[:200],
        subject=subject,
        template=check_template(template),
        from_email=allowed_sender(from_email, api_key),
        send_at=send_at,
        expires_at=expires_at,
    )


class NotLaunched(InvalidEmailRequest):
    """``launch_campaign`` refused: nothing was stored. ``report`` says what the rows
    were, when there were any."""

    def __init__(self, report: ingest.IngestReport | None, message: str) -> None:
        super().__init__("recipients", message)
        self.report = report


def launch_campaign(
    *,
    name: str,
    subject: str,
    template: str,
    from_email: str | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    api_key: ApiKey | None = None,
    add: Callable[[Campaign], ingest.IngestReport] | None = None,
    start: bool = True,
) -> tuple[Campaign, ingest.IngestReport | None]:
    """Create a campaign, add its recipients (``add``, e.g. ``add_recipients`` on a CSV),
    and start it: the one sequence the API and ``send_campaign`` both run.

    All or nothing: in strict mode an invalid row, and when starting a list without one
    recipient to send to, raise ``NotLaunched`` and nothing is stored. The campaign starts
    after the rows are committed.
    """
    with transaction.atomic():
        campaign = create_campaign(
            name=name,
            subject=subject,
            template=template,
            from_email=from_email,
            send_at=send_at,
            expires_at=expires_at,
            api_key=api_key,
        )
        report = add(campaign) if add is not None else None
        if report is not None and not report.stored:
            raise NotLaunched(report, f"{report.invalid} invalid row(s); nothing was stored")
        if start and (report is None or not report.accepted + report.suppressed):
            raise NotLaunched(report, "there are no valid recipients to send to")
    if start:
        start_campaign(campaign)
    return campaign, report


def add_recipients(
    campaign: Campaign,
    source: BinaryIO | Iterable[Mapping[str, object]],
    *,
    strict: bool = False,
    time_limit: float | None = None,
) -> ingest.IngestReport:
    """Add recipients from a CSV stream or a list of ``{"email", "context"}``.

    ``time_limit``: seconds the ingest may take before it gives up and stores nothing
    (``ingest.IngestTimeLimit``); a web request sets it below the web server's timeout.
    """
    if campaign.status in (Campaign.Status.COMPLETED, Campaign.Status.CANCELLED):
        raise IllegalState("campaign", f"is {campaign.status}; recipients cannot be added")
    if hasattr(source, "read"):
        stream = cast(BinaryIO, source)
        report = ingest.ingest_csv(campaign, stream, strict=strict, time_limit=time_limit)
    else:
        report = ingest.ingest_rows(campaign, source, strict=strict, time_limit=time_limit)
    if campaign.status == Campaign.Status.SENDING:
        kick_dispatcher()
    return report


def start_campaign(campaign: Campaign) -> Campaign:
    """Draft → sending (or scheduled, when ``send_at`` is in the future)."""
    if campaign.status != Campaign.Status.DRAFT:
        raise IllegalState("status", f"only a draft can be started, this one is {campaign.status}")
    if not outbox.campaign_counts(campaign.id):
        # A campaign without a single message would never be seen as finished.
        raise IllegalState("recipients", "the campaign has no recipients yet")
    scheduled = campaign.send_at is not None and campaign.send_at > timezone.now()
    status = Campaign.Status.SCHEDULED if scheduled else Campaign.Status.SENDING
    _set_campaign_status(campaign, status, started=not scheduled)
    kick_dispatcher()
    return campaign


def pause_campaign(campaign: Campaign) -> Campaign:
    """Stop before the next message; workers are freed, nothing is lost."""
    if campaign.status not in (Campaign.Status.SENDING, Campaign.Status.SCHEDULED):
        raise IllegalState("status", f"a {campaign.status} campaign cannot be paused")
    _set_campaign_status(campaign, Campaign.Status.PAUSED)
    return campaign


def resume_campaign(campaign: Campaign) -> Campaign:
    """Continue exactly where it stopped: every unsent message once."""
    if campaign.status != Campaign.Status.PAUSED:
        raise IllegalState("status", f"a {campaign.status} campaign cannot be resumed")
    _set_campaign_status(campaign, Campaign.Status.SENDING, started=campaign.started_at is None)
    redispatch_orphans(stale_seconds=0)
    kick_dispatcher()
    return campaign


def cancel_campaign(campaign: Campaign, reason: str = "cancelled") -> int:
    """End the campaign: nothing more is sent; every unsent message becomes cancelled."""
    if campaign.status in (Campaign.Status.COMPLETED, Campaign.Status.CANCELLED):
        raise IllegalState("status", f"the campaign is already {campaign.status}")
    campaign.status_reason = reason
    _set_campaign_status(campaign, Campaign.Status.CANCELLED, finished=True)
    return outbox.cancel_unsent(campaign.id, reason)


def retry_failed(
    campaign: Campaign, *, smtp_code: int | None = None, reply_class: str | None = None
) -> int:
    """Re-queue the failed recipients (optionally one SMTP code or class), never
    suppressed ones. A completed campaign goes back to sending."""
    if reply_class not in (None, "4xx", "5xx", "network"):
        raise InvalidEmailRequest("reply_class", "must be 4xx, 5xx or network")
    if campaign.status == Campaign.Status.CANCELLED:
        raise IllegalState("status", "a cancelled campaign cannot be retried")
    count = outbox.requeue_failed(campaign.id, smtp_code, reply_class)
    if count and campaign.status == Campaign.Status.COMPLETED:
        campaign.finished_at = None
        _set_campaign_status(campaign, Campaign.Status.SENDING)
    if count:
        kick_dispatcher()
    return count


def campaign_progress(campaign: Campaign) -> dict[str, Any]:
    """Counts by status (from the trigger-kept counters), the rate and an ETA."""
    counts = outbox.campaign_counts(campaign.id)
    remaining = sum(counts.get(s, 0) for s in ("queued", "sending", "deferred"))
    sent_last_minute = redisstore.series_sum(f"campaign:{campaign.id}:{Outcome.SENT}", 60)
    rate = sent_last_minute / 60
    return {
        "total": sum(counts.values()),
        "queued": counts.get("queued", 0) + counts.get("deferred", 0),
        "sending": counts.get("sending", 0),
        "sent": counts.get("sent", 0),
        "failed": counts.get("failed", 0),
        "suppressed": counts.get("suppressed", 0),
        "cancelled": counts.get("cancelled", 0),
        "remaining": remaining,
        "rate_per_second": round(rate, 2),
        "eta_seconds": round(remaining / rate) if rate else None,
    }


def _set_campaign_status(
    campaign: Campaign, status: str, *, started: bool = False, finished: bool = False
) -> None:
    """Postgres first (the truth), then the Redis mirror that workers read per message."""
    campaign.status = status
    now = timezone.now()
    if started:
        campaign.started_at = now
    if finished:
        campaign.finished_at = now
    campaign.save()
    _mirror_campaign_states([campaign])


def _mirror_campaign_states(campaigns: Iterable[Campaign]) -> None:
    """Write the Redis mirrors of campaign states. A failed write is healed by the
    dispatcher, which re-asserts the mirrors of live campaigns on every tick."""
    try:
        pipe = redisstore.client().pipeline(transaction=False)
        for campaign in campaigns:
            pipe.set(keys.campaign_state_key(campaign.id), campaign.status)
        pipe.execute()
    except redis.RedisError:
        logger.warning("could not mirror campaign states in Redis; the dispatcher will retry")


def kick_dispatcher() -> None:
    """Run the dispatcher now rather than at beat's next tick."""
    try:
        current_app.send_task("email_service.dispatch_campaigns")
    except (redis.RedisError, BrokerError, OSError):
        logger.warning("broker unavailable; beat will dispatch campaigns")


def dispatch_campaigns() -> int:
    """Feed campaign batches to the bulk queue, never more than the dispatch window.

    Also starts scheduled campaigns that are due, cancels expired ones (what is unsent
    becomes cancelled with reason "expired") and completes finished ones. Safe to run
    concurrently. Returns how many messages were dispatched.
    """
    now = timezone.now()
    for campaign in Campaign.objects.filter(
        status__in=[Campaign.Status.SCHEDULED, Campaign.Status.SENDING, Campaign.Status.PAUSED],
        expires_at__lte=now,
    ):
        cancel_campaign(campaign, reason="expired")
    for campaign in Campaign.objects.filter(status=Campaign.Status.SCHEDULED, send_at__lte=now):
        _set_campaign_status(campaign, Campaign.Status.SENDING, started=True)
    live = list(
        Campaign.objects.filter(
            status__in=[Campaign.Status.SENDING, Campaign.Status.PAUSED]
        ).order_by("started_at")
    )
    _mirror_campaign_states(live)
    sending = [c for c in live if c.status == Campaign.Status.SENDING]
    dispatched = 0 if is_bulk_paused() else _feed(sending)
    for campaign in sending:
        _complete_if_done(campaign)
    return dispatched


def _feed(campaigns: list[Campaign]) -> int:
    """Round-robin over the sending campaigns while the bulk queue has room."""
    free = settings.MAILROOM_DISPATCH_WINDOW - redisstore.client().llen(Queue.BULK)
    batch_size = settings.MAILROOM_BATCH_SIZE
    active = list(campaigns)
    dispatched = 0
    while free > 0 and active:
        for campaign in list(active):
            token = uuid.uuid4().hex
            ids = outbox.take_undispatched(campaign.id, batch_size, token)
            if not ids:
                active.remove(campaign)
                continue
            enqueue(Queue.BULK, ids, token)
            dispatched += len(ids)
            free -= 1
            if free <= 0:
                break
    return dispatched


def _complete_if_done(campaign: Campaign) -> None:
    counts = outbox.campaign_counts(campaign.id)
    if not counts or any(counts.get(s, 0) for s in ("queued", "sending", "deferred")):
        return
    if Campaign.objects.filter(id=campaign.id, status=Campaign.Status.SENDING).exists():
        _set_campaign_status(campaign, Campaign.Status.COMPLETED, finished=True)
