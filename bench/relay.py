"""Delivery to a relay a round trip away, behind STARTTLS: Mailroom vs raw smtplib.

For each round-trip time in ``--rtts`` (default 0, 20 and 80 ms) the relay simulator
(``python -m mailroom_testkit.relay``, its own process, STARTTLS with a test CA made for
the run, PIPELINING offered) runs on a free port, and:

1. **raw smtplib**: 2 processes, one persistent STARTTLS connection each, send their
   share of ``--emails`` through it (the classic dialogue: smtplib does not pipeline);
2. **Mailroom**: one bulk worker as shipped (``deploy/start-worker.sh`` at its defaults:
   2 processes, MAILROOM_SMTP_CONNECTIONS_PER_PROCESS lanes each, pipelining on) delivers
   the same number through the original producer API (``send_bulk_email_batch.delay``),
   timed from the first enqueue until every row is ``sent``.

It prints emails/s per phase, the ratio of each Mailroom rate to Mailroom's own 0 ms
rate (targets: at least 0.8 at 20 ms, 0.5 at 80 ms) and to raw smtplib at the same
round trip, and the worker's memory. Database ``mailroom_bench`` and a private
redis-server (bench/delivery.py's machinery). Run ``.venv/bin/python bench/relay.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import smtplib
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.benchlib import Child, ensure_database, free_port, setup_django, wait_until
from bench.delivery import (
    DB_NAME,
    app_env,
    raw_message,
    recipient_address,
    shares,
    start_redis,
    start_worker,
    status_counts,
    truncate_tables,
    wait_all_sent,
    worker_memory,
)

TARGETS = {20: 0.8, 80: 0.5}


def start_relay(stack: contextlib.ExitStack, logs: Path, rtt_ms: int) -> tuple[Child, int, str]:
    port = free_port()
    cert_dir = Path(tempfile.mkdtemp(prefix="relay-ca-", dir=logs))
    argv = [sys.executable, "-m", "mailroom_testkit.relay", "--port", str(port)]
    argv += ["--rtt", str(rtt_ms / 1000), "--tls", "starttls", "--cert-dir", str(cert_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    relay = Child(f"relay {rtt_ms} ms", argv, logs / f"relay-{rtt_ms}.log", env).start()
    stack.callback(relay.stop)
    ca = cert_dir / "relay-ca.pem"
    wait_until(lambda: ca.exists() and "listening" in relay.text(), 20, "the relay simulator")
    return relay, port, str(ca)


def _raw_share(port: int, ca: str, first: int, count: int, start: Any) -> None:
    start.wait(60)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=ca))
        for n in range(first, first + count):
            smtp.send_message(raw_message(n))


def run_raw(port: int, ca: str, emails: int, processes: int = 2) -> float:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes + 1)
    children = [
        ctx.Process(target=_raw_share, args=(port, ca, first, count, start), daemon=True)
        for first, count in shares(emails, processes)
    ]
    for child in children:
        child.start()
    start.wait(60)
    started = time.perf_counter()
    for child in children:
        child.join()
    if any(child.exitcode != 0 for child in children):
        raise RuntimeError("a raw smtplib process failed")
    return emails / (time.perf_counter() - started)


def run_mailroom(worker: Child, emails: int) -> float:
    from more_itertools import chunked

    from email_service.tasks import send_bulk_email_batch

    truncate_tables()
    recipients = [recipient_address(n) for n in range(emails)]
    started = time.perf_counter()
    for chunk in chunked(recipients, 50):
        send_bulk_email_batch.delay(chunk, "Newsletter", {"headline": "Hello"}, "newsletter")
    wait_all_sent(emails, worker, timeout=600)
    seconds = time.perf_counter() - started
    assert status_counts() == (emails, 0)
    return emails / seconds


def measure(args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        redis_url = start_redis(stack, logs)
        for rtt in args.rtts:
            with contextlib.ExitStack() as per_rtt:
                relay, port, ca = start_relay(per_rtt, logs, rtt)
                env = app_env(port, redis_url)
                env.update({"EMAIL_USE_TLS": "true", "MAILROOM_SMTP_CA_FILE": ca})
                if not rows:
                    ensure_database(DB_NAME, env)
                    setup_django(env)
                raw = run_raw(port, ca, args.emails)
                worker = start_worker(per_rtt, env, logs, 2)  # the start script's default
                run_mailroom(worker, min(500, args.emails))  # warm-up: sessions, caches
                rate = run_mailroom(worker, args.emails)
                memory = worker_memory(worker, 2)
                rows.append(
                    {
                        "rtt_ms": rtt,
                        "raw_emails_per_s": round(raw, 1),
                        "mailroom_emails_per_s": round(rate, 1),
                        "worker_rss_mib": round(memory.mib, 1),
                        "relay_log": re.sub(r"\s+", " ", relay.text()[-300:]),
                    }
                )
    base = rows[0]["mailroom_emails_per_s"] if rows and rows[0]["rtt_ms"] == 0 else None
    for row in rows:
        row["vs_0ms"] = round(row["mailroom_emails_per_s"] / base, 2) if base else None
        row["vs_raw"] = round(row["mailroom_emails_per_s"] / row["raw_emails_per_s"], 2)
        row["target_vs_0ms"] = TARGETS.get(row["rtt_ms"])
    return rows


def print_table(rows: list[dict[str, Any]], emails: int) -> None:
    print(f"\n{emails} emails per phase, STARTTLS, relay simulator in its own process")
    print(
        f"{'rtt':>6} {'raw smtplib/s':>14} {'Mailroom/s':>11} {'vs 0 ms':>8} {'target':>7}"
        f" {'vs raw':>7} {'worker RSS':>11}"
    )
    for row in rows:
        target = row["target_vs_0ms"]
        print(
            f"{row['rtt_ms']:>4}ms {row['raw_emails_per_s']:>14.1f} "
            f"{row['mailroom_emails_per_s']:>11.1f} {row['vs_0ms'] or 0:>8.2f} "
            f"{'' if target is None else f'{target:.1f}':>7} {row['vs_raw']:>7.2f} "
            f"{row['worker_rss_mib']:>9.1f}Mi"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtts", type=int, nargs="+", default=[0, 20, 80], help="ms")
    parser.add_argument("--emails", type=int, default=5000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as logs:
        rows = measure(args, Path(logs))
    print_table(rows, args.emails)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
