"""Django system checks of Mailroom's settings: ``manage.py check``, and every role at start.

settings.py refuses at import what one variable gets wrong on its own (a port that is not
a number, a boolean that is neither). What needs the app or several variables together is
checked here, by the rules the code that uses them applies: a DEFAULT_FROM_EMAIL that
every send would refuse (a special-use domain such as ``mailroom.test``) stops the start
instead of failing each send with a 422 about a field the client never sent.

Errors (``mailroom.E...``) are what cannot work; warnings (``mailroom.W...``) what is
suspicious. Each message names the variable and says why, with a hint.

Who runs them: ``manage.py check`` and every management command (``migrate`` included);
the web role when its WSGI application loads (messaging_platform/wsgi.py); the workers
and beat as they start (messaging_platform/celery.py, ``worker_init`` and ``beat_init``).
:func:`enforce` is that start: warnings are printed, an error stops the process.
"""

from __future__ import annotations

import ipaddress
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

TAG = "mailroom"

# SMTP ports with a fixed meaning: implicit TLS (SMTPS) and submission with STARTTLS.
SMTPS_PORT = 465
STARTTLS_PORTS = (25, 587)
LOCAL_HOSTS = ("localhost", "localhost.localdomain")


def _error(id_: int, msg: str, hint: str) -> checks.Error:
    return checks.Error(msg, hint=hint, id=f"mailroom.E{id_:03d}")


def _warning(id_: int, msg: str, hint: str) -> checks.Warning:
    return checks.Warning(msg, hint=hint, id=f"mailroom.W{id_:03d}")


def _is_local(host: str) -> bool:
    """A name or address of this machine (the dev inbox, a sidecar relay)."""
    host = host.strip("[]").lower()
    if host in LOCAL_HOSTS or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------
# Senders: the rule of the send path
# --------------------------------------------------------------------------------------


