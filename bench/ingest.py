"""Recipients ingestion: ``ingest_csv`` against a raw ``COPY`` of the same CSV, in one run.

It writes a CSV (``email`` + 2 context columns) to a temporary file, then per run:

1. raw COPY: the file streamed into ``COPY scratch FROM STDIN (FORMAT csv, HEADER)``, a
   table with one text column per CSV column and no index: no validation, nothing else;
2. Mailroom: ``ingest_csv(campaign, file)`` into a fresh campaign: validation, context,
   suppression list, dedupe, the outbox's indexes and its counting trigger;
3. (diagnostic, not a baseline) the database's share alone: the same ``INSERT ... SELECT``
   that ``ingest_csv`` runs per chunk, once over the rows that step 1 loaded;
4. (diagnostic, not a baseline) the Python share alone: ``ingest_csv``'s own reader over
   the file (decode, parse, check every address, the CSV text for COPY), no database.

``ingest_csv`` overlaps its Python share with the database's (a reader thread feeds the
writer), so its rate cannot exceed the slower of the two shares: their ratios are upper
bounds for the ingest's.

It uses a private database (``mailroom_bench_ingest``, kept between runs; its tables are
truncated before each measure and at the end). Run ``.venv/bin/python bench/ingest.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench.benchlib import ensure_database, setup_django

REPO = Path(__file__).resolve().parents[1]

APP_DIR = REPO / "services" / "mailroom"
PG_URL = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "mailroom_bench_ingest"
DOMAINS = ("example.com", "example.org", "mail.example.net", "Example.co.uk", "corp.example")
CITIES = ("Lisbon", "Porto", "Zürich", "São Paulo", "Köln", "Oslo", "Kraków", "Tromsø")
SUPPRESS_EVERY = 100  # every 100th address is on the suppression list
COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class Phase:
    """One timed measurement."""

    rows: int
    seconds: float
    rss_growth_kib: int | None = None  # ingest only: peak RSS growth of this process

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


@dataclass(frozen=True)
class Run:
    raw: Phase
    ingest: Phase
    database: Phase | None
    python: Phase

    @property
    def ratio(self) -> float:
        return self.ingest.rate / self.raw.rate


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


def address(n: int) -> str:
    return f"user{n}@{DOMAINS[n % len(DOMAINS)]}"


def write_csv(path: Path, rows: int) -> None:
    """Streamed: the generator never holds the rows."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["email", "first_name", "city"])
        for n in range(rows):
            writer.writerow([address(n), f"Name{n}", CITIES[n % len(CITIES)]])


def app_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
            "SECRET_KEY": "bench",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "localhost",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
        }
    )
    return env


def truncate_tables() -> None:
    from django.db import connection

    from email_service.models import Campaign, Message

    tables = ", ".join(m._meta.db_table for m in (Message, Campaign))
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} CASCADE")
        cursor.execute("DROP TABLE IF EXISTS scratch")


def seed_suppressions(rows: int) -> int:
    """Every SUPPRESS_EVERY-th address of the file is on the suppression list. Written by
    the server, so that this process's peak RSS before the first ingest is Django's."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE email_service_suppression")
        cursor.execute(
            """INSERT INTO email_service_suppression (address, reason, detail, created_at)
                SELECT lower('user' || n || '@' || (%s::text[])[n %% %s + 1]), 'manual', '', now()
                  FROM generate_series(0, %s - 1, %s) AS n""",
            [list(DOMAINS), len(DOMAINS), rows, SUPPRESS_EVERY],
        )
        return cursor.rowcount


def new_campaign(name: str) -> Any:
    from email_service.models import Campaign

    return Campaign.objects.create(
        name=name,
        subject="Hello {{ first_name }}",
        template="newsletter",
        from_email="News <news@mailroom.example.com>",
    )


# --------------------------------------------------------------------------------------
# The measures
# --------------------------------------------------------------------------------------


def run_raw(path: Path, rows: int) -> Phase:
    """COPY of the file's bytes into an unindexed table, committed."""
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS scratch")
        cursor.execute("CREATE TABLE scratch (c0 text, c1 text, c2 text, line bigint)")
    started = time.perf_counter()
    with transaction.atomic(), path.open("rb") as data:
        copy_sql = "COPY scratch (c0, c1, c2) FROM STDIN (FORMAT csv, HEADER true)"
        with connection.connection.cursor() as cursor, cursor.copy(copy_sql) as copy:
            while block := data.read(COPY_BLOCK):
                copy.write(block)
    seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM scratch")
        copied = cursor.fetchone()[0]
    if copied != rows:
        raise RuntimeError(f"raw COPY loaded {copied} of {rows} rows")
    return Phase(rows, seconds)


