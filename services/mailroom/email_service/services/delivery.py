"""Delivery (worker side) and the sweeper (beat).

A task claims each row with a conditional UPDATE before sending, records every attempt,
and retries only the recipients that are not yet sent. The sweeper finds every row
whose task was lost (a lease expired, a token gone from Redis, a retry due) and
enqueues it again.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dkim
import psycopg
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from email_service import (
    dkim_signing,
    keys,
    outbox,
    ratelimit,
    redisstore,
    smtp,
    smtp_health,
    template_engine,
)
from email_service import unsubscribe as unsubscribe_links
from email_service.exceptions import InvalidEmailRequest
from email_service.models import (
    Campaign,
    Message,
    Queue,
    Suppression,
)
from email_service.redisstore import Outcome
from email_service.rendering import (
    RAW_TEMPLATE,
    PreparedCache,
    render_subject,
)
from email_service.services.dispatch import (
    enqueue,
    forget_token,
    suppress,
    suppressed_addresses,
)
from email_service.smtp import SendResult
from email_service.switches import campaign_state, is_bulk_paused, pause_state
from email_service.validation import (
    check_header,
    envelope_address,
)

logger = logging.getLogger(__name__)


# Consecutive network failures after which the rest of a batch is deferred untried:
# a relay that is down should cost one timeout or three, not fifty.
RELAY_DOWN_AFTER = 3


@dataclass
class BatchReport:
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    suppressed: int = 0
    released: int = 0
    retries: list[tuple[uuid.UUID, datetime]] = field(default_factory=list)
    done: set[uuid.UUID] = field(default_factory=set)


def retry_delay(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` tries: min(2**n * base, max), jittered.

    Jitter only ever lengthens the wait (by up to a quarter), so retries from one batch
    spread out instead of hitting a recovering relay together.
    """
    base = settings.MAILROOM_RETRY_BASE_SECONDS
    ceiling = settings.MAILROOM_RETRY_MAX_SECONDS
    delay = min(2 ** max(attempts - 1, 0) * base, ceiling)
    return min(delay * random.uniform(1.0, 1.25), ceiling)


def deliver(
    queue: str, message_ids: Sequence[str | uuid.UUID], dispatch_token: str = ""
) -> BatchReport:
    """Deliver the rows of one task: claim, send over one connection, record each."""
    report = BatchReport()
    try:
        if queue == Queue.BULK and is_bulk_paused():
            # Checked before claiming, so a paused batch costs no writes and frees its
            # worker at once; resume re-dispatches these rows.
            logger.info("bulk paused: batch of %d left queued", len(message_ids))
        else:
            report = _deliver_claimed(outbox.claim(message_ids, settings.MAILROOM_LEASE_SECONDS))
            _schedule_retries(queue, report.retries)
    finally:
        if dispatch_token:
            forget_token(dispatch_token)
    return report


def _deliver_claimed(rows: list[outbox.ClaimedRow]) -> BatchReport:
    report = BatchReport()
    if not rows:
        return report
    return _BatchRun(_drop_suppressed(rows, report), report).run()


