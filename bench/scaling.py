"""End-to-end throughput with 1, 2 and 4 bulk worker processes vs raw smtplib.

For each N in ``--processes`` (default 1 2 4): a Celery bulk worker ``-Q bulk -c N`` is
started, then ``--emails`` (5,000) emails go through the original producer API
(``send_bulk_email_batch.delay`` in chunks of 50) until every row is ``sent``; the
baseline is raw ``smtplib`` with N processes, one connection each, into the same Postfix
``smtp-sink``. The machinery (sink, private redis-server, the ``mailroom_bench``
database, the measures) is bench/delivery.py's, so the figures compare with its table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.benchlib import ensure_database
from bench.delivery import (
    DB_NAME,
    Child,
    app_env,
    cpu_model,
    run_mailroom,
    run_raw,
    setup_django,
    sink_count,
    start_redis,
    start_sink,
    start_worker,
    stop_on_sigterm,
)

SAMPLE_SECONDS = 0.5


def sampled(sink: Child, measure: Any) -> tuple[Any, list[tuple[float, int]]]:
    """Run ``measure()`` while sampling the sink's counter: (its result, the timeline)."""
    points: list[tuple[float, int]] = []
    done = threading.Event()
    started = time.monotonic()
    base = sink_count(sink)

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            points.append((time.monotonic() - started, sink_count(sink) - base))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return measure(), points
    finally:
        done.set()
        thread.join()


def measure(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    rows = []
    with contextlib.ExitStack() as stack:
        sink, port = start_sink(stack, logs)
        env = app_env(port, start_redis(stack, logs))
        ensure_database(DB_NAME, env)
        setup_django(env)
        for n in args.processes:
            worker = start_worker(stack, env, logs, n)
            raw = run_raw(port, sink, args.emails, n)
            mailroom, timeline = sampled(
                sink, lambda w=worker: run_mailroom(sink, w, args.emails, args.timeout)
            )
            worker.stop()
            if raw.accepted != args.emails or mailroom.accepted != args.emails:
                raise RuntimeError(f"the sink accepted {raw.accepted}/{mailroom.accepted}")
            rows.append(
                {
                    "processes": n,
                    "raw_rate": raw.rate,
                    "mailroom_rate": mailroom.rate,
                    "raw_seconds": raw.seconds,
                    "mailroom_seconds": mailroom.seconds,
                    "ratio": mailroom.rate / raw.rate,
                    "timeline": timeline,
                }
            )
            print(f"{n} process(es): ratio {rows[-1]['ratio']:.2f}", file=sys.stderr)
    return {
        "bench": "scaling",
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model()},
        "emails": args.emails,
        "rows": rows,
    }


def report(data: dict[str, Any]) -> str:
    base = data["rows"][0]
    lines = [
        f"## Scaling: {data['emails']:,} emails with 1, 2, 4 bulk worker processes",
        "",
        "| processes | raw smtplib emails/s | Mailroom emails/s | ratio vs raw | Mailroom "
        "speed-up vs 1 process |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['processes']} | {row['raw_rate']:,.0f} | {row['mailroom_rate']:,.0f} "
            f"| {row['ratio']:.2f} | {row['mailroom_rate'] / base['mailroom_rate']:.2f} |"
        )
    lines += [
        "",
        f"Machine: {data['machine']['cpu_count']} CPU(s) ({data['machine']['cpu']}); the "
        "worker, Redis, PostgreSQL and the sink share them, so more processes than CPUs "
        "cannot scale linearly.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--emails", type=int, default=5000, help="emails per measure")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2, 4], help="bulk worker processes"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per measure")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="mailroom-bench-scaling-"))
    try:
        data = measure(args, logs)
    except Exception:
        print(f"benchmark failed; logs kept in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    print(report(data))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
