"""Celery tasks. Thin: ids in, ``services`` does the work.

``send_high_priority_email`` and ``send_bulk_email_batch`` keep the signatures of the
original design. Calling ``.delay()`` / ``.apply_async()`` on them no longer puts the
payload on Redis: it validates the request and writes the ``Message`` rows right there,
in the caller's process, and enqueues their delivery after commit. Even if Redis loses
the task, the rows exist and the sweeper delivers them. (A producer that bypasses this
with ``send_task`` by name still works: the worker records the rows, keyed by the task
id, so a redelivered task does not create a second copy.)
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Task, shared_task
from celery.result import AsyncResult

from email_service import services
from email_service.models import Queue


class QueuedResult(AsyncResult):
    """What ``.delay()`` returns: ``message_ids`` are the rows that were recorded.

    Results are not stored (delivery status lives in Postgres), so look the messages
    up by id instead of calling ``.get()``.
    """

    message_ids: list[str]


class RecordFirstTask(Task):
    """A task whose ``apply_async`` records the email in Postgres instead of queueing it."""

    abstract = True
    typing = True

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None) -> list[str]:
        raise NotImplementedError

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        *extra: Any,
        **options: Any,
    ) -> QueuedResult:
        result = QueuedResult(task_id or str(uuid.uuid4()), app=self.app)
        result.message_ids = self.record(tuple(args or ()), dict(kwargs or {}), None)
        return result


class SendHighPriorityEmail(RecordFirstTask):
    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None) -> list[str]:
        recipient, subject, context, template = _legacy_args(args, kwargs, "recipient")
        message = services.send_email(
            to=recipient, subject=subject, context=context, template=template, idempotency_key=key
        )
        return [str(message.id)]


class SendBulkEmailBatch(RecordFirstTask):
    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None) -> list[str]:
        recipients, subject, context, template = _legacy_args(args, kwargs, "recipients")
        messages = services.send_bulk_batch(
            recipients, subject, context, template, idempotency_prefix=key
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