class _BatchRun:
    """One task's claimed rows, sent over up to MAILROOM_SMTP_CONNECTIONS_PER_PROCESS
    warm SMTP sessions at once.

    The conversations run in lane threads, which do nothing but SMTP; this thread keeps
    everything else, in order: the rate-limit token, rendering, and for each finished
    conversation its durable record, the pause/cancel check and the counters. So a
    relay 80 ms away costs round trips in parallel, not in series, and every guarantee
    of the one-connection loop holds per message: claimed before it is sent, recorded
    once, nothing new handed to a lane after a pause or cancel is seen. A worker killed
    mid-batch leaves at most one unrecorded message per lane (and one whose record was
    in flight): the duplicate bound per worker process is lanes + 1.
    """

    def __init__(self, rows: list[outbox.ClaimedRow], report: BatchReport) -> None:
        self.rows = rows
        self.todo = deque(rows)  # not yet handed to a lane
        self.report = report
        self.pool = smtp.pool()
        self.lanes = max(1, min(settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS, len(rows)))
        self.inflight: dict[Future[tuple[SendResult, int]], outbox.ClaimedRow] = {}
        self.connections_opened = 0
        self.network_failures = 0
        self.answered = False  # the relay has replied to a message of this batch
        self.stop = ""  # why no new message may start: paused, relay down, relay config
        self.unusable: list[outbox.ClaimedRow] = []  # refused by the relay's configuration
        self.prepared = PreparedCache()
        self.lease = settings.MAILROOM_LEASE_SECONDS
        self.renew_at = time.monotonic() + self.lease / 3
        self.pending: outbox.PendingWrite | None = None
        self.tally = redisstore.Tally()
        dkim_signing.is_configured()  # a bad key fails the task loudly, not each message
        limits = ratelimit.limits()
        self.limited = bool(limits.per_second or limits.per_hour or limits.per_day)

    def _take_token(self, row: outbox.ClaimedRow, remaining: list[uuid.UUID]) -> bool:
        """Wait a moment for the global rate limit, or hand the rest of the batch back."""
        wait = ratelimit.wait_for_tokens(row.queue)
        if wait <= 0:
            return True
        self._collect(wait_all=True)
        remaining = [r.id for r in self.todo]  # with any message a lane gave back
        if self.stop:
            self._stop_before(remaining)
            return False
        self._settle()
        next_attempt_at = timezone.now() + timedelta(seconds=wait)
        self.report.released += outbox.release(remaining, next_attempt_at)
        self.report.retries.extend((i, next_attempt_at) for i in remaining)
        return False

    def run(self) -> BatchReport:
        try:
            self._loop()
            self._collect(wait_all=True)
            self._settle()
        except SoftTimeLimitExceeded:
            # The conversations in flight end and are recorded, so none goes twice.
            self._collect(wait_all=True)
            self._settle()
            unsent = [r.id for r in self.rows if r.id not in self.report.done]
            released = outbox.release(unsent)
            self.report.released += released
            logger.warning("time limit reached: %d message(s) handed back", released)
            _redispatch_now(self.rows[0].queue, unsent)
        finally:
            self._abandon()
            self._settle(discard=True)
            self.tally.flush()
            if self.connections_opened and self.rows:
                redisstore.count(self.rows[0].queue, "smtp_connections", self.connections_opened)
        return self.report

    def _loop(self) -> None:
        while self.todo or self.inflight:
            window = self._window() if self.todo else 1
            self._collect(wait_one=len(self.inflight) >= window)
            if not self.todo:
                continue  # the last conversations end (a lane may give one back)
            remaining = [r.id for r in self.todo]
            if self.stop:
                self._stop_before(remaining)
                return
            if time.monotonic() > self.renew_at:
                self._settle()
                outbox.renew([*remaining, *(r.id for r in self.inflight.values())], self.lease)
                self.renew_at = time.monotonic() + self.lease / 3
            row = self.todo[0]
            if self.limited and not self._take_token(row, remaining):
                return
            self.todo.popleft()
            data = _message_data(self.prepared, row)
            if isinstance(data, SendResult):
                self._complete(row, data)  # it cannot be made: failed without a conversation
                continue
            # The validated address as stored, never a re-parse of the display name.
            future = _lanes().submit(
                _converse, self.pool, envelope_address(row.from_email), row.to_email, data
            )
            self.inflight[future] = row
        if self.stop:
            self._stop_before([])  # messages the relay's configuration refused, last

    def _window(self) -> int:
        """How many conversations may be in flight: every lane once the relay has
        answered (or warm sessions wait), else one, so a relay that is down costs
        RELAY_DOWN_AFTER connection attempts, not one per lane."""
        if self.network_failures == 0 and (self.answered or self.pool.idle() > 0):
            return self.lanes
        return 1

    def _collect(self, *, wait_one: bool = False, wait_all: bool = False) -> None:
        """Record every finished conversation (after waiting for one, or for all)."""
        if not self.inflight:
            return
        timeout = None if (wait_one or wait_all) else 0
        when = ALL_COMPLETED if wait_all else FIRST_COMPLETED
        done, _ = wait(list(self.inflight), timeout=timeout, return_when=when)
        for future in [f for f in self.inflight if f in done]:  # in the order they started
            row = self.inflight.pop(future)
            result, opened = future.result()
            self.connections_opened += opened
            self._complete(row, result)

    def _complete(self, row: outbox.ClaimedRow, result: SendResult) -> None:
        if result.untried:
            # The fleet's connection budget is spent: this process keeps the sessions
            # it holds (the window shrinks to them) and the message waits its turn.
            self.todo.appendleft(row)
            self.lanes = max(1, len(self.inflight))
            if not self.inflight and not self.stop:
                self.stop = "no connection slot"
            return
        if result.config_error:
            if not self.unusable:
                smtp_health.relay_unusable(result.reply)
            self.unusable.append(row)
            self.stop = "relay configuration"
            return
        self._settle()  # the previous record committed while this conversation ran
        self.network_failures = self.network_failures + 1 if result.code is None else 0
        self.answered = self.answered or result.code is not None
        if self.network_failures >= RELAY_DOWN_AFTER and not self.stop:
            self.stop = "relay down"
        if result.ok:
            smtp_health.relay_usable()
        if self._record(row, result) and not self.stop:
            self.stop = "paused"

    def _stop_before(self, remaining: list[uuid.UUID]) -> None:
        """No new message starts: wait for those in flight, then give the rest back."""
        self._collect(wait_all=True)
        self._settle()
        if self.unusable:
            # Not the messages' fault: back untried (no attempt counted), after a pause
            # long enough that a misconfigured relay costs a log line a minute, not a storm.
            ids = [r.id for r in self.unusable] + remaining
            next_attempt_at = timezone.now() + timedelta(seconds=CONFIG_ERROR_RETRY_SECONDS)
            self.report.released += outbox.release(ids, next_attempt_at)
            self.report.retries.extend((i, next_attempt_at) for i in ids)
            self.unusable = []
        elif self.stop == "relay down":
            _defer_untried(remaining, self.rows[0].attempts, self.report)
        elif self.stop == "no connection slot":
            # Every slot is held elsewhere: back untried, soon; slots free as others end.
            next_attempt_at = timezone.now() + timedelta(seconds=NO_SLOT_RETRY_SECONDS)
            self.report.released += outbox.release(remaining, next_attempt_at)
            self.report.retries.extend((i, next_attempt_at) for i in remaining)
            logger.info("connection budget spent: %d message(s) handed back", len(remaining))
        elif remaining:
            self.report.released += outbox.release(remaining)
            logger.info("bulk paused: %d message(s) left queued", len(remaining))

    def _abandon(self) -> None:
        """On the way out with an error: let the lanes finish (their sessions go back to
        the pool); rows they sent stay ``sending`` and the sweeper settles them."""
        if self.inflight:
            wait(list(self.inflight))
            self.inflight.clear()

    def _settle(self, *, discard: bool = False) -> None:
        """Collect the outstanding record; the connection is unusable until then."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.wait()
        except (DatabaseError, psycopg.Error):
            if not discard:
                raise
            logger.exception("could not confirm the last delivery record")
            connection.close()

    def _record(self, row: outbox.ClaimedRow, result: SendResult) -> bool:
        """Store the outcome of one try; return whether the batch must stop (paused,
        cancelled) before its next message."""
        report = self.report
        next_attempt_at = None
        if result.ok:
            status, outcome = Message.Status.SENT, Outcome.SENT
            report.sent += 1
        elif result.permanent or row.attempts > settings.MAILROOM_MAX_RETRIES:
            status, outcome = Message.Status.FAILED, Outcome.FAILED
            report.failed += 1
        else:
            status, outcome = Message.Status.DEFERRED, Outcome.RETRIED
            next_attempt_at = timezone.now() + timedelta(seconds=retry_delay(row.attempts))
            report.deferred += 1
            report.retries.append((row.id, next_attempt_at))
        self.pending = outbox.record(row.id, status, result.code, result.reply, next_attempt_at)
        report.done.add(row.id)
        if result.throttled:
            ratelimit.note_throttle()
        self.tally.add(
            row.queue,
            outcome,
            row.to_email,
            campaign_id=row.campaign_id,
            reply_class=result.reply_class,
            latency=(timezone.now() - row.created_at).total_seconds() if result.ok else None,
        )
        if self.tally.due():
            self.tally.flush()
        # This Redis round trip overlaps the Postgres commit of the record above.
        values = redisstore.read(_stop_keys(row))
        if result.bad_mailbox:
            self._settle()
            suppress(row.to_email, Suppression.Reason.HARD_BOUNCE, f"{result.code} {result.reply}")
        if values is None or None in values:
            self._settle()  # a mirror is missing (Redis flushed or down): Postgres decides
        return _must_stop(row, values)


# A relay that refuses our configuration (certificate, login) is tried again this often.
CONFIG_ERROR_RETRY_SECONDS = 60.0
# A batch that found no free connection slot at all is tried again this soon.
NO_SLOT_RETRY_SECONDS = 2.0

_lane_pool: ThreadPoolExecutor | None = None
_lane_lock = threading.Lock()


def _lanes() -> ThreadPoolExecutor:
    """This process's lane threads (made on first use, so after a prefork fork)."""
    global _lane_pool
    with _lane_lock:
        if _lane_pool is None:
            _lane_pool = ThreadPoolExecutor(
                max_workers=settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS,
                thread_name_prefix="smtp-lane",
            )
        return _lane_pool


