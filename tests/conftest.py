"""Fixtures that start the real things: Redis, Postgres, Celery workers, an SMTP sink."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings

from mailroom_testkit.processes import RedisServer, Role, beat, free_port, wait_until, web, worker
from mailroom_testkit.smtp_sink import SMTPSink

REDIS_PORT = int(os.environ["MAILROOM_TEST_REDIS_PORT"])
SMTP_PORT = int(os.environ["MAILROOM_TEST_SMTP_PORT"])


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer]:
    """A private redis-server, so tests can flush or stop it without touching anyone else."""
    assert shutil.which("redis-server"), "redis-server is required (apt-get install redis-server)"
    server = RedisServer(REDIS_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_process: RedisServer) -> redis.Redis:
    if redis_process.proc is None or redis_process.proc.poll() is not None:
        redis_process.start()  # a previous test stopped it
    return redis.Redis(port=REDIS_PORT)


@pytest.fixture(autouse=True)
def _clean_redis(redis_server: redis.Redis) -> None:
    redis_server.flushall()


@pytest.fixture(scope="session")
def _sink_server() -> Iterator[SMTPSink]:
    sink = SMTPSink(SMTP_PORT).start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp_sink(_sink_server: SMTPSink) -> SMTPSink:
    _sink_server.reset()
    return _sink_server


def test_environment() -> dict[str, str]:
    """The environment for processes the tests start, pointed at the *test* database
    (its name is known once pytest-django has set it up)."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env["DJANGO_SETTINGS_MODULE"] = "messaging_platform.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.fixture
def role_env(transactional_db: None) -> dict[str, str]:
    """The environment for processes a test starts, pointed at the *test* database."""
    return test_environment()


@pytest.fixture(scope="session")
def shared_web(django_db_setup: None, redis_process: RedisServer) -> Iterator[str]:
    """One web role (gunicorn, as deployed) for every test of the session that needs the
    real HTTP stack with the test settings; yields its base URL. Between tests the
    database is flushed and Redis emptied as usual; the server keeps no state of its own
    that a test could see. Tests that need other settings start their own."""
    port = free_port()
    role = web(test_environment(), port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        role.stop()


# Tests that start processes (a worker, beat, gunicorn, a browser, manage.py, a private
# Prometheus or PostgreSQL) are the integration layer; `make test-fast` leaves them out.
INTEGRATION_FIXTURES = frozenset(
    {"running_worker", "start_role", "api_server", "client", "served", "shared_web",
     "web_server", "stack", "roles", "bulk_pool"}
)  # fmt: skip
INTEGRATION_MODULES = (
    "tests/chaos/",
    "tests/deploy/test_compose_roles.py",
    "tests/deploy/test_prometheus_e2e.py",
    "tests/dashboard/test_browser.py",
    "tests/test_dev.py",
    "tests/email_service/test_commands.py",
    "tests/messaging_platform/",
    "tests/email_service/test_backend.py::test_another_django_project",
)


# Under pytest-xdist (make test runs two workers), the fault suite runs on one worker, one
# fault after another: each starts a whole stack, and two at once would only compete.
SERIAL_GROUPS = {"tests/chaos/": "chaos"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & INTEGRATION_FIXTURES or item.nodeid.startswith(INTEGRATION_MODULES):
            item.add_marker(pytest.mark.integration)
        for prefix, group in SERIAL_GROUPS.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def start_role(role_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Role]]:
    """Start workers and beat for one test; everything is stopped when it ends."""
    started: list[Role] = []

    def start(kind: str, **kwargs: object) -> Role:
        env = dict(role_env)
        env.update({k: str(v) for k, v in dict(kwargs.pop("env", {}) or {}).items()})  # type: ignore[call-overload]
        role = (
            beat(env, tmp_path / "beat-schedule") if kind == "beat" else worker(env, **kwargs)  # type: ignore[arg-type]
        )
        started.append(role)
        return role.start()

    yield start
    for role in reversed(started):
        role.stop()


@pytest.fixture
def running_worker(start_role: Callable[..., Role]) -> Role:
    """One worker consuming both queues, as in the smallest deployment."""
    return start_role("worker", queues="high_priority,bulk", concurrency=2)


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "") -> None:
    wait_until(predicate, timeout, interval=0.1, what=what)


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)
