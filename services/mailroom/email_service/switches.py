"""The durable switches as workers read them before every message: the global bulk
pause and each campaign's state.

Postgres holds the truth (``ControlFlag``, ``Campaign.status``); Redis holds a mirror
that one read per message can check. A missing mirror (Redis was flushed) is read from
Postgres and written back. Low in the layers: metrics and every service read these.
"""

from __future__ import annotations

import logging
import uuid
from typing import cast

import redis

from email_service import keys, redisstore
from email_service.models import Campaign, ControlFlag

logger = logging.getLogger(__name__)


def is_bulk_paused() -> bool:
    try:
        raw = cast(bytes | None, redisstore.client().get(keys.BULK_PAUSE))
    except redis.RedisError:
        raw = None
    return pause_state(raw)


def pause_state(raw: bytes | None) -> bool:
    """The Redis mirror decides; when it is missing (flushed), Postgres does."""
    mirrored = redisstore.parse_pause(raw)
    if mirrored is not None:
        return mirrored
    durable = ControlFlag.objects.filter(name=keys.BULK_PAUSE, enabled=True).exists()
    try:
        redisstore.client().set(keys.BULK_PAUSE, "1" if durable else "0", nx=True)
    except redis.RedisError:
        logger.warning("could not restore the pause mirror in Redis")
    return durable


def campaign_state(campaign_id: uuid.UUID, raw: bytes | None = None) -> str:
    """A campaign's status as workers see it: the Redis mirror, else Postgres."""
    if raw is not None:
        return raw.decode()
    status = Campaign.objects.filter(id=campaign_id).values_list("status", flat=True).first()
    status = status or Campaign.Status.CANCELLED
    try:
        redisstore.client().set(keys.campaign_state_key(campaign_id), status, nx=True)
    except redis.RedisError:
        logger.warning("could not restore the state mirror of campaign %s", campaign_id)
    return status
