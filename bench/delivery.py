"""Bulk delivery throughput: Mailroom end to end against raw smtplib, in the same run.

Both send into one Postfix ``smtp-sink`` that this script starts on a free port:

1. raw smtplib: N processes (N = bulk worker processes), one SMTP connection each, an
   ``email.message.EmailMessage`` (multipart/alternative, text + HTML) built per message;
2. Mailroom: ``send_bulk_email_batch.delay()`` in chunks of 50, delivered by a real Celery
   worker (``-Q bulk -c N``); the clock runs from before the first enqueue until every
   ``Message`` row is ``sent``.

It uses a private database (``mailroom_bench``, kept between runs and truncated) and a
private redis-server on a free port. Every process it starts is stopped on the way out.
Run ``make bench`` or ``.venv/bin/python bench/delivery.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "services" / "mailroom"
PG_URL = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "mailroom_bench"
CHUNK = 50
POLL_SECONDS = 0.02
SUBJECT = "Newsletter"
HEADLINE = "What's new this month"
FROM_HEADER = "Mailroom <noreply@mailroom.example.com>"

# The baseline's body mirrors what Mailroom renders for the newsletter template with
# only a headline (same layout, about the same bytes); the table prints both sizes.
BASELINE_TEXT = f"{HEADLINE}\n\nYou receive this because you subscribed.\n"
BASELINE_HTML = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>What&#x27;s new this month</title>
</head>
<body style="margin:0;padding:0;background:#f4f5f7;font-family:Helvetica,Arial,sans-serif;\
color:#1f2933;">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" \
style="background:#f4f5f7;">
<tr><td align="center" style="padding:24px 12px;">
<table role="presentation" width="600" cellpadding="0" cellspacing="0" \
style="max-width:600px;background:#ffffff;border-radius:6px;">
<tr><td style="padding:32px;font-size:16px;line-height:1.5;">
<h1 style="font-size:22px;margin:0 0 16px;">{HEADLINE.replace("'", "&#x27;")}</h1>
</td></tr>
</table>
<p style="font-size:12px;color:#6b7280;">You receive this because you subscribed.</p>
</td></tr>
</table>
</body>
</html>
"""


@dataclass(frozen=True)
class Phase:
    """One timed measurement."""

    emails: int
    seconds: float
    accepted: int  # messages the sink counted during the phase
    enqueue_seconds: float | None = None  # Mailroom only: time spent in .delay() calls

    @property
    def rate(self) -> float:
        return self.emails / self.seconds


@dataclass(frozen=True)
class Run:
    raw: Phase
    mailroom: Phase

    @property
    def ratio(self) -> float:
        return self.mailroom.rate / self.raw.rate


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class Child:
    """A process in its own session, logging to a file; stopping it stops its group."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=APP_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = "\n".join(self.text().splitlines()[-30:])
            raise RuntimeError(f"{self.name} is not running; log {self.log}:\n{tail}")

    def wait_for_log(self, marker: str, timeout: float) -> None:
        def seen() -> bool:
            self.check_alive()
            return marker in self.text()

        wait_until(seen, timeout, f"{self.name} to log {marker!r}")

    def stop(self, grace: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def listening(child: Child, port: int) -> bool:
    child.check_alive()
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_sink(stack: contextlib.ExitStack, logs: Path) -> tuple[Child, int]:
    """Postfix's smtp-sink, printing running counters (-c) to its log."""
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(binary).exists():
        raise SystemExit("smtp-sink not found: apt-get install -y postfix")
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    argv = [binary, "-c", *user, f"127.0.0.1:{port}", "1000"]
    sink = Child("smtp-sink", argv, logs / "smtp-sink.log", dict(os.environ)).start()
    stack.callback(sink.stop)
    wait_until(lambda: listening(sink, port), 10, "smtp-sink to listen")
    return sink, port


def sink_count(sink: Child) -> int:
    """Messages the sink has accepted so far (the last ``mesg=`` counter it printed)."""
    counts = re.findall(r"mesg=(\d+)", sink.text())
    return int(counts[-1]) if counts else 0


def start_redis(stack: contextlib.ExitStack, logs: Path) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(logs)]
    server = Child("redis-server", argv, logs / "redis.log", dict(os.environ)).start()
    stack.callback(server.stop)
    wait_until(lambda: listening(server, port), 10, "redis-server to listen")
    return f"redis://127.0.0.1:{port}/0"