def run_ingest(path: Path, rows: int, suppressed: int) -> Phase:
    """``ingest_csv`` into a fresh campaign of an empty outbox, committed."""
    from email_service.ingest import ingest_csv

    truncate_outbox()
    campaign = new_campaign("bench ingest")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with path.open("rb") as data:
        report = ingest_csv(campaign, data)
    seconds = time.perf_counter() - started
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    expected = (rows - suppressed, suppressed, 0, 0, True)
    got = (report.accepted, report.suppressed, report.duplicates, report.invalid, report.stored)
    if got != expected:
        raise RuntimeError(f"ingest_csv reported {got}, expected {expected}: {report.errors[:5]}")
    check_stored(campaign, rows)
    return Phase(rows, seconds, growth)


def run_database(rows: int) -> Phase:
    """The INSERT ... SELECT of ingest_csv, once over the scratch table: no Python at all."""
    from django.db import connection, transaction
    from psycopg import sql

    from email_service import ingest

    truncate_outbox()
    campaign = new_campaign("bench database share")
    layout = ingest._csv_layout(["email", "first_name", "city"])
    insert = ingest._insert_sql(sql.Identifier("scratch"), layout)
    params = [*ingest._constants(campaign), *layout.context_params]
    started = time.perf_counter()
    with transaction.atomic(), connection.connection.cursor() as cursor:
        cursor.execute(insert, params)
        inserted = cursor.fetchone()[0]
    seconds = time.perf_counter() - started
    if inserted != rows:
        raise RuntimeError(f"the INSERT ... SELECT stored {inserted} of {rows} rows")
    return Phase(rows, seconds)


def run_python(path: Path, rows: int) -> Phase:
    """ingest_csv's reader alone: every row read, checked and written as COPY text."""
    from email_service import ingest

    started = time.perf_counter()
    with path.open("rb") as data:
        reader = ingest._CsvReader(data)
        try:
            prepared = [(chunk.count, len(chunk.errors)) for chunk in reader.prepared()]
        finally:
            reader.close()
    seconds = time.perf_counter() - started
    kept, refused = sum(c for c, _ in prepared), sum(e for _, e in prepared)
    if (kept, refused) != (rows, 0):
        raise RuntimeError(f"the reader kept {kept} and refused {refused} of {rows} rows")
    return Phase(rows, seconds)


def truncate_outbox() -> None:
    from django.db import connection

    from email_service.models import Campaign, Message

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {Message._meta.db_table}, {Campaign._meta.db_table} CASCADE")
        cursor.execute("CHECKPOINT")  # each measure starts without the last one's dirty pages


def check_stored(campaign: Any, rows: int) -> None:
    from email_service.models import CampaignCount, Message

    stored = Message.objects.filter(campaign=campaign).count()
    counted = sum(CampaignCount.objects.filter(campaign=campaign).values_list("count", flat=True))
    if stored != rows or counted != rows:
        raise RuntimeError(f"{stored} messages stored and {counted} counted, expected {rows}")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def row(label: str, phase: Phase, ratio: float) -> str:
    return f"| {label} | {phase.rows:,} | {phase.seconds:.2f} | {phase.rate:,.0f} | {ratio:.3f} |"


def median_phase(phases: list[Phase]) -> Phase:
    return Phase(phases[0].rows, statistics.median(p.seconds for p in phases))


def table(runs: list[Run]) -> list[str]:
    lines = [
        "| measure | rows | seconds | rows/s | ratio vs raw COPY |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = (
        "raw COPY into an unindexed table",
        "Mailroom ingest_csv",
        "database share alone",
        "Python share alone",
    )
    for number, run in enumerate(runs, 1):
        suffix = f" (run {number})" if len(runs) > 1 else ""
        lines.append(row(labels[0] + suffix, run.raw, 1.0))
        lines.append(row(labels[1] + suffix, run.ingest, run.ratio))
        if run.database is not None:
            lines.append(row(labels[2] + suffix, run.database, run.database.rate / run.raw.rate))
        lines.append(row(labels[3] + suffix, run.python, run.python.rate / run.raw.rate))
    if len(runs) > 1:
        raw = median_phase([r.raw for r in runs])
        lines.append(row(f"median: {labels[0]}", raw, 1.0))
        lines.append(
            row(f"median: {labels[1]}", median_phase([r.ingest for r in runs]), ratio(runs))
        )
        shares = [r.database for r in runs if r.database is not None]
        if shares:
            database = median_phase(shares)
            lines.append(row(f"median: {labels[2]}", database, database.rate / raw.rate))
        python = median_phase([r.python for r in runs])
        lines.append(row(f"median: {labels[3]}", python, python.rate / raw.rate))
    return lines


