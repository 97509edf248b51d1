"""The Celery application. Configuration lives in settings.py under the CELERY_ prefix.

A worker or beat checks the settings as it starts (messaging_platform/checks.py) and exits
with status 1, naming every bad variable, before it takes a task or schedules one.
"""

import os
import sys
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "messaging_platform.settings")

app = Celery("messaging_platform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def check_settings(role: str) -> None:
    """The system checks, or SystemExit: Celery logs and ignores any other exception that
    a signal handler raises, and would start regardless. Written to the process's own
    stderr: beat has already pointed ``sys.stderr`` at its logger by then."""
    from django.core.exceptions import ImproperlyConfigured

    from messaging_platform.checks import enforce

    stderr = sys.__stderr__ or sys.stderr
    try:
        enforce(role, stderr)
    except ImproperlyConfigured as exc:
        print(exc, file=stderr, flush=True)
        raise SystemExit(1) from None


@signals.worker_init.connect
def _check_worker_settings(**_: Any) -> None:
    check_settings("worker")


@signals.beat_init.connect
def _check_beat_settings(**_: Any) -> None:
    check_settings("beat")


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_smtp_sessions(**_: Any) -> None:
    """QUIT the warm SMTP sessions this process kept, rather than dropping them."""
    from email_service import smtp

    smtp.close_pool()
