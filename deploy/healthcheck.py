"""Health check for every role of the Mailroom image: ``python deploy/healthcheck.py ROLE``.

Used by the image's HEALTHCHECK, by docker-compose.yml and by the Kubernetes exec probes.
It imports nothing but the standard library, so a check costs a few milliseconds of CPU
rather than a Django or Celery start-up. Exit status 0 means healthy; otherwise one line
on stderr says why.

  web [--ready]  GET /healthz (the process serves requests), or /readyz with --ready (a
                 real round trip to Postgres and Redis), on the port of MAILROOM_WEB_BIND.
  worker         The heartbeat file (MAILROOM_WORKER_HEARTBEAT_FILE) was touched within
                 MAILROOM_HEARTBEAT_MAX_AGE seconds (default 60). The worker's main process
                 touches it every 10 s while it can reach Redis, so a worker whose consumer
                 stopped (celery/celery#8082) goes stale; `celery inspect ping` would cost a
                 Celery start-up and a broker round trip and still answer in that case.
  beat           The schedule file (MAILROOM_BEAT_SCHEDULE) was written within
                 MAILROOM_BEAT_MAX_AGE seconds (default 600). Beat writes it when it starts
                 and then about every 3 minutes while it is sending tasks.
  flower         GET /healthcheck on FLOWER_PORT (Flower answers it without basic auth).

The role defaults to MAILROOM_ROLE, then ``web``. The defaults of the file paths match the
start scripts in this directory.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

HEARTBEAT_FILE = "/tmp/mailroom-worker-heartbeat"  # noqa: S108 - per-container /tmp
BEAT_SCHEDULE = "/tmp/celerybeat-schedule"  # noqa: S108 - per-container /tmp
# dbm picks a backend at run time and some add a suffix to the schedule's file name.
SCHEDULE_SUFFIXES = ("", ".db", ".dat", ".dir")
TIMEOUT = 4.0


class Unhealthy(Exception):
    """The role is not healthy; the message says why."""


def _port(bind: str, default: int) -> int:
    """The port of a gunicorn bind address such as ``0.0.0.0:8000`` or ``[::]:8000``."""
    _, sep, port = bind.rpartition(":")
    return int(port) if sep and port.isdigit() else default


def http_ok(port: int, path: str) -> None:
    # Host "localhost": Django checks the Host header against ALLOWED_HOSTS.
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Host": "localhost"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        raise Unhealthy(f"GET {path} on port {port}: {exc}") from None
    if status != 200:
        raise Unhealthy(f"GET {path} on port {port} answered {status}")


def fresh(paths: Sequence[Path], max_age: float, what: str) -> None:
    """At least one of ``paths`` was modified within ``max_age`` seconds."""
    mtimes = [p.stat().st_mtime for p in paths if p.exists()]
    if not mtimes:
        raise Unhealthy(f"no {what} at {paths[0]} yet")
    age = time.time() - max(mtimes)
    if age > max_age:
        raise Unhealthy(f"{what} {paths[0]} is {age:.0f}s old (limit {max_age:g}s)")


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise Unhealthy(f"{name} must be a number of seconds, got {raw!r}") from None


def check_web(args: Sequence[str]) -> None:
    port = _port(os.environ.get("MAILROOM_WEB_BIND", ""), 8000)
    http_ok(port, "/readyz" if "--ready" in args else "/healthz")


def check_worker(args: Sequence[str]) -> None:
    path = Path(os.environ.get("MAILROOM_WORKER_HEARTBEAT_FILE") or HEARTBEAT_FILE)
    fresh([path], _seconds("MAILROOM_HEARTBEAT_MAX_AGE", 60), "worker heartbeat file")


def check_beat(args: Sequence[str]) -> None:
    base = os.environ.get("MAILROOM_BEAT_SCHEDULE") or BEAT_SCHEDULE
    paths = [Path(base + suffix) for suffix in SCHEDULE_SUFFIXES]
    fresh(paths, _seconds("MAILROOM_BEAT_MAX_AGE", 600), "beat schedule file")


def check_flower(args: Sequence[str]) -> None:
    http_ok(int(os.environ.get("FLOWER_PORT") or 5555), "/healthcheck")


CHECKS: dict[str, Callable[[Sequence[str]], None]] = {
    "web": check_web,
    "worker": check_worker,
    "beat": check_beat,
    "flower": check_flower,
}


def main(argv: Sequence[str]) -> int:
    role = argv[0] if argv else os.environ.get("MAILROOM_ROLE") or "web"
    check = CHECKS.get(role)
    if check is None:
        print(f"healthcheck: unknown role {role!r}; one of {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    try:
        check(argv[1:])
    except Unhealthy as exc:
        print(f"healthcheck {role}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
