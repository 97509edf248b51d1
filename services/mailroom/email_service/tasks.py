"""Celery tasks. Thin: ids in, ``services`` does the work.

``send_high_priority_email`` and ``send_bulk_email_batch`` keep the signatures of the
original design. Calling ``.delay()`` / ``.apply_async()`` on them no longer puts the
payload on Redis: it validates the request and writes the ``Message`` rows right there,
in the caller's process, and enqueues their delivery after commit. Even if Redis loses
the task, the rows exist and the sweeper delivers them. (A producer that bypasses this
with ``send_task`` by name still works: the worker records the rows, keyed by the task
id, so a redelivered task does not create a second copy.)

``apply_async`` keeps Celery's meaning for the options that concern the email:
``countdown`` and ``eta`` (not sent before; a long wait is database state that the
sweeper picks up, never a long broker countdown), ``expires`` (seconds or a datetime:
unsent by then, the message is cancelled with reason ``expired``), ``queue``
(``high_priority`` or ``bulk``: the pool that delivers it) and ``task_id`` (the
idempotency key: the same id twice records the email once). ``ignore_result`` is
accepted (results are never stored). Any other option raises ``TypeError``: it would
be silently meaningless here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Task, shared_task
from celery.result import AsyncResult
from django.utils import timezone

from email_service import services
from email_service.models import Queue


class QueuedResult(AsyncResult):
    """What ``.delay()`` returns: ``message_ids`` are the rows that were recorded.

    Results are not stored (delivery status lives in Postgres), so look the messages
    up by id instead of calling ``.get()``.
    """

    message_ids: list[str]


# What apply_async honours (see the module docstring); everything else is a TypeError.
SUPPORTED_OPTIONS = frozenset({"countdown", "eta", "expires", "queue", "ignore_result"})


@dataclass(frozen=True)
class Schedule:
    """When and where a recorded email goes: Celery's options, resolved."""

    send_at: datetime | None = None
    expires_at: datetime | None = None
    queue: str | None = None


class RecordFirstTask(Task):
    """A task whose ``apply_async`` records the email in Postgres instead of queueing it."""

    abstract = True
    typing = True

    def record(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None,
        schedule: Schedule = Schedule(),
    ) -> list[str]:
        raise NotImplementedError

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        *extra: Any,
        **options: Any,
    ) -> QueuedResult:
        if extra:
            raise TypeError(
                f"{self.name}.apply_async() takes args, kwargs and task_id positionally; "
                "pass every other option by name"
            )
        schedule = _schedule(self.name, options)
        key = f"celery-task:{task_id}" if task_id else None
        result = QueuedResult(task_id or str(uuid.uuid4()), app=self.app)
        result.message_ids = self.record(tuple(args or ()), dict(kwargs or {}), key, schedule)
        return result


def _schedule(task: str, options: dict[str, Any]) -> Schedule:
    unsupported = sorted(set(options) - SUPPORTED_OPTIONS)
    if unsupported:
        raise TypeError(
            f"{task}.apply_async() cannot honour {', '.join(unsupported)}: the email is "
            f"recorded in the outbox, not queued as this task (supported: "
            f"{', '.join(sorted(SUPPORTED_OPTIONS))}, task_id)"
        )
    if options.get("countdown") is not None and options.get("eta") is not None:
        raise TypeError(f"{task}.apply_async(): give countdown or eta, not both")
    now = timezone.now()
    send_at = _moment(options.get("eta"), "eta", now)
    if options.get("countdown") is not None:
        send_at = now + timedelta(seconds=_seconds(options["countdown"], "countdown"))
    queue = options.get("queue")
    if queue is not None and queue not in Queue.values:
        raise TypeError(
            f"{task}.apply_async(queue={queue!r}): the queues are {', '.join(Queue.values)}"
        )
    return Schedule(send_at, _moment(options.get("expires"), "expires", now), queue)


def _moment(value: object, name: str, now: datetime) -> datetime | None:
    """A Celery time option: a datetime (naive is UTC), or for ``expires`` also seconds."""
    if value is None or isinstance(value, datetime):
        return value
    if name == "expires":
        return now + timedelta(seconds=_seconds(value, name))
    raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    return float(value)


class SendHighPriorityEmail(RecordFirstTask):
    def record(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None,
        schedule: Schedule = Schedule(),
    ) -> list[str]:
        recipient, subject, context, template = _legacy_args(args, kwargs, "recipient")
        message = services.send_email(
            to=recipient,
            subject=subject,
            context=context,
            template=template,
            idempotency_key=key,
            queue=schedule.queue or Queue.HIGH_PRIORITY,
            send_at=schedule.send_at,
            expires_at=schedule.expires_at,
        )
        return [str(message.id)]


class SendBulkEmailBatch(RecordFirstTask):
    def record(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: str | None,
        schedule: Schedule = Schedule(),
    ) -> list[str]:
        recipients, subject, context, template = _legacy_args(args, kwargs, "recipients")
        if schedule.queue not in (None, Queue.BULK):
            raise TypeError("send_bulk_email_batch sends on the bulk queue only")
        messages = services.send_bulk_batch(
            recipients,
            subject,
            context,
            template,
            idempotency_prefix=key,
            send_at=schedule.send_at,
            expires_at=schedule.expires_at,
        )
        return [str(m.id) for m in messages]


def _legacy_args(args: tuple[Any, ...], kwargs: dict[str, Any], first: str) -> tuple[Any, ...]:
    names = (first, "subject", "context", "template")
    values = dict(zip(names, args, strict=False)) | kwargs
    missing = [name for name in names if name not in values]
    if missing:
        raise TypeError(f"missing argument(s): {', '.join(missing)}")
    return tuple(values[name] for name in names)


@shared_task(bind=True, base=SendHighPriorityEmail, name="email_service.send_high_priority_email")
def send_high_priority_email(
    self: SendHighPriorityEmail,
    recipient: str,
    subject: str,
    context: dict[str, Any],
    template: str,
) -> list[str]:
    """Runs only for producers that enqueue by name; ``.delay()`` records in the caller."""
    key = f"celery-task:{self.request.id}"
    return self.record((recipient, subject, context, template), {}, key)


@shared_task(bind=True, base=SendBulkEmailBatch, name="email_service.send_bulk_email_batch")
def send_bulk_email_batch(
    self: SendBulkEmailBatch,
    recipients: list[str],
    subject: str,
    context: dict[str, Any],
    template: str,
) -> list[str]:
    """Runs only for producers that enqueue by name; ``.delay()`` records in the caller."""
    key = f"celery-task:{self.request.id}"
    return self.record((recipients, subject, context, template), {}, key)


@shared_task(name="email_service.deliver_high_priority")
def deliver_high_priority(message_ids: list[str], dispatch_token: str = "") -> None:
    services.deliver(Queue.HIGH_PRIORITY, message_ids, dispatch_token)


@shared_task(name="email_service.deliver_bulk")
def deliver_bulk(message_ids: list[str], dispatch_token: str = "") -> None:
    services.deliver(Queue.BULK, message_ids, dispatch_token)


@shared_task(name="email_service.sweep")
def sweep() -> None:
    services.sweep()


@shared_task(name="email_service.dispatch_campaigns")
def dispatch_campaigns() -> None:
    services.dispatch_campaigns()


__all__ = [
    "deliver_bulk",
    "deliver_high_priority",
    "dispatch_campaigns",
    "send_bulk_email_batch",
    "send_high_priority_email",
    "sweep",
]
