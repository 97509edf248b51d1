"""Delivery throughput: Mailroom end to end against raw smtplib, in the same run.

Both send into one Postfix ``smtp-sink`` that this script starts on a free port. Two
scenarios (``--scenario``, default both), each against its own raw smtplib baseline:

* ``legacy``: ``send_bulk_email_batch.delay()`` in chunks of 50, delivered by a real
  Celery worker (``-Q bulk -c N``); the clock runs from before the first enqueue until
  every ``Message`` row is ``sent``.
* ``campaign``: a campaign of 20,000 recipients, each with its own context, ingested with
  ``services.add_recipients`` (timed apart), then delivered through the dispatcher (a
  ``high_priority`` worker fed by ``celery beat``); the clock runs from
  ``services.start_campaign`` until ``campaign_progress`` counts every message ``sent``.
  The bulk worker's memory (RSS of its main and pool processes) is read after a
  500-recipient warm-up campaign and after each measured campaign.

The baseline: N processes (N = bulk worker processes), one SMTP connection each, an
``email.message.EmailMessage`` (multipart/alternative, text + HTML) built per message.

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
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from email_service.models import Campaign

from bench import benchlib
from bench.benchlib import Child, ensure_database, free_port, setup_django, wait_until

REPO = Path(__file__).resolve().parents[1]

APP_DIR = REPO / "services" / "mailroom"
PG_URL = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "mailroom_bench"
CHUNK = 50
POLL_SECONDS = 0.02
CAMPAIGN_POLL_SECONDS = 0.05
SUBJECT = "Newsletter"
HEADLINE = "What's new this month"
FROM_HEADER = "Mailroom <noreply@mailroom.example.com>"
CAMPAIGN_SUBJECT = "Hello {{ name }}"
CAMPAIGN_TEMPLATE = "newsletter"
MEMORY_TARGET = 0.10  # the bulk worker's RSS may grow by less than 10 % over the campaign
SCENARIOS = ("legacy", "campaign")
# Set for every process unless the caller's environment sets them (to try other values).
ENV_DEFAULTS = {
    "MAILROOM_PUBLIC_URL": "https://mail.example.com",  # bulk mail carries unsubscribe links
    "MAILROOM_DISPATCH_INTERVAL_SECONDS": "0.5",  # beat's dispatcher tick
}

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
    enqueue_seconds: float | None = None  # legacy only: time spent in .delay() calls
    ingest_seconds: float | None = None  # campaign only: add_recipients, before the clock

    @property
    def rate(self) -> float:
        return self.emails / self.seconds


@dataclass(frozen=True)
class Memory:
    """Resident memory of a process tree (a Celery worker and its pool), at one moment."""

    rss_kib: dict[int, int]  # pid -> VmRSS

    @property
    def total_kib(self) -> int:
        return sum(self.rss_kib.values())

    @property
    def mib(self) -> float:
        return self.total_kib / 1024

    def growth(self, before: Memory) -> float:
        return self.total_kib / before.total_kib - 1


@dataclass(frozen=True)
class Run:
    raw: Phase
    mailroom: Phase
    memory: Memory | None = None  # campaign only: the bulk worker's, after the campaign

    @property
    def ratio(self) -> float:
        return self.mailroom.rate / self.raw.rate


@dataclass(frozen=True)
class Results:
    legacy: list[Run]
    campaign: list[Run]
    warmup: Memory | None  # the bulk worker's memory after the warm-up campaign
    facts: dict[str, Any]


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


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
    for name, value in ENV_DEFAULTS.items():
        env.setdefault(name, value)
    return env


def start_worker(stack: contextlib.ExitStack, env: dict[str, str], logs: Path, n: int) -> Child:
    """The bulk pool as deployed (deploy/start-worker.sh), ``-c n``."""
    worker = benchlib.worker("celery worker", logs / "worker.log", env, "bulk", n, "bench")
    worker.start()
    stack.callback(worker.stop)
    worker.wait_for_log(" ready.", 60)
    return worker


def start_dispatcher(stack: contextlib.ExitStack, env: dict[str, str], logs: Path) -> list[Child]:
    """What campaigns need besides the bulk worker: a ``high_priority`` worker (where
    ``dispatch_campaigns`` is routed) and ``celery beat`` (which schedules it)."""
    high = benchlib.worker(
        "celery high_priority worker",
        logs / "worker-high.log",
        env,
        "high_priority",
        1,
        "bench-high",
    ).start()
    stack.callback(high.stop)
    beat = benchlib.beat("celery beat", logs / "beat.log", env, logs / "celerybeat-schedule")
    beat.start()
    stack.callback(beat.stop)
    high.wait_for_log(" ready.", 60)
    beat.wait_for_log("beat: Starting...", 60)
    return [high, beat]


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (a worker's pool processes), from /proc."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            found = re.search(r"^PPid:\s+(\d+)", status.read_text(), re.MULTILINE)
            if found:
                children.setdefault(int(found[1]), []).append(int(status.parent.name))
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(parent, []))
    return tree


def rss_kib(pid: int) -> int:
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if found is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return int(found[1])


def worker_memory(worker: Child, processes: int) -> Memory:
    """VmRSS of the worker's main process and its pool processes (they must all be up)."""
    worker.check_alive()
    assert worker.proc is not None
    pids = process_tree(worker.proc.pid)
    if len(pids) != processes + 1:
        raise RuntimeError(f"expected {worker.name} + {processes} pool process(es), got {pids}")
    return Memory({pid: rss_kib(pid) for pid in pids})


