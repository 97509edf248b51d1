"""Operator controls: the global bulk switch and the run-time rate limits."""

from __future__ import annotations

import logging

from email_service import (
    keys,
    ratelimit,
    redisstore,
)
from email_service.exceptions import InvalidEmailRequest
from email_service.models import (
    ControlFlag,
)
from email_service.services.delivery import redispatch_orphans

logger = logging.getLogger(__name__)


def pause_bulk() -> None:
    """Pause every bulk batch before its next message; transactional mail keeps flowing."""
    ControlFlag.objects.update_or_create(name=keys.BULK_PAUSE, defaults={"enabled": True})
    redisstore.client().set(keys.BULK_PAUSE, "1")


def resume_bulk() -> int:
    """Resume bulk and re-dispatch exactly the bulk rows that are not sent or in flight."""
    ControlFlag.objects.update_or_create(name=keys.BULK_PAUSE, defaults={"enabled": False})
    redisstore.client().set(keys.BULK_PAUSE, "0")
    return redispatch_orphans(stale_seconds=0)


def set_rate_limits(
    *, per_second: float | None = None, per_hour: int | None = None, per_day: int | None = None
) -> ratelimit.Limits:
    """Change the global limits at run time (0 lifts one); every worker follows at once."""
    for name, value in (("per_second", per_second), ("per_hour", per_hour), ("per_day", per_day)):
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise InvalidEmailRequest(name, "must be a number, 0 or more")
    return ratelimit.set_limits(per_second=per_second, per_hour=per_hour, per_day=per_day)
