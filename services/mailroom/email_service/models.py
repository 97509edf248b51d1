"""The outbox. Postgres is the source of truth for every message and every attempt."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import F
from django.db.models.functions import Lower, Now, Upper


class Queue(models.TextChoices):
    HIGH_PRIORITY = "high_priority", "High priority (transactional)"
    BULK = "bulk", "Bulk (campaigns)"


class Campaign(models.Model):
    """A bulk send: one template and subject, many recipients with their own context."""

    class Status(models.TextChoices):
        DRAFT = "draft"
        SCHEDULED = "scheduled"
        SENDING = "sending"
        PAUSED = "paused"
        COMPLETED = "completed"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    # A Django template string, rendered per recipient with that recipient's context.
    subject = models.CharField(max_length=998, blank=True, default="")
    template = models.CharField(max_length=200, blank=True, default="")
    from_email = models.CharField(max_length=320, blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    send_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    status_reason = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


class CampaignCount(models.Model):
    """Live per-status message counts of a campaign, kept by a database trigger.

    Every INSERT or status UPDATE on messages adds to these rows (spread over a few
    shards so concurrent workers do not queue on one row); reading a campaign's
    progress sums a handful of rows instead of counting a million messages.
    """

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="counts")
    status = models.CharField(max_length=16)
    shard = models.PositiveSmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["campaign", "status", "shard"], name="campaign_count_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.campaign_id} {self.status}: {self.count}"


class Message(models.Model):
    """One email to one recipient: SMTP transactions carry one RCPT each."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        SENDING = "sending"
        SENT = "sent"
        DEFERRED = "deferred"
        FAILED = "failed"
        CANCELLED = "cancelled"
        SUPPRESSED = "suppressed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    queue = models.CharField(max_length=16, choices=Queue.choices, default=Queue.HIGH_PRIORITY)
    # No index of its own: msg_campaign_status_idx (campaign, status) leads with it and
    # serves every campaign look-up and the cascade; one index fewer per row written.
    campaign = models.ForeignKey(
        Campaign,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="messages",
        db_index=False,
    )
    from_email = models.CharField(max_length=320)
    to_email = models.CharField(max_length=320)
    subject = models.CharField(max_length=998)
    template = models.CharField(max_length=200)
    context = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    # Not before: a retry's backoff, or the send_at / countdown / eta it was accepted with.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # Unsent at this time, it is cancelled (status_reason "expired"): Celery's ``expires``.
    expires_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Identifies the Celery task that should deliver this row; the sweeper checks it in Redis.
    dispatch_token = models.CharField(max_length=64, blank=True, default="")
    dispatched_at = models.DateTimeField(null=True, blank=True)
    last_smtp_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_smtp_reply = models.TextField(blank=True, default="")
    # Why a message ended without a send: "expired", "cancelled", "unsubscribed", ...
    status_reason = models.CharField(max_length=200, blank=True, default="")
    message_id_header = models.CharField(max_length=998)
    # Unique per API key where set (msg_idempotency_key_unique, partial): campaign and
    # most API rows have none and cost that index nothing. NULL, not "", is "no key".
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    # The API key that sent it (NULL: Python calls, the email backend, commands, and rows
    # from before keys were recorded). Idempotency keys are scoped by it. Keys are
    # revoked, never deleted, so PROTECT costs nothing in practice; no index of its own:
    # the idempotency index leads with it for the only look-up that needs one.
    api_key = models.ForeignKey(
        "ApiKey",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="messages",
        db_index=False,
    )
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            # The sweeper's and the dashboards' hot paths: only rows that still need work.
            models.Index(
                fields=["status", "queue", "dispatched_at"],
                name="msg_pending_idx",
                condition=models.Q(status__in=["queued", "sending", "deferred"]),
            ),
            models.Index(fields=["campaign", "status"], name="msg_campaign_status_idx"),
            # The dispatcher's feed: a campaign's rows not yet handed to any task.
            models.Index(
                fields=["campaign"],
                name="msg_undispatched_idx",
                condition=models.Q(status="queued", dispatch_token="", dispatched_at__isnull=True),
            ),
            # Address look-ups are case-insensitive (iexact compiles to UPPER()).
            models.Index(Upper("to_email"), name="msg_to_upper_idx"),
            models.Index(fields=["-created_at"], name="msg_created_idx"),
            # The dashboard: the latest failures and the messages retried most, read
            # every few seconds, without a scan of a million sent rows.
            models.Index(
                fields=["-updated_at"],
                name="msg_failed_recent_idx",
                condition=models.Q(status="failed"),
            ),
            models.Index(
                fields=["-attempts", "next_attempt_at"],
                name="msg_deferred_attempts_idx",
                condition=models.Q(status="deferred"),
            ),
            # The sweeper's expiry pass: only unsent rows that carry an expiry.
            models.Index(
                fields=["expires_at"],
                name="msg_expiring_idx",
                condition=models.Q(status__in=["queued", "deferred"], expires_at__isnull=False),
            ),
        ]
        constraints = [
            # One message per address per campaign: re-uploading a list adds no copies.
            models.UniqueConstraint(
                F("campaign"),
                Lower("to_email"),
                name="msg_campaign_address_unique",
                condition=models.Q(campaign__isnull=False),
            ),
            # Per API key: two services may both use "order-1042". NULLS NOT DISTINCT, so
            # calls without a key (NULL) share one scope and still collide.
            models.UniqueConstraint(
                fields=["api_key", "idempotency_key"],
                name="msg_idempotency_key_unique",
                condition=models.Q(idempotency_key__isnull=False),
                nulls_distinct=False,
            ),
        ]

    def __str__(self) -> str:
        return f"{self.to_email}: {self.subject} ({self.status})"