def app_env(sink_port: int, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
            "REDIS_URL": redis_url,
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(sink_port),
            "SECRET_KEY": "bench",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "localhost",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def start_worker(stack: contextlib.ExitStack, env: dict[str, str], logs: Path, n: int) -> Child:
    argv = [sys.executable, "-m", "celery", "-A", "messaging_platform", "worker", "-Q", "bulk"]
    argv += ["-c", str(n), "-n", "bench@%h", "--without-mingle", "--without-gossip", "-l", "info"]
    worker = Child("celery worker", argv, logs / "worker.log", env).start()
    stack.callback(worker.stop)
    worker.wait_for_log(" ready.", 60)
    return worker


# --------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------


def ensure_database(env: dict[str, str]) -> None:
    """Create ``mailroom_bench`` if missing (it is kept between runs) and migrate it."""
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DB_NAME]).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    argv = [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"]
    done = subprocess.run(argv, cwd=APP_DIR, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{done.stdout}{done.stderr}")


def setup_django(env: dict[str, str]) -> None:
    os.environ.update(env)
    sys.path.insert(0, str(APP_DIR))
    import django

    django.setup()


def truncate_tables() -> None:
    from django.db import connection

    from email_service.models import Campaign, ControlFlag, DeliveryAttempt, Message, Suppression

    tables = [m._meta.db_table for m in (DeliveryAttempt, Message, Campaign, Suppression)]
    tables.append(ControlFlag._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


# --------------------------------------------------------------------------------------
# Baseline: raw smtplib
# --------------------------------------------------------------------------------------


def raw_message(n: int) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = SUBJECT
    message["From"] = FROM_HEADER
    message["To"] = f"user{n}@example.com"
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain="mailroom.example.com")
    message.set_content(BASELINE_TEXT)
    message.add_alternative(BASELINE_HTML, subtype="html")
    return message


def send_share(port: int, first: int, count: int, barrier: Barrier) -> None:
    """One baseline process: wait for the start, then send its share on one connection."""
    barrier.wait(60)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for n in range(first, first + count):
            smtp.send_message(raw_message(n))


def shares(emails: int, processes: int) -> list[tuple[int, int]]:
    """(first, count) per process, as even as possible."""
    size, extra = divmod(emails, processes)
    counts = [size + (1 if i < extra else 0) for i in range(processes)]
    return [(sum(counts[:i]), c) for i, c in enumerate(counts)]


def run_raw(port: int, sink: Child, emails: int, processes: int) -> Phase:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    workers = [
        ctx.Process(target=send_share, args=(port, first, count, barrier), daemon=True)
        for first, count in shares(emails, processes)
    ]
    before = sink_count(sink)
    try:
        for worker in workers:
            worker.start()
        barrier.wait(60)  # every process is up: start the clock
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - started
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
    if any(worker.exitcode != 0 for worker in workers):
        raise RuntimeError("a raw smtplib process failed")
    return Phase(emails, seconds, settled_count(sink, before, emails))


def settled_count(sink: Child, before: int, expected: int) -> int:
    """What the sink accepted since ``before``, once its counter has caught up."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: sink_count(sink) - before >= expected, 5, "the sink counter")
    return sink_count(sink) - before


# --------------------------------------------------------------------------------------
# Mailroom end to end
# --------------------------------------------------------------------------------------


def status_counts() -> tuple[int, int]:
    """(sent, failed) over every Message row: one query."""
    from django.db.models import Count, Q

    from email_service.models import Message

    counts = Message.objects.aggregate(
        sent=Count("id", filter=Q(status=Message.Status.SENT)),
        failed=Count("id", filter=Q(status=Message.Status.FAILED)),
    )
    return int(counts["sent"]), int(counts["failed"])


def wait_all_sent(emails: int, worker: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        sent, failed = status_counts()
        if sent >= emails:
            return
        if failed:
            raise RuntimeError(f"{failed} message(s) failed; see {worker.log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sent}/{emails} sent after {timeout:g}s; see {worker.log}")
        worker.check_alive()
        time.sleep(POLL_SECONDS)


def enqueue(recipients: list[str]) -> None:
    """The original producer API, unchanged."""
    from more_itertools import chunked

    from email_service.tasks import send_bulk_email_batch

    for chunk in chunked(recipients, CHUNK):
        send_bulk_email_batch.delay(chunk, SUBJECT, {"headline": HEADLINE}, "newsletter")


def run_mailroom(sink: Child, worker: Child, emails: int, timeout: float) -> Phase:
    truncate_tables()
    recipients = [f"user{n}@example.com" for n in range(emails)]
    before = sink_count(sink)
    started = time.perf_counter()
    enqueue(recipients)
    enqueued = time.perf_counter() - started
    wait_all_sent(emails, worker, timeout)
    seconds = time.perf_counter() - started
    return Phase(emails, seconds, settled_count(sink, before, emails), enqueued)


def mailroom_message_size() -> int:
    from django.conf import settings

    from email_service.rendering import PreparedMessage, render

    rendered = render("newsletter", SUBJECT, {"headline": HEADLINE})
    prepared = PreparedMessage(settings.DEFAULT_FROM_EMAIL, rendered)
    return len(prepared.for_recipient("user0@example.com", "<0@mailroom.example.com>"))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def check(run: Run) -> None:
    for name, phase in (("raw smtplib", run.raw), ("Mailroom", run.mailroom)):
        if phase.accepted != phase.emails:
            raise RuntimeError(f"{name}: the sink accepted {phase.accepted} of {phase.emails}")


def row(label: str, phase: Phase, ratio: float) -> str:
    return f"| {label} | {phase.emails} | {phase.seconds:.2f} | {phase.rate:,.0f} | {ratio:.2f} |"


def median_phase(phases: list[Phase]) -> Phase:
    seconds = statistics.median(p.seconds for p in phases)
    return Phase(phases[0].emails, seconds, phases[0].accepted)


def table(runs: list[Run], processes: int) -> list[str]:
    lines = [
        "| measure | emails | seconds | emails/s | ratio vs raw smtplib |",
        "|---|---:|---:|---:|---:|",
    ]
    raw_label = f"raw smtplib, {processes} process(es)"
    mailroom_label = f"Mailroom end to end, {processes} bulk worker process(es)"
    for number, run in enumerate(runs, 1):
        suffix = f" (run {number})" if len(runs) > 1 else ""
        lines.append(row(raw_label + suffix, run.raw, 1.0))
        lines.append(row(mailroom_label + suffix, run.mailroom, run.ratio))
    if len(runs) > 1:
        lines.append(row(f"median: {raw_label}", median_phase([r.raw for r in runs]), 1.0))
        lines.append(
            row(
                f"median: {mailroom_label}",
                median_phase([r.mailroom for r in runs]),
                median_ratio(runs),
            )
        )
    return lines


def median_ratio(runs: list[Run]) -> float:
    return statistics.median(r.ratio for r in runs)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def machine_facts(processes: int) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "processes": processes,
        "chunk": CHUNK,
        "raw_message_bytes": len(raw_message(0).as_bytes()),
        "mailroom_message_bytes": mailroom_message_size(),
    }


def report(runs: list[Run], facts: dict[str, Any]) -> str:
    enqueue_seconds = statistics.median(r.mailroom.enqueue_seconds or 0.0 for r in runs)
    lines = ["## Bulk delivery: Mailroom vs raw smtplib into Postfix smtp-sink", ""]
    lines += table(runs, facts["processes"])
    lines += [
        "",
        f"Machine: {facts['cpu_count']} CPU(s) ({facts['cpu']}), {facts['system']}, "
        f"Python {facts['python']}; {facts['processes']} raw smtplib process(es) and "
        f"{facts['processes']} Celery bulk worker process(es); chunks of {facts['chunk']}.",
        f"Message size: raw {facts['raw_message_bytes']} bytes, Mailroom "
        f"{facts['mailroom_message_bytes']} bytes. Mailroom time includes enqueueing "
        f"(median {enqueue_seconds:.2f}s in .delay() calls, overlapping delivery).",
    ]
    if len(runs) > 1:
        lines.append("Median rows: median seconds; their ratio is the median of the runs' ratios.")
    return "\n".join(lines)


def phase_json(phase: Phase) -> dict[str, Any]:
    return asdict(phase) | {"rate": phase.rate}


def as_json(runs: list[Run], facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": "delivery",
        "machine": facts,
        "runs": [
            {"raw": phase_json(r.raw), "mailroom": phase_json(r.mailroom), "ratio": r.ratio}
            for r in runs
        ],
        "median_ratio": median_ratio(runs),
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--emails", type=int, default=5000, help="emails per measure")
    parser.add_argument("--processes", type=int, default=2, help="bulk worker processes")
    parser.add_argument("--repeat", type=int, default=1, help="runs of both measures")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.emails, args.processes, args.repeat) < 1:
        parser.error("--emails, --processes and --repeat must be at least 1")
    return args


def measure(args: argparse.Namespace, logs: Path) -> tuple[list[Run], dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        sink, port = start_sink(stack, logs)
        env = app_env(port, start_redis(stack, logs))
        ensure_database(env)
        setup_django(env)
        worker = start_worker(stack, env, logs, args.processes)
        runs = [run_once(n, args, sink, port, worker) for n in range(args.repeat)]
        return runs, machine_facts(args.processes)


def run_once(number: int, args: argparse.Namespace, sink: Child, port: int, worker: Child) -> Run:
    """Both measures; the order alternates (AB, BA...) so a drifting machine favours neither."""
    if number % 2:
        mailroom = run_mailroom(sink, worker, args.emails, args.timeout)
        raw = run_raw(port, sink, args.emails, args.processes)
    else:
        raw = run_raw(port, sink, args.emails, args.processes)
        mailroom = run_mailroom(sink, worker, args.emails, args.timeout)
    run = Run(raw, mailroom)
    check(run)
    return run


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def measured(args: argparse.Namespace) -> tuple[list[Run], dict[str, Any]] | None:
    """``measure`` with its logs removed afterwards, or kept when something failed."""
    logs = Path(tempfile.mkdtemp(prefix="mailroom-bench-"))
    keep_logs = False
    try:
        return measure(args, logs)
    except Exception:
        keep_logs = True
        print(f"benchmark failed; logs kept in {logs}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("benchmark interrupted; every process it started is stopped", file=sys.stderr)
        return None
    finally:
        if not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C works even when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    result = measured(args)
    if result is None:
        return 130
    runs, facts = result
    print(report(runs, facts))
    if args.json:
        args.json.write_text(json.dumps(as_json(runs, facts), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
