"""Gunicorn settings for Mailroom's web role: ``gunicorn -c deploy/gunicorn.conf.py ...``.

Metrics: gunicorn runs several worker processes, and a scrape of ``/metrics`` reaches
only one of them. So that the web role's own Prometheus metrics (django-prometheus'
request and database figures) cover every worker, prometheus_client runs in
multiprocess mode: each worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` adds them up. (Mailroom's delivery metrics do not need this: they are
read from Redis and Postgres at scrape time.)

* ``PROMETHEUS_MULTIPROC_DIR``: used as given when set (it must belong to this gunicorn
  alone); otherwise a fresh private directory is made under the system temp dir. It is
  set here, in the master, before any worker imports prometheus_client.
* It is wiped when the master starts (``on_starting``), so figures from a previous run
  are never added in, and removed at exit when it was made here.
* ``child_exit`` tells prometheus_client that a worker died (``mark_process_dead``), so
  its live gauges disappear; its counters are kept, as they should be.

Timeout: a sync worker busy with one request for longer than ``timeout`` seconds is killed
(the client gets no answer). It is ``MAILROOM_WEB_TIMEOUT`` (default 300), the variable
Django's settings read too: adding a long recipient list through the API stops at
``MAILROOM_API_INGEST_SECONDS`` (80 % of it by default) with a 413 and nothing stored, so a
worker is never killed halfway through. Set the timeout here, not with ``--timeout`` in
``GUNICORN_CMD_ARGS``, which Django cannot see.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Gunicorn reads this file again on SIGHUP: the marker keeps the first choice.
_OWNED = "MAILROOM_PROMETHEUS_DIR_OWNED"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mailroom-prometheus-")
    os.environ[_OWNED] = "1"
MULTIPROC_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def web_timeout() -> int:
    """``MAILROOM_WEB_TIMEOUT`` in seconds (default 300), as settings.py reads it."""
    raw = os.environ.get("MAILROOM_WEB_TIMEOUT", "").strip()
    if not raw:
        return 300
    try:
        seconds = int(raw)
    except ValueError:
        raise SystemExit(f"MAILROOM_WEB_TIMEOUT must be an integer, got {raw!r}") from None
    if seconds < 10:
        raise SystemExit(f"MAILROOM_WEB_TIMEOUT must be at least 10, got {seconds}")
    return seconds


timeout = web_timeout()


def wipe(directory: Path) -> None:
    """Empty ``directory`` (creating it if needed)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def on_starting(server: Any) -> None:
    """Master start, before any worker: start the multiprocess metrics from nothing."""
    wipe(MULTIPROC_DIR)


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited: drop its live gauges from the multiprocess metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, str(MULTIPROC_DIR))


def on_exit(server: Any) -> None:
    """Master exit: remove the directory if it was made here."""
    if os.environ.get(_OWNED):
        shutil.rmtree(MULTIPROC_DIR, ignore_errors=True)