@checks.register(TAG)
def check_senders(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    from email_service.exceptions import InvalidEmailRequest
    from email_service.services.administration import sender_entry
    from email_service.validation import normalize_address, normalize_from, sender_domain

    found: list[checks.CheckMessage] = []
    default_from = settings.DEFAULT_FROM_EMAIL
    try:
        normalize_from(default_from, "DEFAULT_FROM_EMAIL")
    except InvalidEmailRequest as exc:
        found.append(
            _error(
                1,
                f"DEFAULT_FROM_EMAIL={default_from!r} cannot be sent from: {exc.message}",
                "Every email without its own sender uses it, and every send would be refused "
                "(422 naming from_email). Use one mailbox on a real domain you send from, "
                "e.g. 'Mailroom <noreply@example.com>'; special-use domains (.test, .local, "
                ".invalid, localhost, ...) are refused.",
            )
        )
    for entry in getattr(settings, "MAILROOM_ALLOWED_SENDERS", []):
        try:
            sender_entry(entry)
        except InvalidEmailRequest as exc:
            found.append(
                _error(
                    2,
                    f"MAILROOM_ALLOWED_SENDERS: the entry {entry!r} is not a sendable domain "
                    f"or address: {exc.message}",
                    "Comma-separated domains (example.com) or addresses "
                    "(billing@example.com), by the rule every send applies.",
                )
            )
    mailto = getattr(settings, "MAILROOM_UNSUBSCRIBE_MAILTO", "")
    if mailto:
        try:
            normalize_address(mailto, "MAILROOM_UNSUBSCRIBE_MAILTO")
        except InvalidEmailRequest as exc:
            found.append(
                _error(
                    3,
                    f"MAILROOM_UNSUBSCRIBE_MAILTO={mailto!r} is not a valid address: {exc.message}",
                    "A bare address such as unsubscribe@example.com (no 'mailto:', no name), "
                    "or empty for no mailto alternative in List-Unsubscribe.",
                )
            )
    message_id_domain = getattr(settings, "MAILROOM_MESSAGE_ID_DOMAIN", "")
    if message_id_domain:
        try:
            if "@" in message_id_domain:
                raise InvalidEmailRequest("MAILROOM_MESSAGE_ID_DOMAIN", "an address, not a domain")
            sender_entry(message_id_domain)
        except InvalidEmailRequest as exc:
            found.append(
                _error(
                    4,
                    f"MAILROOM_MESSAGE_ID_DOMAIN={message_id_domain!r} is not a domain: "
                    f"{exc.message}",
                    "A domain you own, e.g. mail.example.com, or empty to use the sender's.",
                )
            )
    found += _check_dkim(default_from, sender_domain)
    return found


def _check_dkim(
    default_from: str, sender_domain: Callable[[str], str]
) -> list[checks.CheckMessage]:
    """The key is parsed here, once, as the first send would: a bad key stops the start
    instead of failing every delivery task."""
    from email_service import dkim_signing

    try:
        signing = dkim_signing.is_configured()
    except ImproperlyConfigured as exc:
        return [
            _error(
                5,
                f"DKIM cannot sign: {exc}",
                "Set MAILROOM_DKIM_DOMAIN, MAILROOM_DKIM_SELECTOR and MAILROOM_DKIM_PRIVATE_KEY "
                "(or MAILROOM_DKIM_PRIVATE_KEY_FILE) together, or none of them.",
            )
        ]
    if not signing:
        return []
    domain = settings.MAILROOM_DKIM_DOMAIN.lower().rstrip(".")
    sender = sender_domain(default_from)
    if sender and not (
        sender == domain or sender.endswith(f".{domain}") or domain.endswith(f".{sender}")
    ):
        return [
            _warning(
                6,
                f"MAILROOM_DKIM_DOMAIN={domain!r} is not aligned with DEFAULT_FROM_EMAIL's "
                f"domain {sender!r}",
                "DMARC passes on DKIM only when the signing domain and the From domain share "
                "their organisational domain: sign with the sender's domain.",
            )
        ]
    return []


# --------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------


def _url_problem(url: str) -> str:
    """Why ``url`` is not an absolute http(s) URL of a host, or ''."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        return f"it does not parse ({exc})"
    if parts.scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    if parts.username is not None or parts.password is not None:
        return "it must not carry a user or password"
    if parts.query or parts.fragment:
        return "it must not have a query (?...) or a fragment (#...)"
    return ""


@checks.register(TAG)
def check_urls(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    public = settings.MAILROOM_PUBLIC_URL
    problem = _url_problem(public)
    if problem:
        found.append(
            _error(
                10,
                f"MAILROOM_PUBLIC_URL={public!r} is not usable: {problem}",
                "The web role's address as a recipient's browser reaches it, e.g. "
                "https://mail.example.com: every unsubscribe link in bulk mail starts with it.",
            )
        )
    else:
        found += _check_unsubscribe_links()
        host = urlsplit(public).hostname or ""
        if urlsplit(public).scheme == "http" and not _is_local(host):
            found.append(
                _warning(
                    11,
                    f"MAILROOM_PUBLIC_URL={public!r} is plain http",
                    "One-click unsubscribe (RFC 8058) needs an https URL in "
                    "List-Unsubscribe, and mailbox providers ignore an http one: serve the web "
                    "role behind TLS and give its https address.",
                )
            )
    for name in ("MAILROOM_FLOWER_URL", "MAILROOM_GRAFANA_URL", "MAILROOM_MAILPIT_URL"):
        link = getattr(settings, name, "")
        problem = _url_problem(link) if link else ""
        if problem:
            found.append(
                _error(
                    13,
                    f"{name}={link!r} is not a usable link: {problem}",
                    "The address an operator's browser opens, e.g. https://flower.example.com, "
                    "or empty to hide the dashboard's link.",
                )
            )
    for origin in getattr(settings, "CSRF_TRUSTED_ORIGINS", []):
        problem = _url_problem(origin)
        if problem or urlsplit(origin).path not in ("", "/"):
            found.append(
                _error(
                    14,
                    f"CSRF_TRUSTED_ORIGINS: {origin!r} is not an origin: "
                    f"{problem or 'it must not have a path'}",
                    "scheme://host[:port], e.g. https://mail.example.com; comma-separated.",
                )
            )
    redis_url = settings.REDIS_URL
    scheme = urlsplit(redis_url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        found.append(
            _error(
                15,
                f"REDIS_URL={redis_url!r} is not a Redis URL",
                "redis://host:6379/0, rediss://... (TLS) or unix:///path/to/socket.",
            )
        )
    return found


def _check_unsubscribe_links() -> list[checks.CheckMessage]:
    """The List-Unsubscribe header is built once, as a bulk send builds it."""
    from email_service import unsubscribe

    try:
        unsubscribe.unsubscribe_links("check@example.com")
    except ImproperlyConfigured as exc:
        return [
            _error(
                12,
                f"List-Unsubscribe cannot be built: {exc}",
                "Shorten MAILROOM_PUBLIC_URL or MAILROOM_UNSUBSCRIBE_MAILTO, and keep them "
                "to plain ASCII URL characters.",
            )
        ]
    return []


# --------------------------------------------------------------------------------------
# SMTP: ports, TLS and credentials
# --------------------------------------------------------------------------------------


@checks.register(TAG)
def check_smtp(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    port = settings.EMAIL_PORT
    if port > 65535:
        found.append(
            _error(20, f"EMAIL_PORT={port} is not a TCP port", "1 to 65535: 587, 465 or 25.")
        )
    if settings.EMAIL_USE_SSL and port in STARTTLS_PORTS:
        found.append(
            _warning(
                21,
                f"EMAIL_USE_SSL is on with EMAIL_PORT={port}, a port that speaks plain SMTP "
                "first (STARTTLS)",
                f"Implicit TLS is port {SMTPS_PORT}: use EMAIL_PORT={SMTPS_PORT}, or "
                "EMAIL_USE_TLS=true (STARTTLS) instead of EMAIL_USE_SSL on this port.",
            )
        )
    if settings.EMAIL_USE_TLS and port == SMTPS_PORT:
        found.append(
            _warning(
                22,
                f"EMAIL_USE_TLS (STARTTLS) is on with EMAIL_PORT={SMTPS_PORT}, the implicit "
                "TLS port",
                f"Port {SMTPS_PORT} expects TLS from the first byte: use EMAIL_USE_SSL=true "
                "there, or EMAIL_USE_TLS with port 587.",
            )
        )
    user, password = settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD
    if user and not password:
        found.append(
            _error(
                23,
                "EMAIL_HOST_USER is set but EMAIL_HOST_PASSWORD is empty",
                "Every connection logs in as EMAIL_HOST_USER, so with no password every "
                "login fails: set EMAIL_HOST_PASSWORD (or EMAIL_HOST_PASSWORD_FILE), or unset "
                "EMAIL_HOST_USER for a relay without AUTH.",
            )
        )
    if password and not user:
        found.append(
            _warning(
                24,
                "EMAIL_HOST_PASSWORD is set but EMAIL_HOST_USER is empty: the password is "
                "never used",
                "Set EMAIL_HOST_USER to log in, or drop the password.",
            )
        )
    tls = settings.EMAIL_USE_TLS or settings.EMAIL_USE_SSL
    if user and password and not tls and not _is_local(settings.EMAIL_HOST):
        found.append(
            _warning(
                25,
                f"EMAIL_HOST_PASSWORD would cross the network in clear to "
                f"{settings.EMAIL_HOST}: neither EMAIL_USE_TLS nor EMAIL_USE_SSL is on",
                "Turn on EMAIL_USE_TLS (port 587) or EMAIL_USE_SSL (port 465).",
            )
        )
    return found + _check_smtp_tls() + _check_smtp_connections()


def _check_smtp_tls() -> list[checks.CheckMessage]:
    """The TLS files load as the transport will load them (smtp.TLSOptions)."""
    from email_service.smtp import tls_options_from_settings

    found: list[checks.CheckMessage] = []
    options = tls_options_from_settings()
    if options.client_key_file and not options.client_cert_file:
        found.append(
            _error(
                26,
                "MAILROOM_SMTP_CLIENT_KEY_FILE is set without MAILROOM_SMTP_CLIENT_CERT_FILE",
                "Give the certificate too (PEM), or drop the key.",
            )
        )
        return found
    try:
        options.context()
    except (OSError, ssl.SSLError) as exc:
        found.append(
            _error(
                27,
                "the SMTP TLS files do not load (MAILROOM_SMTP_CA_FILE="
                f"{options.ca_file!r}, MAILROOM_SMTP_CLIENT_CERT_FILE="
                f"{options.client_cert_file!r}): {exc}",
                "Each must be a readable PEM file: the CA bundle that signed the relay's "
                "certificate; the client certificate and its key.",
            )
        )
    if options.insecure_skip_verify and not _is_local(settings.EMAIL_HOST):
        found.append(
            _warning(
                28,
                "MAILROOM_SMTP_TLS_INSECURE_SKIP_VERIFY is on for the relay "
                f"{settings.EMAIL_HOST}: anyone on the path can read and change every message",
                "Give the relay's CA in MAILROOM_SMTP_CA_FILE instead; the opt-out is for a "
                "local self-signed relay.",
            )
        )
    return found


def _check_smtp_connections() -> list[checks.CheckMessage]:
    from email_service.smtp_budget import LEASE_SECONDS

    found: list[checks.CheckMessage] = []
    budget = settings.MAILROOM_SMTP_MAX_CONNECTIONS
    if budget and settings.MAILROOM_SMTP_IDLE_SECONDS >= LEASE_SECONDS:
        found.append(
            _error(
                29,
                f"MAILROOM_SMTP_IDLE_SECONDS ({settings.MAILROOM_SMTP_IDLE_SECONDS:g}) must be "
                f"below the connection slots' lease ({LEASE_SECONDS:g} s) when "
                "MAILROOM_SMTP_MAX_CONNECTIONS is set",
                "An idle session would outlive its slot, and the fleet could open more "
                "connections than the budget.",
            )
        )
    per_process = settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS
    if budget and per_process > budget:
        found.append(
            _warning(
                19,
                f"MAILROOM_SMTP_CONNECTIONS_PER_PROCESS ({per_process}) exceeds "
                f"MAILROOM_SMTP_MAX_CONNECTIONS ({budget}): one process alone can use the "
                "whole budget",
                "Lower MAILROOM_SMTP_CONNECTIONS_PER_PROCESS to a share of the budget.",
            )
        )
    return found


# --------------------------------------------------------------------------------------
# Limits that only make sense together
# --------------------------------------------------------------------------------------


@checks.register(TAG)
def check_limits(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    base = settings.MAILROOM_RETRY_BASE_SECONDS
    ceiling = settings.MAILROOM_RETRY_MAX_SECONDS
    if ceiling < base:
        found.append(
            _warning(
                30,
                f"MAILROOM_RETRY_MAX_SECONDS ({ceiling:g}) is below MAILROOM_RETRY_BASE_SECONDS "
                f"({base:g}): every retry waits the ceiling, with no backoff",
                "The schedule is min(2**n * base, max): keep the ceiling above the base.",
            )
        )
    countdown = settings.MAILROOM_MAX_COUNTDOWN_SECONDS
    visibility = settings.CELERY_VISIBILITY_TIMEOUT
    if countdown >= visibility:
        found.append(
            _warning(
                31,
                f"MAILROOM_MAX_COUNTDOWN_SECONDS ({countdown:g}) is not below "
                f"CELERY_VISIBILITY_TIMEOUT ({visibility})",
                "Redis hands a task that waits longer than the visibility timeout to another "
                "worker as well: keep countdowns short and let longer delays wait in Postgres.",
            )
        )
    if settings.MAILROOM_API_MAX_UPLOAD_BYTES < settings.MAILROOM_API_MAX_BODY_BYTES:
        found.append(
            _warning(
                32,
                f"MAILROOM_API_MAX_UPLOAD_BYTES ({settings.MAILROOM_API_MAX_UPLOAD_BYTES}) is "
                f"below MAILROOM_API_MAX_BODY_BYTES ({settings.MAILROOM_API_MAX_BODY_BYTES})",
                "A CSV upload is refused before a JSON body of the same size would be; raise "
                "the upload limit (the file is streamed to disk, not memory).",
            )
        )
    return found


# --------------------------------------------------------------------------------------
# At start
# --------------------------------------------------------------------------------------


def problems() -> tuple[list[checks.CheckMessage], list[checks.CheckMessage]]:
    """(errors, warnings) of every registered check, silenced ones left out."""
    found = [m for m in checks.run_checks() if not m.is_silenced()]
    errors = [m for m in found if m.is_serious(checks.ERROR)]
    return errors, [m for m in found if not m.is_serious(checks.ERROR)]


def report(role: str, errors: list[checks.CheckMessage]) -> str:
    lines = [f"{role}: the settings do not work (system checks, manage.py check):"]
    lines += [f"  {message}".replace("\n", "\n  ") for message in errors]
    return "\n".join(lines)


def enforce(role: str, stream: TextIO | None = None) -> None:
    """Run the system checks as a role starts: print the warnings on ``stream`` (default
    stderr) and raise ImproperlyConfigured, the error of every bad setting, naming the
    variables."""
    from django.apps import apps

    if not apps.ready:
        # Not again when done: django.setup() configures logging anew each time, and in
        # Celery that would write every later line to the stream Celery has redirected.
        import django

        django.setup()
    errors, warnings = problems()
    for message in warnings:
        print(f"{role}: {message}", file=stream or sys.stderr, flush=True)
    if errors:
        raise ImproperlyConfigured(report(role, errors))
