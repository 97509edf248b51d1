"""The SQL of the delivery hot path: claim, record, release, renew, reclaim.

Each function is one statement in autocommit mode, so a worker killed between two of
them leaves every row in a state the sweeper understands. Claiming is a conditional
UPDATE: a second worker (or a redelivered task) simply gets nothing.
"""

from __future__ import annotations

import select
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection
from psycopg import pq

from email_service.models import Campaign, CampaignCount, DeliveryAttempt, Message, Suppression

MESSAGE = Message._meta.db_table
ATTEMPT = DeliveryAttempt._meta.db_table
CAMPAIGN = Message._meta.get_field("campaign").related_model._meta.db_table  # type: ignore[union-attr]
COUNTS = CampaignCount._meta.db_table
SUPPRESSION = Suppression._meta.db_table


def _sql(value: str) -> str:
    """A status as an SQL literal. Only these model constants are ever interpolated."""
    return "'" + value.replace("'", "''") + "'"


# Statuses in SQL come from the models, never typed again as literals.
QUEUED = _sql(Message.Status.QUEUED)
SENDING = _sql(Message.Status.SENDING)
SENT = _sql(Message.Status.SENT)
DEFERRED = _sql(Message.Status.DEFERRED)
FAILED = _sql(Message.Status.FAILED)
CANCELLED = _sql(Message.Status.CANCELLED)
SUPPRESSED = _sql(Message.Status.SUPPRESSED)
CAMPAIGN_SENDING = _sql(Campaign.Status.SENDING)
CAMPAIGN_CANCELLED = _sql(Campaign.Status.CANCELLED)
OUTCOME_SENT = _sql(DeliveryAttempt.Outcome.SENT)
OUTCOME_FAILED = _sql(DeliveryAttempt.Outcome.FAILED)


@dataclass(frozen=True)
class ClaimedRow:
    id: uuid.UUID
    queue: str
    from_email: str
    to_email: str
    subject: str
    template: str
    context: dict[str, Any]
    message_id_header: str
    attempts: int
    campaign_id: uuid.UUID | None
    created_at: datetime


def _uuids(ids: Sequence[uuid.UUID | str]) -> list[uuid.UUID]:
    return [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids]


def claim(ids: Sequence[uuid.UUID | str], lease_seconds: float) -> list[ClaimedRow]:
    """Take the rows that are due and not taken; return them in the order asked."""
    sql = f"""
        UPDATE {MESSAGE} AS m
           SET status = {SENDING}, attempts = m.attempts + 1, updated_at = now(),
               lease_expires_at = now() + make_interval(secs => %s)
         WHERE m.id = ANY(%s)
           AND m.status IN ({QUEUED}, {DEFERRED})
           AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= now())
           AND (m.expires_at IS NULL OR m.expires_at > now())
           AND (m.campaign_id IS NULL OR EXISTS (
                SELECT 1 FROM {CAMPAIGN} c
                 WHERE c.id = m.campaign_id AND c.status = {CAMPAIGN_SENDING}))
     RETURNING m.id, m.queue, m.from_email, m.to_email, m.subject, m.template, m.context,
               m.message_id_header, m.attempts, m.campaign_id, m.created_at
    """
    wanted = _uuids(ids)
    with connection.cursor() as cursor:
        cursor.execute(sql, [lease_seconds, wanted])
        rows = {row[0]: ClaimedRow(*row) for row in cursor.fetchall()}
    return [rows[i] for i in wanted if i in rows]


_RECORD_SQL = f"""
    WITH m AS (
        UPDATE {MESSAGE}
           SET status = $1::varchar, last_smtp_code = $2::int, last_smtp_reply = $3::text,
               updated_at = now(),
               next_attempt_at = $4::timestamptz, lease_expires_at = NULL, dispatch_token = '',
               sent_at = CASE WHEN $1::varchar = {OUTCOME_SENT} THEN now() ELSE sent_at END
         WHERE id = $5::uuid AND status IN ({SENDING}, {QUEUED}, {DEFERRED})
     RETURNING id, attempts)
    INSERT INTO {ATTEMPT} (message_id, attempt, outcome, smtp_code, smtp_reply, created_at)
    SELECT id, attempts, $1::varchar, $2::int, $3::text, now() FROM m
"""


class PendingWrite:
    """A statement already sent to Postgres whose result is collected later.

    Postgres runs (and, in autocommit, commits) a statement once it has arrived, whether
    or not the client waits for the answer. Sending the record of message k and only
    collecting its result after message k+1 went out over SMTP overlaps the commit with
    the next send, yet a worker killed at any point leaves k recorded: the bound on
    duplicates stays one message per worker process.
    """

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._pgconn = pgconn

    def wait(self) -> None:
        pgconn = self._pgconn
        pgconn.consume_input()
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [], 1.0)
            pgconn.consume_input()
        error = None
        while (result := pgconn.get_result()) is not None:
            if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                error = (result.error_message or b"").decode("utf-8", "replace")
        if error:
            raise DatabaseError(f"recording a delivery failed: {error}")


