"""The connection budget: at most ``MAILROOM_SMTP_MAX_CONNECTIONS`` SMTP connections open
to the relay at once, across every worker process on every host.

Relays cap how many connections one client may hold (and answer "421 too many
connections" past it); scaling workers must never exceed that. Each open connection
holds a slot: a member of one Redis sorted set whose score is its lease's expiry, on
Redis server time. A slot is taken by one Lua script (drop expired leases, count, add)
so two workers never both take the last one; it is renewed while the connection is
used and given back when it closes. A worker killed with connections open holds its
slots only until their leases expire (``LEASE_SECONDS``), then they come back by
themselves. With the budget unset (0) nothing is counted.

Redis unreachable: the slot is granted (the budget fails open, with a warning): a relay
over its cap answers 421, which delivery already treats as throttling, so an outage of
the broker never stops transactional mail.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid

import redis

from email_service import keys, redisstore

logger = logging.getLogger(__name__)

# A slot outlives its last renewal by this long; a warm session renews every third of
# it when used, and the pool closes idle sessions well before (MAILROOM_SMTP_IDLE_SECONDS
# must stay below it: a system check says so).
LEASE_SECONDS = 60.0
# How long a lane waits for a free slot before handing its message back untried.
WAIT_SECONDS = 2.0

_TAKE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[3]) * 1000) + 1000)
return 1
"""


def new_slot_id() -> str:
    """A name for one connection's slot: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class ConnectionBudget:
    """The fleet-wide cap on open relay connections (``limit`` > 0)."""

    def __init__(self, limit: int, *, wait_seconds: float = WAIT_SECONDS) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self._script = redisstore.client().register_script(_TAKE)

    def _take(self, slot: str) -> bool:
        try:
            taken = self._script(keys=[keys.SMTP_SLOTS_KEY], args=[slot, self.limit, LEASE_SECONDS])
        except redis.RedisError:
            logger.warning("connection budget not checked: Redis unavailable")
            return True
        return bool(taken)

    def acquire(self, slot: str) -> bool:
        """Take a slot for a new connection, waiting up to ``wait_seconds`` for one."""
        deadline = time.monotonic() + self.wait_seconds
        while not self._take(slot):
            if time.monotonic() >= deadline:
                return False
            time.sleep(random.uniform(0.02, 0.08))
        return True

    def renew(self, slot: str) -> None:
        """Extend a held slot's lease (a connection still in use)."""
        self._take(slot)

    def release(self, slot: str) -> None:
        try:
            redisstore.client().zrem(keys.SMTP_SLOTS_KEY, slot)
        except redis.RedisError:
            logger.warning("connection slot not given back: Redis unavailable (it expires)")

    @staticmethod
    def in_use() -> int:
        """Slots held now (leases not yet expired), for metrics and the dashboard."""
        client = redisstore.client()
        now = client.time()
        return int(client.zcount(keys.SMTP_SLOTS_KEY, now[0] + now[1] / 1e6, "+inf"))


_shared: dict[int, ConnectionBudget] = {}


def shared() -> ConnectionBudget | None:
    """The budget of MAILROOM_SMTP_MAX_CONNECTIONS (None when it is 0: no cap)."""
    from django.conf import settings

    limit = settings.MAILROOM_SMTP_MAX_CONNECTIONS
    if limit <= 0:
        return None
    if limit not in _shared:
        _shared[limit] = ConnectionBudget(limit)
    return _shared[limit]