def _converse(
    pool: smtp.TransportPool, from_addr: str, to_addr: str, data: bytes
) -> tuple[SendResult, int]:
    """One message over a session from the pool (a lane thread: SMTP only, no database);
    returns the result and how many connections it opened."""
    transport = pool.take()
    opened = transport.connections_opened
    try:
        result = transport.send(from_addr, to_addr, data)
    finally:
        pool.give(transport)
    return result, transport.connections_opened - opened


def _stop_keys(row: outbox.ClaimedRow) -> tuple[str, ...]:
    if row.queue != Queue.BULK:
        return ()
    if row.campaign_id is None:
        return (keys.BULK_PAUSE,)
    return (keys.BULK_PAUSE, keys.campaign_state_key(row.campaign_id))


def _must_stop(row: outbox.ClaimedRow, values: list[bytes | None] | None) -> bool:
    if row.queue != Queue.BULK:
        return False
    values = values or [None, None]
    if pause_state(values[0]):
        return True
    if row.campaign_id is None:
        return False
    return campaign_state(row.campaign_id, values[1]) != Campaign.Status.SENDING


def _drop_suppressed(rows: list[outbox.ClaimedRow], report: BatchReport) -> list[outbox.ClaimedRow]:
    """The suppression list is checked again just before sending: it may have grown."""
    blocked = suppressed_addresses((r.to_email for r in rows), rows[0].queue)
    if not blocked:
        return rows
    stopped = [r for r in rows if r.to_email.lower() in blocked]
    outbox.mark_suppressed([r.id for r in stopped])
    redisstore.count(rows[0].queue, Outcome.SUPPRESSED, len(stopped))
    report.suppressed += len(stopped)
    return [r for r in rows if r.to_email.lower() not in blocked]