def record(
    message_id: uuid.UUID,
    status: str,
    code: int | None,
    reply: str,
    next_attempt_at: datetime | None = None,
) -> PendingWrite:
    """Send one attempt's outcome and its DeliveryAttempt row as one statement.

    Returns at once; call ``wait()`` on the result before using the connection again.
    """
    params = [
        status,
        None if code is None else str(code),
        reply[:2000].replace("\x00", ""),
        None if next_attempt_at is None else next_attempt_at.isoformat(),
        str(message_id),
    ]
    connection.ensure_connection()
    raw = connection.connection
    if raw is None or not connection.get_autocommit():
        # Inside a transaction the record would not be durable before commit.
        raise RuntimeError("delivery records are written in autocommit mode only")
    pgconn = raw.pgconn
    pgconn.send_query_params(
        _RECORD_SQL.encode(), [None if p is None else p.encode() for p in params]
    )
    return PendingWrite(pgconn)


def release(ids: Sequence[uuid.UUID], next_attempt_at: datetime | None = None) -> int:
    """Give back claimed rows that were not attempted (pause, time limit, relay down).

    Rows of a campaign go back to the campaign's dispatcher (undispatched), or are
    cancelled if their campaign was cancelled meanwhile.
    """
    if not ids:
        return 0
    status = "deferred" if next_attempt_at else "queued"
    sql = f"""
        UPDATE {MESSAGE} AS m
           SET status = CASE WHEN c.status = {CAMPAIGN_CANCELLED} THEN {CANCELLED} ELSE %s END,
               status_reason = CASE WHEN c.status = {CAMPAIGN_CANCELLED} THEN c.status_reason
                                    ELSE m.status_reason END,
               attempts = GREATEST(m.attempts - 1, 0), lease_expires_at = NULL,
               next_attempt_at = %s, dispatch_token = '', updated_at = now(),
               dispatched_at = CASE WHEN m.campaign_id IS NULL THEN m.dispatched_at END
          FROM {MESSAGE} AS m2 LEFT JOIN {CAMPAIGN} AS c ON c.id = m2.campaign_id
         WHERE m2.id = m.id AND m.id = ANY(%s) AND m.status = {SENDING}
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [status, next_attempt_at, list(ids)])
        return cursor.rowcount


def renew(ids: Sequence[uuid.UUID], lease_seconds: float) -> None:
    sql = f"""
        UPDATE {MESSAGE} SET lease_expires_at = now() + make_interval(secs => %s)
         WHERE id = ANY(%s) AND status = {SENDING}
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [lease_seconds, list(ids)])


def mark_suppressed(ids: Sequence[uuid.UUID]) -> None:
    sql = f"""
        UPDATE {MESSAGE} SET status = {SUPPRESSED}, lease_expires_at = NULL, updated_at = now(),
               attempts = GREATEST(attempts - 1, 0), dispatch_token = ''
         WHERE id = ANY(%s) AND status = {SENDING}
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [list(ids)])


def set_token(ids: Sequence[uuid.UUID], token: str) -> list[uuid.UUID]:
    """Hand rows to a new task, unless they moved on meanwhile."""
    sql = f"""
        UPDATE {MESSAGE} SET dispatch_token = %s, dispatched_at = now()
         WHERE id = ANY(%s) AND status IN ({QUEUED}, {DEFERRED})
     RETURNING id
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [token, list(ids)])
        return [row[0] for row in cursor.fetchall()]


def reclaim_expired(max_attempts: int) -> tuple[int, int]:
    """Rows whose worker died mid-send go back to the queue; a row that has already
    been claimed ``max_attempts`` times (a message that keeps killing workers) fails.

    Returns (requeued, failed).
    """
    fail_sql = f"""
        WITH m AS (
            UPDATE {MESSAGE}
               SET status = {FAILED}, lease_expires_at = NULL, updated_at = now(),
                   last_smtp_code = NULL, last_smtp_reply = 'worker lost during every attempt'
             WHERE status = {SENDING} AND lease_expires_at < now() AND attempts >= %s
         RETURNING id, attempts)
        INSERT INTO {ATTEMPT} (message_id, attempt, outcome, smtp_code, smtp_reply, created_at)
        SELECT id, attempts, {OUTCOME_FAILED}, NULL, 'worker lost during every attempt', now()
          FROM m
    """
    requeue_sql = f"""
        UPDATE {MESSAGE}
           SET status = {QUEUED}, lease_expires_at = NULL, dispatch_token = '',
               dispatched_at = NULL, updated_at = now()
         WHERE status = {SENDING} AND lease_expires_at < now()
    """
    with connection.cursor() as cursor:
        cursor.execute(fail_sql, [max_attempts])
        failed = cursor.rowcount
        cursor.execute(requeue_sql)
        return cursor.rowcount, failed