# --------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------


def truncate_tables() -> None:
    from django.db import connection

    from email_service.models import (
        Campaign,
        CampaignCount,
        ControlFlag,
        DeliveryAttempt,
        Message,
        Suppression,
    )

    models = (DeliveryAttempt, Message, CampaignCount, Campaign, Suppression, ControlFlag)
    tables = [m._meta.db_table for m in models]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


# --------------------------------------------------------------------------------------
# Baseline: raw smtplib
# --------------------------------------------------------------------------------------


def raw_message(n: int, personal: bool = False) -> EmailMessage:
    """The baseline's message; ``personal``: the campaign's, greeting recipient n by name."""
    text, html, subject = BASELINE_TEXT, BASELINE_HTML, SUBJECT
    if personal:
        name = recipient_name(n)
        subject = f"Hello {name}"
        text = text.replace("\n\n", f"\n\nHi {name},\n\n", 1)
        html = html.replace("</h1>\n", f"</h1>\n<p>Hi {name},</p>\n", 1)
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = FROM_HEADER
    message["To"] = recipient_address(n)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain="mailroom.example.com")
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def recipient_address(n: int) -> str:
    return f"user{n}@example.com"


def recipient_name(n: int) -> str:
    return f"User {n}"


def send_share(port: int, first: int, count: int, barrier: Barrier, personal: bool) -> None:
    """One baseline process: wait for the start, then send its share on one connection."""
    barrier.wait(60)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for n in range(first, first + count):
            smtp.send_message(raw_message(n, personal))


def shares(emails: int, processes: int) -> list[tuple[int, int]]:
    """(first, count) per process, as even as possible."""
    size, extra = divmod(emails, processes)
    counts = [size + (1 if i < extra else 0) for i in range(processes)]
    return [(sum(counts[:i]), c) for i, c in enumerate(counts)]