UNSUBSCRIBE_PLACEHOLDER = "mailroom-unsubscribe-url-placeholder"


def _message_data(prepared: PreparedCache, row: outbox.ClaimedRow) -> bytes | SendResult:
    """The message's bytes, or the failure that stands for a try when it cannot be made."""
    try:
        return message_bytes(prepared, row)
    except (template_engine.EmailTemplateError, InvalidEmailRequest) as exc:
        # The caller's template or subject cannot make this message: a work or output
        # limit, a recipient's context that does not fit, a template gone since the
        # request was accepted. Fail this one message; the batch goes on.
        logger.warning("cannot render message %s: %s", row.id, exc)
        return SendResult(code=554, reply=f"5.6.0 Mailroom could not render the message: {exc}")
    except (ValueError, LookupError, TypeError, dkim.DKIMException) as exc:
        # Stored content that cannot be serialised or signed. Anything else (a bug, a
        # configuration error, the task's time limit) is not this message's fault.
        logger.exception("cannot render message %s", row.id)
        return SendResult(code=554, reply=f"5.6.0 Mailroom could not render the message: {exc}")


def message_bytes(prepared: PreparedCache, row: outbox.ClaimedRow) -> bytes:
    """The exact bytes for one recipient: rendered once per distinct context, with the
    per-recipient headers, the unsubscribe link for bulk mail, and a DKIM signature."""
    context = json.loads(row.context) if isinstance(row.context, str) else dict(row.context)
    if row.template == RAW_TEMPLATE:
        return _raw_message_bytes(prepared, row, context)
    subject = row.subject
    if row.campaign_id:
        # A recipient's context may carry what a header must not: fail that one message.
        subject = check_header(render_subject(row.subject, context), "subject")
    headers: tuple[tuple[str, str], ...] = ()
    substitutions: tuple[tuple[str, str], ...] = ()
    placeholders: tuple[str, ...] = ()
    if row.queue == Queue.BULK:
        url, headers = unsubscribe_links.unsubscribe_links(row.to_email)
        substitutions = ((UNSUBSCRIBE_PLACEHOLDER, url),)
        placeholders = (UNSUBSCRIBE_PLACEHOLDER,)
        context["unsubscribe_url"] = UNSUBSCRIBE_PLACEHOLDER
    message = prepared.get(row.from_email, subject, row.template, context, placeholders)
    data = message.for_recipient(row.to_email, row.message_id_header, headers, substitutions)
    return dkim_signing.sign(data)


