"""Django settings for Mailroom: read from the environment only.

Every knob is documented in docs/configuration.md. A bad value stops the
process at start with ``ImproperlyConfigured`` naming the variable.
"""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from messaging_platform.env import (
    env_bool,
    env_float,
    env_int,
    env_list,
    env_secret,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_secret("SECRET_KEY", "insecure-dev-only-key" if DEBUG else None)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1"] if DEBUG else [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "email_service",
    "django_prometheus",
    "ninja",
    # The project's own system checks of these settings (messaging_platform/checks.py).
    "messaging_platform",
]

MIDDLEWARE = [
    # django-prometheus: Before first, After last (its documentation), to time everything.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Mailroom serves its own static files (the dashboard works on an air-gapped network).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "email_service.middleware.AdminQueryGuard",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "messaging_platform.urls"
WSGI_APPLICATION = "messaging_platform.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, object]:
    url = env_str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/mailroom")
    try:
        config = dj_database_url.parse(url, conn_max_age=env_int("DB_CONN_MAX_AGE", 60))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from exc
    if config.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_URL must point at PostgreSQL (postgres://...)")
    config["CONN_HEALTH_CHECKS"] = True
    return dict(config)


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Files are found in the apps too, so `make dev` and the tests need no collectstatic; the
# image runs collectstatic at build and serves the compressed copies.
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# --- Redis: the broker, the counters and the pause switch -------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

# --- Metrics ----------------------------------------------------------------------------
# GET /metrics (email_service.metrics_views). With a token set, scrapes must send
# "Authorization: Bearer <token>"; empty (the default) leaves it open: then bind the web
# role to an internal network only, or block /metrics at the proxy.
MAILROOM_METRICS_TOKEN = env_secret("MAILROOM_METRICS_TOKEN", "")
# PROMETHEUS_MULTIPROC_DIR (read by prometheus_client from the environment, before any
# import of it) switches the web role's process metrics to multiprocess mode, for
# gunicorn's several workers; deploy/gunicorn.conf.py sets and wipes it at start.
_multiproc_dir = env_str("PROMETHEUS_MULTIPROC_DIR", "")
if _multiproc_dir and not Path(_multiproc_dir).is_dir():
    raise ImproperlyConfigured(
        f"PROMETHEUS_MULTIPROC_DIR must be an existing directory, got {_multiproc_dir!r}"
    )
# --- end Metrics ------------------------------------------------------------------------

# --- SMTP (Django's names) ------------------------------------------------------------
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("EMAIL_USE_TLS and EMAIL_USE_SSL are mutually exclusive")
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_secret("EMAIL_HOST_PASSWORD", "")
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", 10.0, minimum=0.1)
# The relay's certificate is verified (chain and host name) on STARTTLS and implicit TLS:
# against these CAs when set (a PEM bundle), else the system's. A client certificate for
# relays that ask for one. The opt-out is for a local self-signed relay only.
MAILROOM_SMTP_CA_FILE = env_str("MAILROOM_SMTP_CA_FILE", "")
MAILROOM_SMTP_CLIENT_CERT_FILE = env_str("MAILROOM_SMTP_CLIENT_CERT_FILE", "")
MAILROOM_SMTP_CLIENT_KEY_FILE = env_str("MAILROOM_SMTP_CLIENT_KEY_FILE", "")
MAILROOM_SMTP_TLS_INSECURE_SKIP_VERIFY = env_bool("MAILROOM_SMTP_TLS_INSECURE_SKIP_VERIFY", False)
# RFC 2920: MAIL, RCPT and DATA in one flight when the relay offers it.
MAILROOM_SMTP_PIPELINING = env_bool("MAILROOM_SMTP_PIPELINING", True)
# SMTP conversations one worker process keeps in flight at once (delivery lanes), and
# at most as many warm sessions kept between tasks, each closed after this idle time.
MAILROOM_SMTP_CONNECTIONS_PER_PROCESS = env_int(
    "MAILROOM_SMTP_CONNECTIONS_PER_PROCESS", 8, minimum=1
)
MAILROOM_SMTP_IDLE_SECONDS = env_float("MAILROOM_SMTP_IDLE_SECONDS", 30.0, minimum=0.0)
# The most connections open to the relay at once across the whole fleet (every worker on
# every host; slots leased in Redis, so a dead worker's come back). 0: no fleet cap.
MAILROOM_SMTP_MAX_CONNECTIONS = env_int("MAILROOM_SMTP_MAX_CONNECTIONS", 0, minimum=0)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Mailroom <noreply@mailroom.example.com>")
# Domains (example.com) and addresses (billing@example.com) that may appear as a sender,
# for API keys without their own list and for Python calls, the email backend and the
# commands. Empty (the default): DEFAULT_FROM_EMAIL's domain only. DEFAULT_FROM_EMAIL
# itself is always allowed.
MAILROOM_ALLOWED_SENDERS = env_list("MAILROOM_ALLOWED_SENDERS", [])

# --- Delivery knobs ---------------------------------------------------------------------
MAILROOM_MAX_RETRIES = env_int("MAILROOM_MAX_RETRIES", 5, minimum=0)
MAILROOM_BATCH_SIZE = env_int("MAILROOM_BATCH_SIZE", 50, minimum=1)
MAILROOM_MESSAGES_PER_CONNECTION = env_int("MAILROOM_MESSAGES_PER_CONNECTION", 100, minimum=1)
MAILROOM_RETRY_BASE_SECONDS = env_float("MAILROOM_RETRY_BASE_SECONDS", 10.0, minimum=0.0)
MAILROOM_RETRY_MAX_SECONDS = env_float("MAILROOM_RETRY_MAX_SECONDS", 3600.0, minimum=0.0)
# Retries due sooner than this ride a Celery countdown; later ones wait in Postgres for beat.
MAILROOM_MAX_COUNTDOWN_SECONDS = env_float("MAILROOM_MAX_COUNTDOWN_SECONDS", 300.0, minimum=0.0)
# How long a claimed ("sending") row belongs to its worker before the sweeper takes it back.
MAILROOM_LEASE_SECONDS = env_float("MAILROOM_LEASE_SECONDS", 120.0, minimum=1.0)
MAILROOM_SWEEP_INTERVAL_SECONDS = env_float("MAILROOM_SWEEP_INTERVAL_SECONDS", 30.0, minimum=0.1)
# A queued row whose task has vanished is re-enqueued once it is older than this.
MAILROOM_STALE_QUEUED_SECONDS = env_float("MAILROOM_STALE_QUEUED_SECONDS", 60.0, minimum=0.0)
MAILROOM_MESSAGE_ID_DOMAIN = env_str("MAILROOM_MESSAGE_ID_DOMAIN", "")
# Templates and subjects are caller code (email_service.template_engine): one render may
# take this many steps (a node rendered, a {% for %} iteration) and produce this much.
MAILROOM_TEMPLATE_MAX_STEPS = env_int("MAILROOM_TEMPLATE_MAX_STEPS", 20_000, minimum=100)
MAILROOM_TEMPLATE_MAX_OUTPUT_BYTES = env_int(
    "MAILROOM_TEMPLATE_MAX_OUTPUT_BYTES", 1024 * 1024, minimum=1024
)

# --- Campaigns ------------------------------------------------------------------------
# Public base URL of the web role, for links in email (unsubscribe).
MAILROOM_PUBLIC_URL = env_str("MAILROOM_PUBLIC_URL", "http://localhost:8000").rstrip("/")
# Optional mailto for List-Unsubscribe, e.g. unsubscribe@example.com.
MAILROOM_UNSUBSCRIBE_MAILTO = env_str("MAILROOM_UNSUBSCRIBE_MAILTO", "")
# Bulk batches waiting in the bulk queue; the dispatcher never enqueues beyond this.
MAILROOM_DISPATCH_WINDOW = env_int("MAILROOM_DISPATCH_WINDOW", 40, minimum=1)
MAILROOM_DISPATCH_INTERVAL_SECONDS = env_float(
    "MAILROOM_DISPATCH_INTERVAL_SECONDS", 2.0, minimum=0.1
)
MAILROOM_INGEST_MAX_ERRORS = env_int("MAILROOM_INGEST_MAX_ERRORS", 1000, minimum=1)

# --- HTTP API (email_service.api) ------------------------------------------------------
# Requests per minute per API key unless the key has its own limit; 0 turns it off.
MAILROOM_API_RATE_LIMIT_PER_MINUTE = env_int("MAILROOM_API_RATE_LIMIT_PER_MINUTE", 600, minimum=0)
# Failed authentications (a wrong, malformed or revoked key) allowed per client address
# a minute; then every request from that address answers 429 until the minute is over.
MAILROOM_API_AUTH_FAILURES_PER_MINUTE = env_int(
    "MAILROOM_API_AUTH_FAILURES_PER_MINUTE", 30, minimum=1
)
# A JSON body larger than this is refused with 413 before it is read.
MAILROOM_API_MAX_BODY_BYTES = env_int("MAILROOM_API_MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1024)
# A CSV upload larger than this is refused with 413 (it is streamed to disk, not memory).
MAILROOM_API_MAX_UPLOAD_BYTES = env_int(
    "MAILROOM_API_MAX_UPLOAD_BYTES", 200 * 1024 * 1024, minimum=1024
)
# Django reads at most this much of a non-file body into memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = MAILROOM_API_MAX_BODY_BYTES
# Seconds a web request may run before gunicorn kills its worker (deploy/gunicorn.conf.py
# reads the same variable). Adding recipients through the API gives up after
# MAILROOM_API_INGEST_SECONDS (default: 80 % of it) with a 413 naming the field, having
# stored nothing, instead of a worker killed mid-request.
MAILROOM_WEB_TIMEOUT = env_int("MAILROOM_WEB_TIMEOUT", 300, minimum=10)
MAILROOM_API_INGEST_SECONDS = env_float(
    "MAILROOM_API_INGEST_SECONDS", 0.8 * MAILROOM_WEB_TIMEOUT, minimum=0.1
)
if MAILROOM_API_INGEST_SECONDS >= MAILROOM_WEB_TIMEOUT:
    raise ImproperlyConfigured(
        f"MAILROOM_API_INGEST_SECONDS ({MAILROOM_API_INGEST_SECONDS:g}) must be below "
        f"MAILROOM_WEB_TIMEOUT ({MAILROOM_WEB_TIMEOUT})"
    )
NINJA_PAGINATION_MAX_LIMIT = 500
# Attachments of mail sent through email_service.backends.QueuedEmailBackend, per email;
# they are stored with every recipient's row, so keep this modest.
MAILROOM_MAX_ATTACHMENT_BYTES = env_int(
    "MAILROOM_MAX_ATTACHMENT_BYTES", 10 * 1024 * 1024, minimum=0
)


# --- Dashboard (email_service.dashboard) and its login -----------------------------------
# Links shown in the dashboard's header; empty hides a link. Each is opened by the
# operator's browser, so give the address they reach it at (not a cluster-internal one).
def _link(name: str) -> str:
    url = env_str(name, "")
    if url and not url.startswith(("http://", "https://")):
        raise ImproperlyConfigured(f"{name} must be an http(s) URL or empty, got {url!r}")
    return url


MAILROOM_FLOWER_URL = _link("MAILROOM_FLOWER_URL")
MAILROOM_GRAFANA_URL = _link("MAILROOM_GRAFANA_URL")
MAILROOM_MAILPIT_URL = _link("MAILROOM_MAILPIT_URL")
# Seconds between two refreshes of the open dashboard (none while its tab is hidden).
MAILROOM_DASHBOARD_POLL_SECONDS = env_float("MAILROOM_DASHBOARD_POLL_SECONDS", 2.0, minimum=0.5)
# Failed sign-ins allowed per username and client address within the window (counted in
# Redis from the first failure); then every sign-in of that pair is refused, the
# dashboard's login with a 429, until the window has passed. The check is in the
# authentication backend (Django's ModelBackend plus the throttle), so the admin's login
# form is throttled the same way.
MAILROOM_LOGIN_MAX_FAILURES = env_int("MAILROOM_LOGIN_MAX_FAILURES", 5, minimum=1)
MAILROOM_LOGIN_WINDOW_SECONDS = env_int("MAILROOM_LOGIN_WINDOW_SECONDS", 900, minimum=1)
AUTHENTICATION_BACKENDS = ["email_service.dashboard.access.ThrottledModelBackend"]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/dashboard/"
LOGOUT_REDIRECT_URL = "/login/"

# --- HTTPS: secure cookies, redirect to https, HSTS, the proxy's X-Forwarded-Proto ------
# Off by default, DEBUG or not: `make dev`, the tests and `docker compose up` serve plain
# http on localhost, where a secure-only cookie never comes back (no sign-in, no CSRF
# token) and a redirect to https reaches nothing. Behind TLS turn them all on, as
# k8s/overlays/prod does; `manage.py check --deploy` then has nothing to say about them.
# The session (dashboard sign-in) and CSRF cookies are sent over https only.
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
# http:// requests are redirected to https://, except those that reach the pod itself over
# plain http: the probes (the kubelet's, the image's health check) and Prometheus' scrape.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# Strict-Transport-Security on https answers for this many seconds (0: none). Browsers
# then refuse http for the host that long, so start small (3600) and raise it (31536000)
# once https works everywhere. Preload only on purpose: leaving the list takes months.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Behind a proxy that terminates TLS (an Ingress, a load balancer) every request arrives
# over http: with this on, "X-Forwarded-Proto: https" marks one that came over https (for
# the redirect, secure cookies and the CSRF origin check). Only behind a proxy that sets
# the header on every request, replacing the client's: otherwise a client can claim https.
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https")
    if env_bool("MAILROOM_TRUST_X_FORWARDED_PROTO", False)
    else None
)
# Origins (scheme://host[:port]) whose forms may POST besides the host's own, e.g. the
# public name when the proxy forwards another Host. Comma-separated.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
for _origin in CSRF_TRUSTED_ORIGINS:
    if not _origin.startswith(("http://", "https://")):
        raise ImproperlyConfigured(
            f"CSRF_TRUSTED_ORIGINS must be origins such as https://mail.example.com, "
            f"got {_origin!r}"
        )
# X-Content-Type-Options: nosniff on every answer.
SECURE_CONTENT_TYPE_NOSNIFF = env_bool("SECURE_CONTENT_TYPE_NOSNIFF", True)

# --- Global rate limit (token buckets in Redis, shared by every worker) ------------------
# Total sends the relay allows; 0 means no limit. Bulk gets what transactional does not
# reserve; transactional mail is never held back.
MAILROOM_RATE_LIMIT_PER_SECOND = env_float("MAILROOM_RATE_LIMIT_PER_SECOND", 0.0, minimum=0.0)
MAILROOM_RATE_LIMIT_PER_HOUR = env_int("MAILROOM_RATE_LIMIT_PER_HOUR", 0, minimum=0)
MAILROOM_RATE_LIMIT_PER_DAY = env_int("MAILROOM_RATE_LIMIT_PER_DAY", 0, minimum=0)
MAILROOM_RATE_RESERVED_TRANSACTIONAL = env_float(
    "MAILROOM_RATE_RESERVED_TRANSACTIONAL", 0.1, minimum=0.0
)
if MAILROOM_RATE_RESERVED_TRANSACTIONAL >= 1:
    raise ImproperlyConfigured(
        "MAILROOM_RATE_RESERVED_TRANSACTIONAL is a share of the limit and must be below 1, "
        f"got {MAILROOM_RATE_RESERVED_TRANSACTIONAL}"
    )
# After a throttling reply (421/450/451/452/454) the bulk rate is lowered for this long.
MAILROOM_THROTTLE_COOLDOWN_SECONDS = env_float(
    "MAILROOM_THROTTLE_COOLDOWN_SECONDS", 60.0, minimum=0.1
)
# A bulk batch waits at most this long for a token before handing its rest back.
MAILROOM_RATE_MAX_WAIT_SECONDS = env_float("MAILROOM_RATE_MAX_WAIT_SECONDS", 0.25, minimum=0.0)

# --- DKIM (optional: all three set to sign) -----------------------------------------------
MAILROOM_DKIM_DOMAIN = env_str("MAILROOM_DKIM_DOMAIN", "")
MAILROOM_DKIM_SELECTOR = env_str("MAILROOM_DKIM_SELECTOR", "")
MAILROOM_DKIM_PRIVATE_KEY = env_secret("MAILROOM_DKIM_PRIVATE_KEY", "")

# --- Celery -----------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 300, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 360, minimum=1)
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=1)

if not (
    EMAIL_TIMEOUT < CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT < CELERY_VISIBILITY_TIMEOUT
):
    raise ImproperlyConfigured(
        "need EMAIL_TIMEOUT < CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT"
        " < CELERY_VISIBILITY_TIMEOUT, got "
        f"{EMAIL_TIMEOUT} < {CELERY_TASK_SOFT_TIME_LIMIT} < {CELERY_TASK_TIME_LIMIT}"
        f" < {CELERY_VISIBILITY_TIMEOUT}"
    )
if MAILROOM_LEASE_SECONDS <= EMAIL_TIMEOUT * 3:
    raise ImproperlyConfigured(
        "MAILROOM_LEASE_SECONDS must exceed three SMTP timeouts (3 x EMAIL_TIMEOUT), "
        f"got {MAILROOM_LEASE_SECONDS} <= 3 x {EMAIL_TIMEOUT}"
    )

# Tasks carry message ids; the truth is in Postgres, so results are never stored.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Routing by task name: transactional and bulk never share a queue or a worker pool.
CELERY_TASK_DEFAULT_QUEUE = "high_priority"
CELERY_TASK_ROUTES = {
    "email_service.deliver_bulk": {"queue": "bulk"},
    "email_service.send_bulk_email_batch": {"queue": "bulk"},
    "email_service.*": {"queue": "high_priority"},
}
# Late acks are safe only because every send first claims its row: a redelivered task
# finds the row claimed or sent and does nothing. A task whose worker died is requeued;
# the row's attempts cap stops a message that kills workers from looping forever.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE = {
    "dispatch-campaigns": {
        "task": "email_service.dispatch_campaigns",
        "schedule": MAILROOM_DISPATCH_INTERVAL_SECONDS,
        "options": {"expires": MAILROOM_DISPATCH_INTERVAL_SECONDS},
    },
    "sweep-outbox": {
        "task": "email_service.sweep",
        "schedule": MAILROOM_SWEEP_INTERVAL_SECONDS,
        "options": {"expires": MAILROOM_SWEEP_INTERVAL_SECONDS},
    },
}
