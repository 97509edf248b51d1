"""Workers announce themselves: a Redis key per worker (for /metrics) and a liveness file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from mailroom_testkit.processes import Role
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_running_worker_keeps_its_heartbeat_key_and_file_fresh(
    start_role: Callable[..., Role], redis_server: redis.Redis, tmp_path: Path
) -> None:
    beat_file = tmp_path / "alive"
    role = start_role(
        "worker",
        queues="bulk,high_priority",
        concurrency=1,
        env={"MAILROOM_WORKER_HEARTBEAT_FILE": beat_file},
    )

    wait_for(lambda: redis_server.keys("mailroom:worker:*"), 10, "the heartbeat key")
    [key] = redis_server.keys("mailroom:worker:*")
    assert os.fsdecode(key).startswith("mailroom:worker:bulk+high_priority:worker@")
    assert 0 < redis_server.ttl(key) <= 30
    wait_for(beat_file.exists, 10, "the heartbeat file")
    assert time.time() - beat_file.stat().st_mtime < 15

    role.stop()
    assert redis_server.keys("mailroom:worker:*") == [], "a stopped worker leaves no key"