def orphan_candidates(
    stale_seconds: float, *, include_bulk: bool, limit: int
) -> list[tuple[uuid.UUID, str, str]]:
    """Rows waiting for a task that may be gone: (id, queue, dispatch_token).

    Queued rows older than ``stale_seconds`` (once due, when they were accepted with a
    ``send_at``), and deferred rows that are due; never an expired one. Bulk rows
    are left alone while bulk is paused, and so are rows of a campaign not sending.
    """
    sql = f"""
        SELECT m.id, m.queue, m.dispatch_token FROM {MESSAGE} m
         WHERE ((m.status = {QUEUED}
                 AND (m.dispatched_at IS NULL
                      OR m.dispatched_at < now() - make_interval(secs => %s))
                 AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= now()))
             OR (m.status = {DEFERRED} AND m.next_attempt_at <= now()))
           AND (m.expires_at IS NULL OR m.expires_at > now())
           AND (%s OR m.queue <> 'bulk')
           AND (m.campaign_id IS NULL OR m.dispatched_at IS NOT NULL)
           AND (m.campaign_id IS NULL OR EXISTS (
                SELECT 1 FROM {CAMPAIGN} c
                 WHERE c.id = m.campaign_id AND c.status = {CAMPAIGN_SENDING}))
         ORDER BY m.dispatched_at NULLS FIRST
         LIMIT %s
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [stale_seconds, include_bulk, limit])
        return [(row[0], row[1], row[2]) for row in cursor.fetchall()]


def expire_unsent() -> int:
    """Cancel the unsent rows whose ``expires_at`` has passed (reason ``expired``).

    A row being sent right now (``sending``) is left to finish: its claim came first."""
    sql = f"""
        UPDATE {MESSAGE}
           SET status = {CANCELLED}, status_reason = 'expired', dispatch_token = '',
               lease_expires_at = NULL, updated_at = now()
         WHERE status IN ({QUEUED}, {DEFERRED}) AND expires_at IS NOT NULL
           AND expires_at <= now()
    """
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return int(cursor.rowcount)


def retoken(ids: Sequence[uuid.UUID], dead_tokens: Sequence[str], token: str) -> list[uuid.UUID]:
    """Move rows from dead tokens to a new one; a concurrent sweeper gets nothing."""
    sql = f"""
        UPDATE {MESSAGE} SET dispatch_token = %s, dispatched_at = now()
         WHERE id = ANY(%s) AND status IN ({QUEUED}, {DEFERRED}) AND dispatch_token = ANY(%s)
     RETURNING id
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [token, list(ids), list(dead_tokens)])
        return [row[0] for row in cursor.fetchall()]


def take_undispatched(campaign_id: uuid.UUID, limit: int, token: str) -> list[uuid.UUID]:
    """Hand up to ``limit`` of a campaign's waiting rows to a new task (concurrent
    dispatchers skip each other's rows)."""
    sql = f"""
        UPDATE {MESSAGE} SET dispatch_token = %s, dispatched_at = now()
         WHERE id IN (SELECT id FROM {MESSAGE}
                       WHERE campaign_id = %s AND status = {QUEUED}
                         AND dispatch_token = '' AND dispatched_at IS NULL
                       LIMIT %s FOR UPDATE SKIP LOCKED)
     RETURNING id
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [token, campaign_id, limit])
        return [row[0] for row in cursor.fetchall()]


def cancel_unsent(campaign_id: uuid.UUID, reason: str) -> int:
    """Every message of the campaign that is not sent and not being sent ends cancelled."""
    sql = f"""
        UPDATE {MESSAGE}
           SET status = {CANCELLED}, status_reason = %s, dispatch_token = '',
               lease_expires_at = NULL, updated_at = now()
         WHERE campaign_id = %s AND status IN ({QUEUED}, {DEFERRED})
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [reason, campaign_id])
        return cursor.rowcount


def requeue_failed(campaign_id: uuid.UUID, code: int | None, reply_class: str | None) -> int:
    """Failed messages go back to the dispatcher with a fresh retry budget; never
    suppressed addresses. ``reply_class`` is "4xx", "5xx" or "network"."""
    sql = f"""
        UPDATE {MESSAGE} m
           SET status = {QUEUED}, attempts = 0, next_attempt_at = NULL, dispatch_token = '',
               dispatched_at = NULL, lease_expires_at = NULL, status_reason = 'replayed',
               updated_at = now()
         WHERE m.campaign_id = %s AND m.status = {FAILED}
           AND (%s::int IS NULL OR m.last_smtp_code = %s::int)
           AND (%s::text IS NULL
                OR (%s = 'network' AND m.last_smtp_code IS NULL)
                OR (m.last_smtp_code / 100)::text || 'xx' = %s)
           AND NOT EXISTS (SELECT 1 FROM {SUPPRESSION} s WHERE s.address = lower(m.to_email))
    """
    params = [campaign_id, code, code, reply_class, reply_class, reply_class]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def campaign_counts(campaign_id: uuid.UUID) -> dict[str, int]:
    sql = f"""
        SELECT status, sum(count) FROM {COUNTS} WHERE campaign_id = %s GROUP BY status
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [campaign_id])
        return {status: int(total) for status, total in cursor.fetchall() if total}
