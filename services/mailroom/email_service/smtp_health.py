"""The relay refused Mailroom's configuration: said once, loudly, where operators look.

A certificate that does not verify or a login the relay refuses is not a message's
fault and no retry helps, so delivery stops the batch and gives its messages back
(``services.delivery``), and this module makes it visible: an ERROR log line, and a
Redis key that ``/readyz`` and the dashboard show until no worker has seen the error
for ``ERROR_TTL_SECONDS`` (or a worker that saw it delivers again).
"""

from __future__ import annotations

import logging
import threading

import redis

from email_service import keys, redisstore

logger = logging.getLogger(__name__)

# Workers try a refused relay again every minute: the key outlives two such tries.
ERROR_TTL_SECONDS = 150

_seen = threading.Event()  # this process reported an error that it has not seen cleared


def relay_unusable(reason: str) -> None:
    logger.error("SMTP relay unusable as configured, delivery stopped: %s", reason)
    _seen.set()
    try:
        redisstore.client().set(keys.SMTP_RELAY_ERROR_KEY, reason, ex=ERROR_TTL_SECONDS)
    except redis.RedisError:
        logger.warning("could not publish the relay error: Redis unavailable")


def relay_usable() -> None:
    """A message went: clear the error this process reported (free otherwise)."""
    if not _seen.is_set():
        return
    _seen.clear()
    try:
        redisstore.client().delete(keys.SMTP_RELAY_ERROR_KEY)
    except redis.RedisError:
        logger.warning("could not clear the relay error: Redis unavailable")
    logger.warning("SMTP relay usable again")


def relay_error() -> str | None:
    """The last configuration error a worker saw, while it is current."""
    try:
        value = redisstore.client().get(keys.SMTP_RELAY_ERROR_KEY)
    except redis.RedisError:
        return None
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
