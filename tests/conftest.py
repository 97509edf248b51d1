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

from tests.support.processes import RedisServer, Role, beat, wait_until, worker
from tests.support.smtp_sink import SMTPSink

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


@pytest.fixture
def role_env(transactional_db: None) -> dict[str, str]:
    """The environment for processes a test starts, pointed at the *test* database."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env["DJANGO_SETTINGS_MODULE"] = "messaging_platform.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


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
