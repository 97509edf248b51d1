"""Liveness and readiness endpoints for load balancers and Kubernetes probes."""

from __future__ import annotations

import redis
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse

from email_service import redisstore, smtp_health


def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive and serving requests; checks nothing else on purpose."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """A real round trip to Postgres and Redis: can this instance accept email now?"""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        checks["postgres"] = "ok"
    except DatabaseError as exc:
        checks["postgres"] = f"error: {type(exc).__name__}"
    try:
        redisstore.client().ping()
        checks["redis"] = "ok"
    except (redis.RedisError, OSError) as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if ready else "unavailable", **checks}
    if checks["redis"] == "ok" and (error := smtp_health.relay_error()):
        # Shown, not failed: this instance still accepts mail into the outbox, but an
        # operator must fix the relay settings before any of it is delivered.
        body["smtp_relay"] = f"error: {error}"
    return JsonResponse(body, status=200 if ready else 503)