def ratio(runs: list[Run]) -> float:
    return statistics.median(r.ratio for r in runs)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def report(runs: list[Run], facts: dict[str, Any]) -> str:
    growth = max(r.ingest.rss_growth_kib or 0 for r in runs) / 1024
    lines = ["## Recipients ingestion: ingest_csv vs raw COPY", ""]
    lines += table(runs)
    lines += [
        "",
        f"Machine: {facts['cpu_count']} CPU(s) ({facts['cpu']}), {facts['system']}, Python "
        f"{facts['python']}, PostgreSQL {facts['postgres']}. File: {facts['rows']:,} rows, "
        f"{facts['file_mib']:.1f} MiB; {facts['suppressed']:,} of its addresses suppressed.",
        f"Peak RSS of the ingesting process grew by {growth:.1f} MiB during ingest_csv "
        f"(peak {facts['peak_rss_mib']:.0f} MiB at the end).",
        "The shares are diagnostics, not baselines. Database: the outbox INSERT alone, the "
        "ceiling for any ingest into this schema. Python: ingest_csv's reader alone (decode, "
        "parse, check each address, COPY text), no database. ingest_csv overlaps the two, "
        "so its ratio cannot exceed the smaller of theirs.",
    ]
    if len(runs) > 1:
        lines.append("Median rows: median seconds; their ratio is the median of the runs' ratios.")
    return "\n".join(lines)


def facts(args: argparse.Namespace, path: Path, suppressed: int) -> dict[str, Any]:
    from django.db import connection

    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgres": connection.cursor().connection.info.parameter_status("server_version"),
        "rows": args.rows,
        "file_mib": path.stat().st_size / 2**20,
        "suppressed": suppressed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def as_json(runs: list[Run], facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": "ingest",
        "machine": facts,
        "runs": [
            {
                "raw": asdict(r.raw) | {"rate": r.raw.rate},
                "ingest": asdict(r.ingest) | {"rate": r.ingest.rate},
                "database": None if r.database is None else asdict(r.database),
                "python": asdict(r.python),
                "ratio": r.ratio,
                "database_ratio": None if r.database is None else r.database.rate / r.raw.rate,
                "python_ratio": r.python.rate / r.raw.rate,
            }
            for r in runs
        ],
        "median_ratio": ratio(runs),
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=200_000, help="CSV rows per measure")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every measure")
    parser.add_argument(
        "--no-database-share", action="store_true", help="skip the diagnostic INSERT ... SELECT"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.rows, args.repeat) < 1:
        parser.error("--rows and --repeat must be at least 1")
    return args


def run_once(number: int, args: argparse.Namespace, path: Path, suppressed: int) -> Run:
    """Every measure; raw and ingest alternate (AB, BA...) so a drifting machine favours
    neither. The database share needs the scratch table, so it follows the raw COPY."""
    database = None
    if number % 2:
        ingest = run_ingest(path, args.rows, suppressed)
        raw = run_raw(path, args.rows)
    else:
        raw = run_raw(path, args.rows)
    if not args.no_database_share:
        database = run_database(args.rows)
    if not number % 2:
        ingest = run_ingest(path, args.rows, suppressed)
    return Run(raw, ingest, database, run_python(path, args.rows))


def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[Run], dict[str, Any]]:
    path = workdir / "recipients.csv"
    write_csv(path, args.rows)
    env = app_env()
    ensure_database(DB_NAME, env)
    setup_django(env)
    truncate_tables()
    suppressed = seed_suppressions(args.rows)
    try:
        runs = [run_once(n, args, path, suppressed) for n in range(args.repeat)]
        return runs, facts(args, path, suppressed)
    finally:
        truncate_tables()


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="mailroom-bench-ingest-"))
    try:
        runs, figures = measure(args, workdir)
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(runs, figures))
    if args.json:
        args.json.write_text(json.dumps(as_json(runs, figures), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