def run_raw(port: int, sink: Child, emails: int, processes: int, personal: bool = False) -> Phase:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    workers = [
        ctx.Process(target=send_share, args=(port, first, count, barrier, personal), daemon=True)
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
    recipients = [recipient_address(n) for n in range(emails)]
    before = sink_count(sink)
    started = time.perf_counter()
    enqueue(recipients)
    enqueued = time.perf_counter() - started
    wait_all_sent(emails, worker, timeout)
    seconds = time.perf_counter() - started
    return Phase(emails, seconds, settled_count(sink, before, emails), enqueued)


def campaign_rows(emails: int) -> list[dict[str, object]]:
    """Recipients with their own context, as ``add_recipients`` takes them."""
    return [
        {"email": recipient_address(n), "context": {"name": recipient_name(n)}}
        for n in range(emails)
    ]


def run_campaign(sink: Child, children: list[Child], emails: int, timeout: float) -> Phase:
    """A fresh campaign: ingest (timed apart), then ``start_campaign`` → all sent."""
    from email_service import services

    truncate_tables()
    rows = campaign_rows(emails)
    campaign = services.create_campaign(
        name=f"bench {emails:,}", subject=CAMPAIGN_SUBJECT, template=CAMPAIGN_TEMPLATE
    )
    started = time.perf_counter()
    ingested = services.add_recipients(campaign, rows)
    ingest_seconds = time.perf_counter() - started
    if ingested.accepted != emails:
        raise RuntimeError(f"add_recipients accepted {ingested.accepted} of {emails}: {ingested}")
    before = sink_count(sink)
    started = time.perf_counter()
    services.start_campaign(campaign)
    wait_campaign_sent(campaign, emails, children, timeout)
    seconds = time.perf_counter() - started
    wait_campaign_completed(campaign, children)
    accepted = settled_count(sink, before, emails)
    return Phase(emails, seconds, accepted, ingest_seconds=ingest_seconds)


def wait_campaign_sent(
    campaign: Campaign, emails: int, children: list[Child], timeout: float
) -> None:
    from email_service import services

    deadline = time.monotonic() + timeout
    while True:
        progress = services.campaign_progress(campaign)
        if progress["sent"] >= emails:
            return
        if progress["failed"]:
            raise RuntimeError(f"{progress['failed']} message(s) failed: {progress}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout:g}s: {progress}")
        for child in children:
            child.check_alive()
        time.sleep(CAMPAIGN_POLL_SECONDS)


def wait_campaign_completed(campaign: Campaign, children: list[Child]) -> None:
    """The dispatcher marks it completed at its next tick (not timed: the mail is out)."""

    def completed() -> bool:
        for child in children:
            child.check_alive()
        campaign.refresh_from_db(fields=["status"])
        return bool(campaign.status == campaign.Status.COMPLETED)

    wait_until(completed, 60, "the dispatcher to complete the campaign")


def mailroom_message_size(campaign: bool) -> int:
    """The exact bytes a bulk worker sends to user0 (unsubscribe header and link included)."""
    from django.conf import settings
    from django.utils import timezone

    from email_service.models import Queue
    from email_service.outbox import ClaimedRow
    from email_service.rendering import PreparedCache
    from email_service.services import delivery as service_delivery

    subject, context = (
        (CAMPAIGN_SUBJECT, {"name": recipient_name(0)})
        if campaign
        else (SUBJECT, {"headline": HEADLINE})
    )
    row = ClaimedRow(
        id=uuid.uuid4(),
        queue=Queue.BULK,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to_email=recipient_address(0),
        subject=subject,
        template=CAMPAIGN_TEMPLATE,
        context=context,
        message_id_header=f"<{uuid.uuid4().hex}@mailroom.example.com>",
        attempts=1,
        campaign_id=uuid.uuid4() if campaign else None,
        created_at=timezone.now(),
    )
    return len(service_delivery.message_bytes(PreparedCache(), row))


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


def median_ratio(runs: list[Run]) -> float:
    return statistics.median(r.ratio for r in runs)


TABLE_HEAD = [
    "| measure | emails | seconds | emails/s | ratio vs raw smtplib |",
    "|---|---:|---:|---:|---:|",
]


def table(runs: list[Run], raw_label: str, mailroom_label: str) -> list[str]:
    lines = list(TABLE_HEAD)
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


def memory_verdict(growth: float) -> str:
    verdict = "meets" if growth < MEMORY_TARGET else "MISSES"
    return f"{growth:+.1%} ({verdict} the target < {MEMORY_TARGET:.0%})"


def campaign_table(runs: list[Run], warmup: Memory, processes: int) -> list[str]:
    lines = table(
        runs,
        f"raw smtplib, {processes} process(es), subject and greeting per recipient",
        f"Mailroom campaign, start_campaign → all sent, {processes} bulk worker process(es)",
    )
    for number, run in enumerate(runs, 1):
        suffix = f" (run {number})" if len(runs) > 1 else ""
        ingest = run.mailroom.ingest_seconds or 0.0
        lines.append(
            f"| Mailroom ingest: add_recipients, not in the delivery clock{suffix} "
            f"| {run.mailroom.emails} | {ingest:.2f} | {run.mailroom.emails / ingest:,.0f} | — |"
        )
    for number, run in enumerate(runs, 1):
        assert run.memory is not None
        suffix = f" (run {number})" if len(runs) > 1 else ""
        lines.append(
            f"| bulk worker RSS, main + {processes} pool process(es): after warm-up → after "
            f"the campaign{suffix} | {run.mailroom.emails} | — "
            f"| {warmup.mib:.1f} → {run.memory.mib:.1f} MiB "
            f"| {run.memory.total_kib / warmup.total_kib:.3f} ({run.memory.growth(warmup):+.1%}) |"
        )
    return lines


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    from django.conf import settings

    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "processes": args.processes,
        "chunk": CHUNK,
        "raw_message_bytes": len(raw_message(0).as_bytes()),
        "mailroom_message_bytes": mailroom_message_size(campaign=False),
        "campaign_raw_message_bytes": len(raw_message(0, personal=True).as_bytes()),
        "campaign_mailroom_message_bytes": mailroom_message_size(campaign=True),
        "campaign_warmup_emails": args.warmup_emails,
        "batch_size": settings.MAILROOM_BATCH_SIZE,
        "dispatch_window": settings.MAILROOM_DISPATCH_WINDOW,
        "dispatch_interval_seconds": settings.MAILROOM_DISPATCH_INTERVAL_SECONDS,
    }


