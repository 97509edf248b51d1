"""``GET /metrics``: Mailroom's own metrics plus the process's (django-prometheus).

One exposition in the Prometheus text format 0.0.4: first the web process's registry
(django-prometheus' request/DB metrics, and the default process collectors), then
Mailroom's collector (:mod:`email_service.metrics`), which reads Redis and Postgres.

Under gunicorn with several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set (see
``deploy/gunicorn.conf.py``) and the process metrics are aggregated over every worker
from the files there, so any worker answering a scrape gives the whole picture.
Mailroom's own figures need no such thing: they live in Redis and Postgres.

Authentication: when ``MAILROOM_METRICS_TOKEN`` is set, a scrape needs
``Authorization: Bearer <token>``; otherwise the endpoint is open and must only be
reachable from the internal network.
"""

from __future__ import annotations

import hmac
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from email_service.metrics import build_registry


def authorized(request: HttpRequest, token: str) -> bool:
    """True when no token is configured, or the request carries it as a Bearer token."""
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def process_registry() -> CollectorRegistry:
    """This process's metrics, or every gunicorn worker's in multiprocess mode."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus scrape endpoint."""
    if not authorized(request, settings.MAILROOM_METRICS_TOKEN):
        response = HttpResponse("unauthorized\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body = generate_latest(process_registry()) + generate_latest(build_registry())
    return HttpResponse(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)
