"""Transactional latency while a bulk backlog drains: API accepted → SMTP accepted.

Everything runs as in production, on one machine: gunicorn (the HTTP API), a bulk worker
(``-Q bulk -c 2``), a high_priority worker (``-Q high_priority -c 2``, which also runs the
campaign dispatcher), beat, a private redis-server and the database
``mailroom_bench_latency`` on the local PostgreSQL (kept between runs, truncated).

The bulk pool delivers into Postfix's ``smtp-sink`` (fast, counts); the transactional pool
into an aiosmtpd sink in this process, which notes when it accepted each message, so
latency is measured on one clock: from the moment the API answered ``POST
/api/v1/messages`` to the sink's 250. Transactional emails go out one at a time at
``--rate`` per second.

Baseline (same run): the same transactional emails with nothing else to do. Then a
campaign of ``--backlog`` (50,000) recipients is started and, once it is draining, the
same number of transactional emails is measured again. Target: p99 < 0.5 s under the
backlog. The bulk sink's counter is sampled every half second for the throughput chart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import benchlib
from bench.benchlib import ensure_database
from bench.delivery import (
    PG_URL,
    Child,
    app_env,
    cpu_model,
    free_port,
    setup_django,
    sink_count,
    start_redis,
    start_sink,
    stop_on_sigterm,
    truncate_tables,
    wait_until,
)
from mailroom_testkit.smtp_sink import SMTPSink

REPO = Path(__file__).resolve().parents[1]

APP_DIR = REPO / "services" / "mailroom"
DB_NAME = "mailroom_bench_latency"
TARGET_P99 = 0.5
SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Latencies:
    seconds: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, float]:
        return {"n": len(self.seconds), "p50": self.p50, "p99": self.p99, "max": max(self.seconds)}


def start(stack: contextlib.ExitStack, child: Child, ready: str) -> Child:
    child.start()
    stack.callback(child.stop)
    child.wait_for_log(ready, 60)
    return child


def post(port: int, key: str, address: str) -> None:
    body = json.dumps({"to": address, "subject": "Your code", "template": "welcome"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/messages", data=body, method="POST"
    )
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        if response.status not in (200, 201, 202):
            raise RuntimeError(f"POST /api/v1/messages: {response.status}")


def measure_latency(
    port: int, key: str, sink: SMTPSink, label: str, samples: int, rate: float
) -> Latencies:
    accepted: dict[str, float] = {}
    for n in range(samples):
        address = f"{label}{n}@transactional.example.com"
        post(port, key, address)
        accepted[address] = time.monotonic()
        time.sleep(1 / rate)

    def arrived() -> bool:
        got = {m.rcpt_to for m in sink.received}
        return all(a in got for a in accepted)

    wait_until(arrived, 60, f"the {label} transactional emails")
    first: dict[str, float] = {}
    for message in sink.received:
        first.setdefault(message.rcpt_to, message.at)
    return Latencies([first[a] - t for a, t in accepted.items()])


class Sampler(threading.Thread):
    """The bulk sink's counter every half second: (seconds since start, messages)."""

    def __init__(self, sink: Child) -> None:
        super().__init__(daemon=True)
        self.sink = sink
        self.points: list[tuple[float, int]] = []
        self.done = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        base = sink_count(self.sink)
        while not self.done.wait(SAMPLE_SECONDS):
            self.points.append((time.monotonic() - self.started, sink_count(self.sink) - base))


def backlog_campaign(emails: int) -> Any:
    from email_service import services

    campaign = services.create_campaign(
        name=f"backlog {emails:,}", subject="Hello {{ name }}", template="newsletter"
    )
    rows = [
        {"email": f"user{n}@example.com", "context": {"name": f"User {n}"}} for n in range(emails)
    ]
    services.add_recipients(campaign, rows)
    return campaign