def machine_line(facts: dict[str, Any]) -> str:
    return (
        f"Machine: {facts['cpu_count']} CPU(s) ({facts['cpu']}), {facts['system']}, "
        f"Python {facts['python']}; {facts['processes']} raw smtplib process(es) and "
        f"{facts['processes']} Celery bulk worker process(es)."
    )


def legacy_report(runs: list[Run], facts: dict[str, Any]) -> list[str]:
    processes = facts["processes"]
    enqueue_seconds = statistics.median(r.mailroom.enqueue_seconds or 0.0 for r in runs)
    lines = ["## Bulk delivery: Mailroom vs raw smtplib into Postfix smtp-sink", ""]
    lines += table(
        runs,
        f"raw smtplib, {processes} process(es)",
        f"Mailroom end to end, {processes} bulk worker process(es)",
    )
    lines += [
        "",
        machine_line(facts) + f" Chunks of {facts['chunk']}.",
        f"Message size: raw {facts['raw_message_bytes']} bytes, Mailroom "
        f"{facts['mailroom_message_bytes']} bytes. Mailroom time includes enqueueing "
        f"(median {enqueue_seconds:.2f}s in .delay() calls, overlapping delivery).",
    ]
    if len(runs) > 1:
        lines.append("Median rows: median seconds; their ratio is the median of the runs' ratios.")
    return lines


def campaign_report(runs: list[Run], warmup: Memory, facts: dict[str, Any]) -> list[str]:
    emails = runs[0].mailroom.emails
    last = runs[-1].memory
    assert last is not None
    lines = [f"## Campaign: {emails:,} recipients, Mailroom vs raw smtplib into smtp-sink", ""]
    lines += campaign_table(runs, warmup, facts["processes"])
    lines += [
        "",
        machine_line(facts),
        f"Mailroom: one recipient per row, each with its own context (subject "
        f"{CAMPAIGN_SUBJECT!r}, template {CAMPAIGN_TEMPLATE!r}); the dispatcher (a "
        f"high_priority worker, beat every {facts['dispatch_interval_seconds']:g}s) feeds "
        f"batches of {facts['batch_size']} with at most {facts['dispatch_window']} batches "
        "waiting on the bulk queue. The clock starts at start_campaign() and stops when "
        "campaign_progress() counts every message sent; add_recipients() is timed apart.",
        f"Message size (user0): raw {facts['campaign_raw_message_bytes']} bytes, Mailroom "
        f"{facts['campaign_mailroom_message_bytes']} bytes (List-Unsubscribe and the link "
        "included).",
        f"Worker memory: VmRSS summed over the bulk worker's main process and its "
        f"{facts['processes']} pool process(es), after a {facts['campaign_warmup_emails']:,}"
        f"-recipient warm-up campaign: {warmup.mib:.1f} MiB; after the last {emails:,}: "
        f"{last.mib:.1f} MiB; growth {memory_verdict(last.growth(warmup))}.",
    ]
    if len(runs) > 1:
        lines.append("Median rows: median seconds; their ratio is the median of the runs' ratios.")
    return lines


def report(results: Results) -> str:
    sections = []
    if results.legacy:
        sections.append(legacy_report(results.legacy, results.facts))
    if results.campaign:
        assert results.warmup is not None
        sections.append(campaign_report(results.campaign, results.warmup, results.facts))
    return "\n\n".join("\n".join(lines) for lines in sections)


def phase_json(phase: Phase) -> dict[str, Any]:
    return asdict(phase) | {"rate": phase.rate}


def memory_json(memory: Memory) -> dict[str, Any]:
    return {"total_kib": memory.total_kib, "rss_kib_by_pid": memory.rss_kib}


