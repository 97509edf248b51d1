"""A Django email backend that hands every message to Mailroom's durable queue.

``EMAIL_BACKEND = "email_service.backends.QueuedEmailBackend"`` makes ``send_mail()``,
``send_mass_mail()``, ``EmailMessage.send()`` and ``EmailMultiAlternatives`` store one
``Message`` row per recipient (to, cc and bcc alike) and return at once; Mailroom's
workers deliver them with retries, like any other message. The content is the caller's
(already rendered): it is stored as a "raw" message, see ``services.prepare_raw_email``.

- The queue is ``high_priority``; ``get_connection(queue="bulk")`` or a header
  ``X-Mailroom-Queue: bulk`` on one message (removed before sending) chooses ``bulk``.
- ``send_messages`` stores everything it accepts in one transaction and returns how
  many emails it accepted. An invalid email raises ``InvalidEmailRequest`` (a
  ``ValueError``) and stores nothing, unless ``fail_silently``: then it is skipped.
- Attachments are kept, up to MAILROOM_MAX_ATTACHMENT_BYTES per email (10 MiB).

Another Django project can use the backend too: see docs/integration.md, "Using Mailroom from
another Django project" (``MailroomRouter`` and ``MAILROOM_BROKER_URL`` are for it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from email.mime.base import MIMEBase
from typing import Any

from celery import Celery
from celery._state import get_current_app
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db.models import Model
from django.utils.encoding import force_str

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Queue

logger = logging.getLogger(__name__)

QUEUE_HEADER = "X-Mailroom-Queue"
# What the accept path reads from the settings of whichever project it runs in.
REQUIRED_SETTINGS = ("REDIS_URL", "MAILROOM_BATCH_SIZE", "MAILROOM_MESSAGE_ID_DOMAIN")


class QueuedEmailBackend(BaseEmailBackend):
    """Queue email in Mailroom's outbox instead of speaking SMTP."""

    def __init__(self, fail_silently: bool = False, queue: str | None = None, **kwargs: Any):
        super().__init__(fail_silently=fail_silently, **kwargs)
        missing = [name for name in REQUIRED_SETTINGS if not hasattr(settings, name)]
        if missing:
            raise ImproperlyConfigured(
                f"QueuedEmailBackend needs the setting(s) {', '.join(missing)} "
                "(see docs/integration.md)"
            )
        self.queue = queue or Queue.HIGH_PRIORITY

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        if not email_messages:
            return 0
        accepted = []
        for message in email_messages:
            if not message.recipients():
                continue  # as Django's SMTP backend: nobody to send to, nothing sent
            try:
                accepted.append(self._prepare(message))
            except InvalidEmailRequest as exc:
                if not self.fail_silently:
                    raise
                logger.warning("email not queued: %s", exc)
        if accepted:
            with _publishing():
                services.send_raw_emails(accepted)
        return len(accepted)

    def _prepare(self, message: EmailMessage) -> services.RawEmail:
        headers = {str(name): value for name, value in message.extra_headers.items()}
        queue = self.queue
        for name in list(headers):
            if name.lower() == QUEUE_HEADER.lower():
                queue = str(headers.pop(name)).strip().lower()
        alternatives = [
            (force_str(content), str(mimetype))
            for content, mimetype in getattr(message, "alternatives", ())
        ]
        attachments: list[services.RawAttachment] = [
            attachment.as_bytes() if isinstance(attachment, MIMEBase) else tuple(attachment)
            for attachment in message.attachments
        ]
        return services.prepare_raw_email(
            subject=force_str(message.subject),
            body=force_str(message.body),
            body_subtype=message.content_subtype,
            from_email=force_str(message.from_email),
            to=[force_str(a) for a in message.to],
            cc=[force_str(a) for a in message.cc],
            bcc=[force_str(a) for a in message.bcc],
            reply_to=[force_str(a) for a in message.reply_to],
            headers={name: force_str(value) for name, value in headers.items()},
            alternatives=alternatives,
            attachments=attachments,
            mixed_subtype=message.mixed_subtype,
            queue=queue,
        )


class MailroomRouter:
    """For another Django project: Mailroom's models live in Mailroom's database, the
    alias named by MAILROOM_DATABASE ("mailroom" by default). Mailroom migrates its own
    database; this project never does."""

    def _alias(self, model: type[Model]) -> str | None:
        if model._meta.app_label != "email_service":
            return None
        return str(getattr(settings, "MAILROOM_DATABASE", "mailroom"))

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return self._alias(model)

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return self._alias(model)

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return False if app_label == "email_service" else None


@functools.cache
def _publisher_app(broker_url: str) -> Celery:
    """A Celery app that only publishes Mailroom's tasks to Mailroom's broker."""
    app = Celery("mailroom-client", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        task_default_queue=Queue.HIGH_PRIORITY,
        task_routes={
            "email_service.deliver_bulk": {"queue": Queue.BULK},
            "email_service.*": {"queue": Queue.HIGH_PRIORITY},
        },
        broker_connection_retry_on_startup=True,
    )
    return app


@contextmanager
def _publishing() -> Iterator[None]:
    """In another project (MAILROOM_BROKER_URL set), delivery tasks go to Mailroom's
    broker whatever Celery app (if any) the project runs; in Mailroom, to its own."""
    broker_url = getattr(settings, "MAILROOM_BROKER_URL", "")
    if not broker_url:
        yield
        return
    previous = get_current_app()
    _publisher_app(broker_url).set_current()
    try:
        yield
    finally:
        previous.set_current()
