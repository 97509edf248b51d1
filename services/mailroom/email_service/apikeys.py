"""API keys: generated once, stored as a hash, found by a short visible prefix.

A key reads ``mr_<prefix>_<secret>``: the prefix (8 characters) is stored in clear so the
row can be found and operators can tell keys apart; the whole key is stored only as its
SHA-256. A key has 190 random bits, so a slow password hash would add nothing but latency.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import connections, router
from django.utils import timezone

from email_service import keys, redisstore
from email_service.models import ApiKey

logger = logging.getLogger(__name__)

_ALPHABET = string.ascii_letters + string.digits
PREFIX_LENGTH = 8
SECRET_LENGTH = 32
# last_used_at is written at most this often per key, not on every request.
TOUCH_EVERY_SECONDS = 60


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate() -> tuple[str, str]:
    """A new key and its prefix."""
    prefix = _random(PREFIX_LENGTH)
    return f"mr_{prefix}_{_random(SECRET_LENGTH)}", prefix


def split(key: str) -> str | None:
    """The prefix of a well-formed key, else None."""
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != "mr" or len(parts[1]) != PREFIX_LENGTH:
        return None
    if len(parts[2]) != SECRET_LENGTH:
        return None
    return parts[1]


_LOADED = [
    "id",
    "prefix",
    "key_hash",
    "scopes",
    "rate_limit_per_minute",
    "allowed_senders",
    "last_used_at",
]


def _live_key_sql() -> str:
    meta = ApiKey._meta
    column = {f.name: f.column for f in meta.concrete_fields}
    columns = ", ".join(f'"{column[name]}"' for name in _LOADED if name != "prefix")
    prefix, revoked = column["prefix"], column["revoked_at"]
    # Names from the model's metadata; the prefix is a bound parameter.
    return f'SELECT {columns} FROM "{meta.db_table}" WHERE "{prefix}" = %s AND "{revoked}" IS NULL'  # noqa: S608


# Every API request runs this look-up. One statement on the unique ``prefix`` index,
# through Django's cursor (same connection, transaction and instrumentation), instead of
# the equivalent QuerySet: measured by bench/bypasses.py on the whole in-process API
# request, it takes 17-26 % off each one (e.g. 4.2 ms against 5.7 ms). The contract
# (what the QuerySet would load) is held by tests/email_service/test_bypasses.py.
_LIVE_KEY_SQL = _live_key_sql()


def authenticate(key: str) -> ApiKey | None:
    """The live key this string is, or None (unknown, malformed or revoked).

    Read from the database on every call, never cached: a revoked key is refused at once.
    """
    prefix = split(key)
    if prefix is None:
        return None
    found = _live_key(prefix)
    if found is None or not hmac.compare_digest(found.key_hash, digest(key)):
        return None
    now = timezone.now()
    if (
        found.last_used_at is None
        or (now - found.last_used_at).total_seconds() > TOUCH_EVERY_SECONDS
    ):
        ApiKey.objects.filter(pk=found.pk).update(last_used_at=now)
    return found


def _live_key(prefix: str) -> ApiKey | None:
    """The unrevoked key with this prefix, its ``_LOADED`` fields loaded: what
    ``ApiKey.objects.only(*_LOADED).filter(prefix=prefix, revoked_at=None).first()``
    returns, in one statement of our own (see ``_LIVE_KEY_SQL``)."""
    alias = router.db_for_read(ApiKey)
    with connections[alias].cursor() as cursor:
        cursor.execute(_LIVE_KEY_SQL, [prefix])
        row = cursor.fetchone()
    if row is None:
        return None
    key_id, key_hash, scopes, rate_limit, senders, last_used_at = row
    # from_db, as a QuerySet would: the other columns are deferred (loaded if read),
    # and a save() writes only the loaded ones.
    return ApiKey.from_db(
        alias,
        _LOADED,
        [key_id, prefix, key_hash, _json(scopes), rate_limit, _json(senders), last_used_at],
    )


def _json(value: object) -> object:
    """jsonb arrives as text (Django decodes it in JSONField.from_db_value)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    retry_after: int


def check_rate(api_key: ApiKey) -> RateDecision:
    """Count one request against the key's per-minute limit (a fixed window in Redis,
    shared by every web process). With Redis unreachable the request is allowed: the
    API keeps accepting mail into Postgres while the broker is away."""
    limit = api_key.rate_limit_per_minute or settings.MAILROOM_API_RATE_LIMIT_PER_MINUTE
    if not limit:
        return RateDecision(True, 0, 0, 0)
    return _count_in_minute(lambda window: keys.api_rate_key(api_key.prefix, window), limit)


def count_failure(address: str) -> RateDecision:
    """Count one failed authentication from ``address`` (a fixed one-minute window in
    Redis). Past MAILROOM_API_AUTH_FAILURES_PER_MINUTE the caller answers 429.

    Only failures are counted, so a valid request pays nothing for this; a valid key is
    still served from a throttled address (clients behind one NAT or proxy share it).
    With Redis unreachable the failure is not counted.
    """
    hashed = hashlib.sha256(address.encode()).hexdigest()[:32]
    return _count_in_minute(
        lambda window: keys.api_failures_key(hashed, window),
        settings.MAILROOM_API_AUTH_FAILURES_PER_MINUTE,
    )


def _count_in_minute(key_of: Callable[[int], str], limit: int) -> RateDecision:
    """One more in this minute's counter (``key_of(window)``); allowed while within
    ``limit``, and always when Redis does not answer."""
    window = int(time.time() // 60)
    key = key_of(window)
    try:
        pipe = redisstore.client().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 61)
        used = int(pipe.execute()[0])
    except redis.RedisError:
        logger.warning("%s not counted: Redis unavailable", key.split(":")[2])
        return RateDecision(True, limit, limit, 0)
    retry_after = max(1, 60 - int(time.time() % 60))
    return RateDecision(used <= limit, limit, max(0, limit - used), retry_after)
