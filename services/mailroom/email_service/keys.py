"""Every Redis key Mailroom uses, built in one place, and the latency histogram's buckets.

The bottom layer: it imports nothing of Mailroom. Workers write these keys and the web
role reads them (metrics, the dashboard, the sweeper), on any number of hosts, so their
names are a contract; a writer and a reader that each built a name would drift.

Redis is never the only copy of anything that matters: counters are operational
figures, switches are mirrors of Postgres, dispatch tokens only tell the sweeper which
queued rows still have a task in flight.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------
# The classic keys of the original design, kept so its users find what they know
# --------------------------------------------------------------------------------------

SENT_TOTAL = "email_sent_total"
FAILED_TOTAL = "email_failed_total"
RETRY_COUNTS = "email_retry_counts"  # a hash: address -> retries so far
BULK_PAUSE = "bulk_email_pause"  # the mirror of the durable bulk switch

# The queues (email_service.models.Queue values); each is also its Celery list's key.
QUEUES: tuple[str, ...] = ("high_priority", "bulk")

# --------------------------------------------------------------------------------------
# Delivery counters (workers write, /metrics and the dashboard read)
# --------------------------------------------------------------------------------------

# Delivery latency (accepted by Mailroom -> accepted by the SMTP relay), in seconds.
# Transactional mail targets p99 < 0.5 s, so the buckets are dense below a second
# (0.05 .. 1.0) to tell a healthy relay from a slow one; retries move latency into
# minutes and hours (backoff up to MAILROOM_RETRY_MAX_SECONDS, 1 h by default, and
# campaigns paced by the rate limiter), hence the long tail up to an hour.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
INF = "+Inf"


def counter_key(outcome: str, queue: str) -> str:
    """``mailroom:<outcome>_total:<queue>``, e.g. ``mailroom:sent_total:bulk``."""
    return f"mailroom:{outcome}_total:{queue}"


def retried_key(queue: str, reply_class: str) -> str:
    """``mailroom:retried_total:<queue>:<reply_class>`` (4xx, 5xx, network)."""
    return f"mailroom:retried_total:{queue}:{reply_class}"


def connections_key(queue: str) -> str:
    """``mailroom:smtp_connections_total:<queue>``."""
    return f"mailroom:smtp_connections_total:{queue}"


def latency_key(queue: str) -> str:
    """``mailroom:latency:<queue>``: a hash of per-bucket (non-cumulative) counts."""
    return f"mailroom:latency:{queue}"


def latency_field(bound: float) -> str:
    """The hash field of a bucket: ``str(bound)`` ("0.05", "1.0", "3600.0")."""
    return str(bound)


def latency_bucket(seconds: float) -> str:
    """The hash field of the bucket an observation falls in (``+Inf`` past the last)."""
    return next((latency_field(b) for b in LATENCY_BUCKETS if seconds <= b), INF)


# Time-bucketed counters for live rates and charts: 10 s buckets kept for an hour.
SERIES_BUCKET_SECONDS = 10
SERIES_TTL_SECONDS = 3600


def series_key(name: str, bucket: int) -> str:
    """``mailroom:series:<name>:<bucket>``; names are ``<outcome>:<queue>`` and
    ``campaign:<id>:<outcome>``."""
    return f"mailroom:series:{name}:{bucket}"


def bucket_of(now: float) -> int:
    return int(now // SERIES_BUCKET_SECONDS)


# --------------------------------------------------------------------------------------
# Dispatch and the switches workers check before every message
# --------------------------------------------------------------------------------------


def dispatch_key(token: str) -> str:
    """A task in flight for the rows carrying ``token`` (the sweeper checks it)."""
    return f"mailroom:dispatch:{token}"


def campaign_state_key(campaign_id: object) -> str:
    """The mirror of a campaign's status."""
    return f"mailroom:campaign:{campaign_id}:state"


# --------------------------------------------------------------------------------------
# Workers, the rate limiter, the API and the login throttle
# --------------------------------------------------------------------------------------

WORKER_PATTERN = "mailroom:worker:*"


def worker_key(pool: str, hostname: str) -> str:
    """A live worker's heartbeat (expires when it stops refreshing)."""
    return f"mailroom:worker:{pool}:{hostname}"


# Why the relay cannot be used as configured (TLS verification, login), set by the
# worker that saw it, for /readyz and the dashboard; it expires once no worker sees it.
SMTP_RELAY_ERROR_KEY = "mailroom:smtp:relay_error"
# The connection budget's slots: a sorted set, member = one connection, score = its
# lease's expiry (Redis server time).
SMTP_SLOTS_KEY = "mailroom:smtp:slots"

RATELIMIT_PREFIX = "mailroom:ratelimit:"
RATE_LIMITS_KEY = f"{RATELIMIT_PREFIX}limits"
THROTTLE_KEY = f"{RATELIMIT_PREFIX}throttle"
WAITS_KEY = f"{RATELIMIT_PREFIX}waits_total"
THROTTLES_KEY = f"{RATELIMIT_PREFIX}throttles_total"


def rate_bucket_key(kind: str, period: str) -> str:
    """A token bucket: ``kind`` is ``all`` or ``bulk``, ``period`` second/hour/day."""
    return f"{RATELIMIT_PREFIX}{kind}:{period}"


def api_rate_key(prefix: str, window: int) -> str:
    """Requests of one API key (by its visible prefix) in one minute."""
    return f"mailroom:apikey:rate:{prefix}:{window}"


def api_failures_key(hashed_address: str, window: int) -> str:
    """Failed authentications from one client address (hashed) in one minute."""
    return f"mailroom:apikey:failures:{hashed_address}:{window}"


def login_failures_key(digest: str) -> str:
    """Failed sign-ins of one (username, address) pair (hashed)."""
    return f"mailroom:login_failures:{digest}"
