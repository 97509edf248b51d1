"""What the dashboard shows, read from Redis and Postgres. Nothing here writes.

The delivery totals, queue depths, workers and the bulk switch come from
``services.delivery_stats`` and each campaign's progress from
``services.campaign_progress``, the same functions the HTTP API answers with, so the
dashboard and ``/api/v1/stats`` can never disagree. What only the dashboard needs is
below; every Postgres query is bounded and index-backed (the partial indexes
``msg_failed_recent_idx`` and ``msg_deferred_attempts_idx``; campaign counts come from
the trigger-kept ``CampaignCount`` rows), so a refresh costs the same with a million
messages as with ten.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import redis
from django.conf import settings
from django.db.models import QuerySet

from email_service import keys, redisstore, services, smtp_health
from email_service.metrics import QUEUES
from email_service.models import Campaign, Message

logger = logging.getLogger(__name__)

# How much of each list the page shows: enough to act on, never an unbounded table.
RETRIES_SHOWN = 10
FAILURES_SHOWN = 20
CAMPAIGNS_SHOWN = 20
DRAFTS_SHOWN = 5
CHART_MINUTES = 15
ACTIVE_STATUSES = (Campaign.Status.SENDING, Campaign.Status.PAUSED, Campaign.Status.SCHEDULED)
OUTCOMES = ("sent", "failed")


@dataclass(frozen=True)
class Retry:
    """A message waiting for its next try."""

    address: str
    retries: int  # tries so far, each of which ended in a transient failure
    next_attempt_at: datetime | None
    smtp_code: int | None
    reply: str
    campaign: str


@dataclass(frozen=True)
class Failure:
    """A message that failed for good."""

    at: datetime
    recipient: str
    campaign_id: uuid.UUID | None
    campaign: str
    campaign_status: str
    smtp_code: int | None
    reply: str
    attempts: int


@dataclass(frozen=True)
class Throughput:
    """Sends per time bucket (all queues), oldest first; the last bucket is the current,
    still filling one."""

    bucket_seconds: int
    first_bucket_start: float
    now: float
    sent: list[int]
    failed: list[int]

    def spans(self) -> list[float]:
        """Seconds each bucket covers so far: the current one only its elapsed part
        (at least a second), so its rate is not understated while it fills."""
        current_start = self.first_bucket_start + self.bucket_seconds * (len(self.sent) - 1)
        elapsed = min(max(self.now - current_start, 1.0), float(self.bucket_seconds))
        return [float(self.bucket_seconds)] * (len(self.sent) - 1) + [elapsed]

    def rates(self, counts: list[int]) -> list[float]:
        """Emails per second in each bucket."""
        return [n / span for n, span in zip(counts, self.spans(), strict=True)]

    def recent_rate(self, counts: list[int], seconds: float = 60) -> float:
        """Emails per second over about the last ``seconds`` (whole buckets)."""
        take = max(int(seconds // self.bucket_seconds), 1)
        return sum(counts[-take:]) / sum(self.spans()[-take:])


@dataclass(frozen=True)
class CampaignCard:
    id: uuid.UUID
    name: str
    status: str
    send_at: datetime | None
    progress: dict[str, Any]


@dataclass
class Snapshot:
    """Everything the live part of the page shows, read at one moment."""

    stats: dict[str, Any] | None  # services.delivery_stats(); None when Redis is down
    retrying_addresses: int | None
    retries: list[Retry]
    throughput: Throughput | None
    campaigns: list[CampaignCard]
    more_campaigns: int
    drafts: list[CampaignCard]
    failures: list[Failure]
    bulk_paused: bool
    errors: list[str] = field(default_factory=list)


def snapshot() -> Snapshot:
    """Read every live figure. A source that fails is reported, never raised: with Redis
    down the page still shows campaigns and failures from Postgres."""
    errors: list[str] = []
    try:
        stats: dict[str, Any] | None = services.delivery_stats()
    except redis.RedisError:
        logger.warning("dashboard: Redis does not answer", exc_info=True)
        stats = None
        errors.append("Redis does not answer: totals, queues and workers are unknown.")
    else:
        relay = smtp_health.relay_error()
        if relay:
            errors.append(f"Delivery stopped: {relay}")
    campaigns, more = active_campaigns()
    return Snapshot(
        stats=stats,
        retrying_addresses=retrying_addresses() if stats is not None else None,
        retries=retries_in_progress(),
        throughput=throughput() if stats is not None else None,
        campaigns=campaigns,
        more_campaigns=more,
        drafts=draft_campaigns(),
        failures=recent_failures(),
        bulk_paused=stats["bulk_paused"] if stats is not None else services.is_bulk_paused(),
        errors=errors,
    )


def retrying_addresses() -> int | None:
    """How many addresses wait for a retry (the workers' ``email_retry_counts`` hash)."""
    try:
        return int(redisstore.client().hlen(keys.RETRY_COUNTS))
    except redis.RedisError:
        return None


def retries_query() -> QuerySet[Message, tuple[Any, ...]]:
    """Deferred messages, most tries first (``msg_deferred_attempts_idx``)."""
    return (
        Message.objects.filter(status=Message.Status.DEFERRED)
        .order_by("-attempts", "next_attempt_at")
        .values_list(
            "to_email", "attempts", "next_attempt_at", "last_smtp_code", "last_smtp_reply",
            "campaign__name",
        )
    )  # fmt: skip


def retries_in_progress(limit: int = RETRIES_SHOWN) -> list[Retry]:
    """The deferred messages with the most tries so far."""
    return [
        Retry(address, attempts, at, code, _short(reply), name or "")
        for address, attempts, at, code, reply, name in retries_query()[:limit]
    ]


def recent_failures_query() -> QuerySet[Message, tuple[Any, ...]]:
    """Failed messages, newest first (``msg_failed_recent_idx``)."""
    return (
        Message.objects.filter(status=Message.Status.FAILED)
        .order_by("-updated_at")
        .values_list(
            "updated_at", "to_email", "campaign_id", "campaign__name", "campaign__status",
            "last_smtp_code", "last_smtp_reply", "attempts",
        )
    )  # fmt: skip


def recent_failures(limit: int = FAILURES_SHOWN) -> list[Failure]:
    """The latest permanent failures."""
    return [
        Failure(at, to, campaign_id, name or "", status or "", code, _short(reply), attempts)
        for at, to, campaign_id, name, status, code, reply, attempts in (
            recent_failures_query()[:limit]
        )
    ]


def active_campaigns(limit: int = CAMPAIGNS_SHOWN) -> tuple[list[CampaignCard], int]:
    """Sending, paused and scheduled campaigns (oldest start first) and how many more
    there are than shown."""
    live = Campaign.objects.filter(status__in=ACTIVE_STATUSES).order_by(
        "started_at", "send_at", "created_at"
    )
    shown = list(live[: limit + 1])
    more = 0
    if len(shown) > limit:
        more = live.count() - limit
        shown = shown[:limit]
    return [_card(c) for c in shown], more


def draft_campaigns(limit: int = DRAFTS_SHOWN) -> list[CampaignCard]:
    """The newest drafts, which can be started from the dashboard."""
    drafts = Campaign.objects.filter(status=Campaign.Status.DRAFT).order_by("-created_at")
    return [_card(c) for c in drafts[:limit]]


def _card(campaign: Campaign) -> CampaignCard:
    return CampaignCard(
        id=campaign.id,
        name=campaign.name,
        status=campaign.status,
        send_at=campaign.send_at,
        progress=services.campaign_progress(campaign),
    )


def throughput(minutes: int = CHART_MINUTES, now: float | None = None) -> Throughput | None:
    """Sent and failed per bucket over the last ``minutes``, from the workers'
    time-bucketed counters (``mailroom:series:<outcome>:<queue>:<bucket>``), one MGET."""
    now = time.time() if now is None else now
    size = keys.SERIES_BUCKET_SECONDS
    last = keys.bucket_of(now)
    buckets = list(range(last - minutes * 60 // size + 1, last + 1))
    names = [
        keys.series_key(f"{outcome}:{queue}", bucket)
        for outcome in OUTCOMES
        for queue in QUEUES
        for bucket in buckets
    ]
    try:
        values = cast(list[bytes | None], redisstore.client().mget(names))
    except redis.RedisError:
        return None
    width = len(buckets)
    counts = [int(v) if v else 0 for v in values]
    per_outcome = [
        [sum(counts[(o * len(QUEUES) + q) * width + i] for q in range(len(QUEUES)))
         for i in range(width)]
        for o in range(len(OUTCOMES))
    ]  # fmt: skip
    return Throughput(size, float(buckets[0] * size), now, per_outcome[0], per_outcome[1])


def links() -> list[tuple[str, str]]:
    """(label, URL) of the tools next to Mailroom; the unset ones are left out."""
    found = [
        ("Flower", settings.MAILROOM_FLOWER_URL),
        ("Grafana", settings.MAILROOM_GRAFANA_URL),
        ("Mailpit", settings.MAILROOM_MAILPIT_URL),
        ("API docs", "/api/docs"),
    ]
    return [(label, url) for label, url in found if url]


def _short(reply: str, limit: int = 200) -> str:
    reply = " ".join(reply.split())
    return reply if len(reply) <= limit else reply[: limit - 1] + "…"


def as_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as plain JSON types (the data endpoint's ``figures``)."""
    chart = snap.throughput
    return {
        "stats": snap.stats,
        "bulk_paused": snap.bulk_paused,
        "retrying_addresses": snap.retrying_addresses,
        "retries": [
            {
                "address": r.address,
                "retries": r.retries,
                "next_attempt_at": _iso(r.next_attempt_at),
                "smtp_code": r.smtp_code,
                "reply": r.reply,
                "campaign": r.campaign,
            }
            for r in snap.retries
        ],
        "throughput": None
        if chart is None
        else {
            "bucket_seconds": chart.bucket_seconds,
            "first_bucket_start": chart.first_bucket_start,
            "sent": chart.sent,
            "failed": chart.failed,
        },
        "campaigns": [_card_json(c) for c in snap.campaigns],
        "more_campaigns": snap.more_campaigns,
        "drafts": [_card_json(c) for c in snap.drafts],
        "failures": [
            {
                "at": _iso(f.at),
                "recipient": f.recipient,
                "campaign_id": str(f.campaign_id) if f.campaign_id else None,
                "campaign": f.campaign,
                "smtp_code": f.smtp_code,
                "reply": f.reply,
                "attempts": f.attempts,
            }
            for f in snap.failures
        ],
        "errors": snap.errors,
    }


def _card_json(card: CampaignCard) -> dict[str, Any]:
    return {
        "id": str(card.id),
        "name": card.name,
        "status": card.status,
        "send_at": _iso(card.send_at),
        "progress": card.progress,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
