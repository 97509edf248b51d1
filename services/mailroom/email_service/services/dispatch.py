"""Handing rows to the worker pools, and the states that hold them back.

The bottom of the services: ``enqueue`` (a task per batch of committed rows, its token
in Redis first), the suppression rule (which addresses may get mail on which queue),
and the two switches that workers check before every message, the global bulk pause
and a campaign's state, each read from its Redis mirror and healed from Postgres.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence

import redis
from celery import current_app
from kombu.exceptions import OperationalError as BrokerError

from email_service import (
    keys,
    publisher,
    redisstore,
)
from email_service.models import (
    Queue,
    Suppression,
)

logger = logging.getLogger(__name__)


DELIVER_TASKS = {
    Queue.HIGH_PRIORITY: "email_service.deliver_high_priority",
    Queue.BULK: "email_service.deliver_bulk",
}


def enqueue(queue: str, ids: Sequence[uuid.UUID], token: str, countdown: float = 0) -> None:
    """Hand rows (already carrying ``token``) to a worker pool.

    A broker outage here loses nothing: the rows are committed and the sweeper will
    enqueue them once Redis is back, so the caller is not failed for it.
    """
    # The token goes first: a task that runs (and finishes) before the token is written
    # would otherwise leave a live token behind for rows it never delivered.
    ttl = redisstore.DISPATCH_TOKEN_TTL if not countdown else int(countdown) + 120
    key = keys.dispatch_key(token)
    name = DELIVER_TASKS[Queue(queue)]
    args = [[str(i) for i in ids], token]
    try:
        # Without a countdown (the API's hot path): token and task in one round trip.
        if countdown or not publisher.publish(name, args, key, len(ids), ttl):
            redisstore.client().set(key, len(ids), ex=ttl)
            current_app.send_task(name, args=args, countdown=countdown or None)
    except (redis.RedisError, BrokerError, OSError):
        logger.warning("broker unavailable; %d message(s) left for the sweeper", len(ids))
        forget_token(token)


def suppressed_addresses(addresses: Iterable[str], queue: str = Queue.BULK) -> set[str]:
    """The addresses that must not get mail on ``queue`` (``Suppression.reasons_blocking``)."""
    lowered = [a.lower() for a in addresses]
    blocked = Suppression.objects.filter(
        address__in=lowered, reason__in=Suppression.reasons_blocking(queue)
    )
    return set(blocked.values_list("address", flat=True))


def suppress(address: str, reason: str, detail: str = "") -> None:
    Suppression.objects.bulk_create(
        [Suppression(address=address.lower(), reason=reason, detail=detail[:2000])],
        ignore_conflicts=True,
    )


def forget_token(token: str) -> None:
    try:
        redisstore.client().delete(keys.dispatch_key(token))
    except redis.RedisError:
        logger.warning("could not clear dispatch token %s", token)