def _raw_message_bytes(
    prepared: PreparedCache, row: outbox.ClaimedRow, content: dict[str, Any]
) -> bytes:
    """A caller-rendered message (the Django email backend): the content as stored, with
    Message-ID, Date and, on the bulk queue, List-Unsubscribe (unless it has its own)."""
    headers: tuple[tuple[str, str], ...] = ()
    if row.queue == Queue.BULK:
        headers = unsubscribe_links.unsubscribe_links(row.to_email)[1]
    message = prepared.raw(row.from_email, row.subject, content)
    return dkim_signing.sign(message.for_recipient(row.to_email, row.message_id_header, headers))


def _defer_untried(ids: list[uuid.UUID], attempts: int, report: BatchReport) -> None:
    """The relay looks down: give the rest of the batch back with a delay, untried."""
    next_attempt_at = timezone.now() + timedelta(seconds=retry_delay(max(attempts, 1)))
    report.released += outbox.release(ids, next_attempt_at)
    report.retries.extend((i, next_attempt_at) for i in ids)
    logger.warning("SMTP relay unreachable: %d message(s) deferred untried", len(ids))


def _schedule_retries(queue: str, retries: list[tuple[uuid.UUID, datetime]]) -> None:
    """Soon retries ride a short Celery countdown; later ones wait in Postgres for beat.

    Long countdowns are never used: Redis would redeliver them after the visibility
    timeout, again and again.
    """
    if not retries:
        return
    now = timezone.now()
    horizon = settings.MAILROOM_MAX_COUNTDOWN_SECONDS
    soon = [(i, at) for i, at in retries if (at - now).total_seconds() <= horizon]
    if not soon:
        return
    token = uuid.uuid4().hex
    ids = outbox.set_token([i for i, _ in soon], token)
    if ids:
        countdown = max((at - now).total_seconds() for _, at in soon) + 0.5
        enqueue(queue, ids, token, countdown=countdown)


def _redispatch_now(queue: str, ids: Sequence[uuid.UUID]) -> None:
    token = uuid.uuid4().hex
    claimed = outbox.set_token(ids, token)
    if claimed:
        enqueue(queue, claimed, token)


@dataclass
class SweepReport:
    reclaimed: int = 0
    failed: int = 0
    redispatched: int = 0
    expired: int = 0


def sweep() -> SweepReport:
    """Find every row whose task is gone and enqueue it again. Safe to run concurrently.

    - ``sending`` rows whose lease expired (the worker died) go back to the queue, or
      fail if they have been claimed more often than the retry budget allows;
    - ``queued`` rows older than MAILROOM_STALE_QUEUED_SECONDS whose dispatch token is
      gone from Redis (the task was lost, e.g. Redis was flushed) are enqueued again;
    - ``deferred`` rows that are due and have no retry task in flight are enqueued;
    - rows accepted with a ``send_at`` too far off for a countdown are enqueued once due;
    - unsent rows past their ``expires_at`` are cancelled (reason ``expired``).
    """
    is_bulk_paused()  # restores the Redis mirror of the pause switch if it was flushed
    requeued, failed = outbox.reclaim_expired(settings.MAILROOM_MAX_RETRIES + 1)
    report = SweepReport(reclaimed=requeued, failed=failed, expired=outbox.expire_unsent())
    report.redispatched = redispatch_orphans(settings.MAILROOM_STALE_QUEUED_SECONDS)
    if requeued or failed or report.redispatched or report.expired:
        logger.info("sweep: %s", report)
    return report


def redispatch_orphans(stale_seconds: float, limit: int = 50_000) -> int:
    """Enqueue rows that wait for a task that no longer exists; return how many."""
    candidates = outbox.orphan_candidates(
        stale_seconds, include_bulk=not is_bulk_paused(), limit=limit
    )
    if not candidates:
        return 0
    tokens = sorted({token for _, _, token in candidates if token})
    alive: set[str] = set()
    if tokens:
        pipe = redisstore.client().pipeline(transaction=False)
        for token in tokens:
            pipe.exists(keys.dispatch_key(token))
        alive = {t for t, exists in zip(tokens, pipe.execute(), strict=True) if exists}
    dead_tokens = [t for t in tokens if t not in alive] + [""]
    by_queue: dict[str, list[uuid.UUID]] = {}
    for message_id, queue, token in candidates:
        if token not in alive:
            by_queue.setdefault(queue, []).append(message_id)
    count = 0
    batch_size = settings.MAILROOM_BATCH_SIZE
    for queue, ids in by_queue.items():
        for start in range(0, len(ids), batch_size):
            token = uuid.uuid4().hex
            taken = outbox.retoken(ids[start : start + batch_size], dead_tokens, token)
            if taken:
                enqueue(queue, taken, token)
                count += len(taken)
    return count
