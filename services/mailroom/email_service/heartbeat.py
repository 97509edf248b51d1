"""Worker heartbeats: which pools have live workers, and a liveness file for probes.

Every worker's main process refreshes a Redis key ``mailroom:worker:<pool>:<hostname>``
(expiring after ``TTL`` seconds) from a small thread, so ``/metrics`` can say how many
workers each pool has without the cost of ``celery inspect ping``. When
MAILROOM_WORKER_HEARTBEAT_FILE is set, the same thread touches that file, which a
Kubernetes or Compose liveness probe can check for freshness: a worker whose consumer
has stopped (celery/celery#8082) stops touching it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from email_service import keys, redisstore

logger = logging.getLogger(__name__)

INTERVAL = 10.0
TTL = 30
_stop = threading.Event()
_state: dict[str, str] = {}


def worker_key(pool: str, hostname: str) -> str:
    return keys.worker_key(pool, hostname)


def pool_name(queues: list[str]) -> str:
    """A bounded label: the sorted queue names a worker consumes, joined by '+'."""
    return "+".join(sorted(set(queues)))


def beat_once(key: str, heartbeat_file: str = "") -> None:
    try:
        redisstore.client().set(key, "1", ex=TTL)
    except redis.RedisError:
        logger.warning("could not refresh worker heartbeat %s", key)
        return  # a worker cut off from Redis is not healthy: leave the file stale
    if heartbeat_file:
        Path(heartbeat_file).touch()


def _loop(key: str, heartbeat_file: str) -> None:
    while not _stop.is_set():
        beat_once(key, heartbeat_file)
        _stop.wait(INTERVAL)


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    queues = [q.name for q in sender.task_consumer.queues] if sender is not None else []
    key = worker_key(pool_name(queues), str(getattr(sender, "hostname", "unknown")))
    _state["key"] = key
    heartbeat_file = os.environ.get("MAILROOM_WORKER_HEARTBEAT_FILE", "")
    threading.Thread(target=_loop, args=(key, heartbeat_file), daemon=True).start()


@worker_shutdown.connect
def _stop_beating(**_: Any) -> None:
    _stop.set()
    key = _state.get("key")
    if key:
        try:
            redisstore.client().delete(key)
        except redis.RedisError:
            logger.debug("could not remove worker heartbeat %s", key)