def measure(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        bulk_sink, bulk_port = start_sink(stack, logs)
        tx_sink = SMTPSink(free_port()).start()
        stack.callback(tx_sink.stop)
        env = app_env(bulk_port, start_redis(stack, logs))
        env["DATABASE_URL"] = f"{PG_URL}/{DB_NAME}"
        env["MAILROOM_API_RATE_LIMIT_PER_MINUTE"] = "0"
        env["ALLOWED_HOSTS"] = "127.0.0.1,localhost"
        ensure_database(DB_NAME, env)
        setup_django(env)
        truncate_tables()
        from email_service import services

        _, key = services.create_api_key("bench-latency", ["admin"], None)
        high_env = {**env, "EMAIL_PORT": str(tx_sink.port)}
        bulk = benchlib.worker("bulk", logs / "bulk.log", env, "bulk", 2, "bulk")
        start(stack, bulk, " ready.")
        high = benchlib.worker("high", logs / "high.log", high_env, "high_priority", 2, "high")
        start(stack, high, " ready.")
        beat = benchlib.beat("beat", logs / "beat.log", env, logs / "beat-schedule")
        start(stack, beat, "beat: Starting")
        port = free_port()
        start(stack, benchlib.web("web", logs / "web.log", env, port), "Booting worker")

        measure_latency(port, key, tx_sink, "warmup", 10, args.rate)
        idle = measure_latency(port, key, tx_sink, "idle", args.samples, args.rate)
        print(f"idle: p50 {idle.p50 * 1000:.0f} ms, p99 {idle.p99 * 1000:.0f} ms", file=sys.stderr)
        started = time.monotonic()
        campaign = backlog_campaign(args.backlog)
        ingest_seconds = time.monotonic() - started
        sampler = Sampler(bulk_sink)
        sampler.start()
        services.start_campaign(campaign)
        # Measure once the campaign is flowing (its first thousand, or a fifth of a small one).
        flowing = min(1000, args.backlog // 5)
        wait_until(lambda: sink_count(bulk_sink) > flowing, 120, "the backlog to start draining")
        busy_from = time.monotonic() - sampler.started
        busy = measure_latency(port, key, tx_sink, "busy", args.samples, args.rate)
        busy_until = time.monotonic() - sampler.started
        progress = services.campaign_progress(campaign)
        draining = progress["sent"] < args.backlog
        wait_until(
            lambda: services.campaign_progress(campaign)["sent"] >= args.backlog,
            args.timeout,
            "the backlog to be sent",
        )
        sampler.done.set()
        sampler.join()
        drain_seconds = sampler.points[-1][0] if sampler.points else 0.0
    return {
        "bench": "latency",
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu_model(),
            "python": sys.version.split()[0],
            "bulk_processes": 2,
            "high_processes": 2,
        },
        "backlog": args.backlog,
        "rate_per_second": args.rate,
        "idle": idle.summary(),
        "busy": busy.summary(),
        "ratio_p99": busy.p99 / idle.p99,
        "target_p99_seconds": TARGET_P99,
        "meets_target": busy.p99 < TARGET_P99,
        "backlog_still_draining_after_samples": draining,
        "sent_when_samples_ended": progress["sent"],
        "ingest_seconds": ingest_seconds,
        "drain_seconds": drain_seconds,
        "measured_window": [busy_from, busy_until],
        "timeline": sampler.points,
    }


def report(data: dict[str, Any]) -> str:
    idle, busy = data["idle"], data["busy"]
    verdict = "meets" if data["meets_target"] else "MISSES"
    return "\n".join(
        [
            f"## Transactional latency while a {data['backlog']:,}-recipient backlog drains",
            "",
            "| measure | emails | p50 | p99 | max | ratio p99 vs idle |",
            "|---|---:|---:|---:|---:|---:|",
            f"| idle system (baseline) | {idle['n']} | {idle['p50'] * 1000:.0f} ms "
            f"| {idle['p99'] * 1000:.0f} ms | {idle['max'] * 1000:.0f} ms | 1.00 |",
            f"| during the backlog | {busy['n']} | {busy['p50'] * 1000:.0f} ms "
            f"| {busy['p99'] * 1000:.0f} ms | {busy['max'] * 1000:.0f} ms "
            f"| {data['ratio_p99']:.2f} |",
            "",
            f"p99 {busy['p99'] * 1000:.0f} ms: {verdict} the target < {TARGET_P99 * 1000:.0f} ms. "
            f"API accepted → SMTP accepted, {data['rate_per_second']:g} emails/s, one at a "
            f"time. The backlog was still draining when the samples ended: "
            f"{'yes' if data['backlog_still_draining_after_samples'] else 'NO'} "
            f"({data['sent_when_samples_ended']:,} sent then); it drained in "
            f"{data['drain_seconds']:.0f} s.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backlog", type=int, default=50_000, help="bulk recipients")
    parser.add_argument("--samples", type=int, default=200, help="transactional emails per phase")
    parser.add_argument("--rate", type=float, default=10, help="transactional emails per second")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the backlog")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="mailroom-bench-latency-"))
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