def as_json(results: Results) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "delivery", "machine": results.facts}
    if results.legacy:  # the keys the legacy-only script wrote, unchanged
        runs = results.legacy
        out["runs"] = [
            {"raw": phase_json(r.raw), "mailroom": phase_json(r.mailroom), "ratio": r.ratio}
            for r in runs
        ]
        out["median_ratio"] = median_ratio(runs)
    if results.campaign:
        runs, warmup = results.campaign, results.warmup
        assert warmup is not None
        out["campaign"] = {
            "runs": [
                {
                    "raw": phase_json(r.raw),
                    "mailroom": phase_json(r.mailroom),
                    "ratio": r.ratio,
                    "memory_after": memory_json(r.memory),
                    "memory_growth": r.memory.growth(warmup),
                }
                for r in runs
                if r.memory is not None
            ],
            "median_ratio": median_ratio(runs),
            "memory_after_warmup": memory_json(warmup),
            "memory_growth_target": MEMORY_TARGET,
        }
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--scenario", choices=[*SCENARIOS, "all"], default="all", help="what to measure"
    )
    parser.add_argument("--emails", type=int, default=5000, help="emails per legacy measure")
    parser.add_argument(
        "--campaign-emails", type=int, default=20_000, help="recipients per measured campaign"
    )
    parser.add_argument(
        "--warmup-emails", type=int, default=500, help="recipients of the warm-up campaign"
    )
    parser.add_argument("--processes", type=int, default=2, help="bulk worker processes")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = (args.emails, args.campaign_emails, args.warmup_emails, args.processes, args.repeat)
    if min(counts) < 1:
        parser.error(
            "--emails, --campaign-emails, --warmup-emails, --processes and --repeat "
            "must be at least 1"
        )
    return args


@dataclass(frozen=True)
class Stack:
    """What the measures run against."""

    sink: Child
    port: int
    worker: Child  # the bulk worker
    children: list[Child]  # every Celery process: the bulk worker first


def measure(args: argparse.Namespace, logs: Path) -> Results:
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    with contextlib.ExitStack() as stack:
        sink, port = start_sink(stack, logs)
        env = app_env(port, start_redis(stack, logs))
        ensure_database(DB_NAME, env)
        setup_django(env)
        worker = start_worker(stack, env, logs, args.processes)
        children = [worker]
        if "campaign" in scenarios:
            children += start_dispatcher(stack, env, logs)
        bench = Stack(sink, port, worker, children)
        legacy: list[Run] = []
        if "legacy" in scenarios:
            legacy = [legacy_once(n, args, bench) for n in range(args.repeat)]
        warmup = None
        campaign: list[Run] = []
        if "campaign" in scenarios:
            warm = run_campaign(sink, children, args.warmup_emails, args.timeout)
            if warm.accepted != warm.emails:
                raise RuntimeError(f"warm-up: the sink accepted {warm.accepted} of {warm.emails}")
            warmup = worker_memory(worker, args.processes)
            campaign = [campaign_once(n, args, bench) for n in range(args.repeat)]
        return Results(legacy, campaign, warmup, machine_facts(args))


def legacy_once(number: int, args: argparse.Namespace, bench: Stack) -> Run:
    """Both measures; the order alternates (AB, BA...) so a drifting machine favours neither."""
    if number % 2:
        mailroom = run_mailroom(bench.sink, bench.worker, args.emails, args.timeout)
        raw = run_raw(bench.port, bench.sink, args.emails, args.processes)
    else:
        raw = run_raw(bench.port, bench.sink, args.emails, args.processes)
        mailroom = run_mailroom(bench.sink, bench.worker, args.emails, args.timeout)
    run = Run(raw, mailroom)
    check(run)
    return run


def campaign_once(number: int, args: argparse.Namespace, bench: Stack) -> Run:
    """As ``legacy_once``; the bulk worker's memory is read right after the campaign."""
    emails = args.campaign_emails

    def mailroom() -> tuple[Phase, Memory]:
        phase = run_campaign(bench.sink, bench.children, emails, args.timeout)
        return phase, worker_memory(bench.worker, args.processes)

    if number % 2:
        phase, memory = mailroom()
        raw = run_raw(bench.port, bench.sink, emails, args.processes, personal=True)
    else:
        raw = run_raw(bench.port, bench.sink, emails, args.processes, personal=True)
        phase, memory = mailroom()
    run = Run(raw, phase, memory)
    check(run)
    return run


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def measured(args: argparse.Namespace) -> Results | None:
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
    results = measured(args)
    if results is None:
        return 130
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(as_json(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
