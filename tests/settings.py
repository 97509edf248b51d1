"""Settings for the test run: the real settings module, fed a test environment.

The same environment is handed to every process a test starts (Celery workers, beat,
gunicorn), so they all talk to the same private Redis, test database and SMTP sink.
"""

from __future__ import annotations

import os

from mailroom_testkit.processes import free_port

TEST_ENV = {
    "SECRET_KEY": "test-secret-key-not-for-production",
    "DEBUG": "false",
    "ALLOWED_HOSTS": "localhost,127.0.0.1,testserver",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/mailroom_tests",
    # A private redis-server on a free port, started by the tests' conftest.
    "MAILROOM_TEST_REDIS_PORT": str(free_port()),
    "MAILROOM_TEST_SMTP_PORT": str(free_port()),
    "EMAIL_HOST": "127.0.0.1",
    "EMAIL_TIMEOUT": "2",
    "DEFAULT_FROM_EMAIL": "Mailroom Tests <noreply@mailroom.example.com>",
    # Senders the tests use; tests of the sender rule set their own lists.
    "MAILROOM_ALLOWED_SENDERS": "mailroom.example.com,example.com",
    # Short clocks so that failure recovery happens within a test's patience.
    "MAILROOM_LEASE_SECONDS": "8",
    "MAILROOM_STALE_QUEUED_SECONDS": "2",
    "MAILROOM_RETRY_BASE_SECONDS": "0.5",
    "MAILROOM_SWEEP_INTERVAL_SECONDS": "1",
    "MAILROOM_DISPATCH_INTERVAL_SECONDS": "0.5",
    "MAILROOM_PUBLIC_URL": "https://mail.example.com",
    "CELERY_TASK_SOFT_TIME_LIMIT": "30",
    "CELERY_TASK_TIME_LIMIT": "40",
    "CELERY_VISIBILITY_TIMEOUT": "60",
    # Countdowns stay below the visibility timeout (check mailroom.W031); longer waits are
    # rows that the sweeper enqueues once due.
    "MAILROOM_MAX_COUNTDOWN_SECONDS": "30",
    "LOG_LEVEL": "WARNING",
}
# Under pytest-xdist every worker process gets its own private Redis and SMTP sink: it
# inherits the environment of the process that started it, ports included, so they are
# chosen again once per worker.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER and os.environ.get("MAILROOM_TEST_PORTS_OF") != _WORKER:
    for _name in ("MAILROOM_TEST_REDIS_PORT", "MAILROOM_TEST_SMTP_PORT", "REDIS_URL", "EMAIL_PORT"):
        os.environ.pop(_name, None)
    os.environ["MAILROOM_TEST_PORTS_OF"] = _WORKER
for _name, _value in TEST_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("REDIS_URL", f"redis://127.0.0.1:{os.environ['MAILROOM_TEST_REDIS_PORT']}/0")
os.environ.setdefault("EMAIL_PORT", os.environ["MAILROOM_TEST_SMTP_PORT"])

from messaging_platform.settings import *  # noqa: E402, F403