class DeliveryAttempt(models.Model):
    """One row per SMTP try of one message."""

    class Outcome(models.TextChoices):
        SENT = "sent"
        DEFERRED = "deferred"  # transient: will be retried
        FAILED = "failed"  # permanent, or retries exhausted

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="attempts_log")
    attempt = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    smtp_code = models.PositiveSmallIntegerField(null=True, blank=True)
    smtp_reply = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        indexes = [models.Index(fields=["message", "attempt"], name="attempt_msg_idx")]

    def __str__(self) -> str:
        return f"attempt {self.attempt}: {self.outcome} {self.smtp_code or ''}".strip()


class Suppression(models.Model):
    """Addresses that must never be sent to (hard bounces, unsubscribes, complaints)."""

    class Reason(models.TextChoices):
        HARD_BOUNCE = "hard_bounce"
        UNSUBSCRIBE = "unsubscribe"
        COMPLAINT = "complaint"
        MANUAL = "manual"

    address = models.CharField(max_length=320, primary_key=True)
    reason = models.CharField(max_length=16, choices=Reason.choices)

    detail = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(db_default=Now())

    def __str__(self) -> str:
        return f"{self.address} ({self.reason})"

    @classmethod
    def reasons_blocking(cls, queue: str) -> list[str]:
        """The suppression rule, the one definition every path uses (ORM and SQL): an
        unsubscribe stops bulk mail only, so a password reset still reaches the person
        who left the newsletter; hard bounces, complaints and manual entries stop all."""
        if queue == Queue.BULK:
            return list(cls.Reason.values)
        return [reason for reason in cls.Reason.values if reason != cls.Reason.UNSUBSCRIBE]


class ControlFlag(models.Model):
    """Durable operator switches (the global bulk pause); Redis holds a fast mirror."""

    name = models.CharField(max_length=64, primary_key=True)
    enabled = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name}={self.enabled}"


class RuntimeSetting(models.Model):
    """Operator settings changed at run time (rate limits); Redis holds a fast mirror."""

    name = models.CharField(max_length=64, primary_key=True)
    value = models.JSONField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


class ApiKey(models.Model):
    """A credential for the HTTP API. The key itself is shown once and never stored:
    only its SHA-256 (keys are 190 random bits, so a slow hash adds nothing) and a short
    visible prefix that finds the row and tells operators which key is which."""

    class Scope(models.TextChoices):
        SEND = "send", "Send email, read messages"
        CAMPAIGNS = "campaigns", "Manage campaigns"
        ADMIN = "admin", "Everything, including the bulk switch and suppressions"

    id = models.BigAutoField(primary_key=True)
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    # Requests per minute for this key; null means MAILROOM_API_RATE_LIMIT_PER_MINUTE.
    rate_limit_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # Domains ("example.com") and addresses ("billing@example.com") this key may send
    # from; empty means MAILROOM_ALLOWED_SENDERS (by default DEFAULT_FROM_EMAIL's domain).
    allowed_senders = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        state = " (revoked)" if self.revoked_at else ""
        return f"{self.name} [{self.prefix}…]{state}"

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or self.Scope.ADMIN in self.scopes
