"""The framework bypasses, each against the framework's way in the same run.

Mailroom keeps a bypass of Django only where it pays: at least 10 % of the path it sits
on. This script measures each one on that path, in one process, against the code that
would replace it:

1. **Key look-up** (``apikeys._live_key``): one SQL statement through Django's cursor,
   against ``ApiKey.objects.only(...).filter(prefix=..., revoked_at=None).first()``.
2. **Single-row accept** (``services.accepting._accept_one``): the suppression check
   folded into one ``INSERT ... RETURNING``, against the ORM writer every batch uses
   (a suppression ``SELECT``, then ``bulk_create`` in a transaction).

The path is a whole ``POST /api/v1/messages`` served in-process by Django's test client
(the product's settings and middleware, key look-up, rate check, validation, template
check, the row committed, the task queued in a private redis-server). Each variant runs
the same requests, interleaved in rounds so that drift hits all alike; the figure is
the median of the rounds. "Saves" is the share of the framework variant's request time
that the bypass takes off; the verdict is "keep" at 10 % or more, else "remove".

It uses a private database (``mailroom_bench_bypasses``, created and migrated if missing,
its messages truncated before each round). Run ``.venv/bin/python bench/bypasses.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.benchlib import PG_URL, ensure_database, free_port, setup_django
from mailroom_testkit.processes import RedisServer

DB_NAME = "mailroom_bench_bypasses"
KEEP_AT = 0.10
BODY = {
    "to": "reader@example.com",
    "subject": "Welcome aboard",
    "template": "welcome",
    "context": {"name": "Ann", "action_url": "https://app.example.com/start"},
}


def _env(redis_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
        "REDIS_URL": redis_url,
        "SECRET_KEY": "bench",
        "DEBUG": "false",
        "ALLOWED_HOSTS": "testserver,127.0.0.1,localhost",
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
        "MAILROOM_API_RATE_LIMIT_PER_MINUTE": "0",
    }


def _orm_live_key(prefix: str) -> Any:
    """What ``apikeys._live_key`` would be without its own SQL."""
    from email_service import apikeys
    from email_service.models import ApiKey

    return ApiKey.objects.only(*apikeys._LOADED).filter(prefix=prefix, revoked_at=None).first()


def _orm_accept_one(address: str, request: Any, campaign: Any, key: str | None) -> Any:
    """What ``accepting._accept_one`` would be without its own INSERT."""
    from email_service.services import accepting

    return accepting._accept_many([address], request, campaign, [key])[0]


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Callable[..., Any] | None) -> Iterator[None]:
    if value is None:
        yield
        return
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _requests(count: int, secret: str) -> float:
    """Seconds per API request, over ``count`` in-process requests."""
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    body = json.dumps(BODY)
    started = time.perf_counter()
    for _ in range(count):
        response = client.post("/api/v1/messages", body, content_type="application/json")
        if response.status_code != 202:
            raise RuntimeError(f"the API answered {response.status_code}: {response.content!r}")
    return (time.perf_counter() - started) / count


def _truncate() -> None:
    from django.db import connection

    from email_service.models import Message

    with connection.cursor() as cursor:
        cursor.execute(f'TRUNCATE "{Message._meta.db_table}" CASCADE')


def measure(rounds: int, count: int) -> list[dict[str, Any]]:
    from email_service import apikeys, redisstore
    from email_service.services import accepting, administration

    _, secret = administration.create_api_key("bench", ["send"])
    variants: dict[str, list[tuple[Any, str, Callable[..., Any] | None]]] = {
        "product (both bypasses)": [],
        "key look-up by QuerySet": [(apikeys, "_live_key", _orm_live_key)],
        "single-row accept by ORM": [(accepting, "_accept_one", _orm_accept_one)],
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    _requests(count // 4, secret)  # warm-up: connections, caches, templates
    for _ in range(rounds):
        for name, patches in variants.items():
            _truncate()
            redisstore.client().flushdb()
            with contextlib.ExitStack() as stack:
                for module, attr, value in patches:
                    stack.enter_context(_replaced(module, attr, value))
                timings[name].append(_requests(count, secret))
    product = statistics.median(timings["product (both bypasses)"])
    rows = []
    for name, samples in timings.items():
        median = statistics.median(samples)
        saves = (median - product) / median if name.startswith(("key", "single")) else None
        rows.append(
            {
                "variant": name,
                "ms_per_request": round(median * 1000, 3),
                "ratio_to_product": round(median / product, 3),
                "bypass_saves": None if saves is None else round(saves, 3),
                "verdict": None if saves is None else ("keep" if saves >= KEEP_AT else "remove"),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], rounds: int, count: int) -> None:
    print(f"\nAPI request in-process, median of {rounds} rounds x {count} requests")
    print(f"{'variant':<28} {'ms/request':>11} {'x product':>10} {'bypass saves':>13}  verdict")
    for row in rows:
        saves = "" if row["bypass_saves"] is None else f"{row['bypass_saves']:.1%}"
        print(
            f"{row['variant']:<28} {row['ms_per_request']:>11.3f} "
            f"{row['ratio_to_product']:>10.3f} {saves:>13}  {row['verdict'] or ''}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="per variant and round")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    redis_server = RedisServer(free_port()).start()
    try:
        env = _env(f"redis://127.0.0.1:{redis_server.port}/0")
        env = {**os.environ, **env}
        ensure_database(DB_NAME, env)
        with tempfile.TemporaryDirectory() as metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            setup_django(env)
            rows = measure(args.rounds, args.requests)
    finally:
        redis_server.stop()
    print_table(rows, args.rounds, args.requests)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
