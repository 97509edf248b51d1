"""API throughput: ``POST /api/v1/messages`` against a trivial Django JSON view, one run.

The trivial view and the API are served by the same gunicorn (``deploy/gunicorn.conf.py``,
sync workers, the product's settings and middleware) and driven by the same load:
``--clients`` concurrent clients (default 16), each sending one request after another
for ``--seconds`` after a warm-up. The trivial view is ``GET /healthz``, which returns
``{"status": "ok"}`` and touches neither Postgres nor Redis. The API request is the real
thing: key look-up and per-key rate check, validation, template check, the ``Message``
row committed, the delivery task queued in Redis (no Celery worker runs, so tasks just
wait there).

A third measure, the floor, is a bench-only view (``bench/api_floor/``, mounted only in
this script's gunicorn) that parses the same body, commits one outbox row with a raw
``INSERT`` and does one ``LPUSH``: the least any accept that stores the message before
answering must do. Its ratio is an upper bound for the API's on the machine at hand.

The clients are threads spread over ``--client-processes`` processes (plain
``http.client``, a new connection per request since gunicorn's sync workers close it),
so that the load generator is not the bottleneck. Latency is measured per request at
the client, connection included.

It also reads, from /proc, the CPU that the gunicorn processes, this run's redis-server
and the Postgres backends of the bench database spent during each measured window, and
prints it per request: on a small machine the ratio is a CPU budget, and that table says
who spends it.

It uses a private database (``mailroom_bench_api``, created and migrated if missing,
kept between runs, its messages truncated before each measure) and a private
redis-server on a free port. Every process it starts is stopped on the way out.
Run ``make bench`` or ``.venv/bin/python bench/api.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue as MPQueue
from pathlib import Path
from types import FrameType
from typing import Any

from bench import benchlib
from bench.benchlib import Child, ensure_database, free_port, setup_django, wait_until

REPO = Path(__file__).resolve().parents[1]

APP_DIR = REPO / "services" / "mailroom"
FLOOR_DIR = Path(__file__).resolve().parent / "api_floor"
PG_URL = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "mailroom_bench_api"
TARGET = 0.5  # the API may cost at most twice the trivial view per request
WARMUP_SECONDS = 2.0
SEND_BODY = json.dumps(
    {
        "to": "reader@example.com",
        "subject": "Welcome aboard",
        "template": "welcome",
        "context": {"name": "Ann", "action_url": "https://app.example.com/start"},
    }
).encode()


@dataclass(frozen=True)
class Target:
    """One endpoint under load."""

    label: str
    method: str
    path: str
    expect: int
    body: bytes | None = None


@dataclass(frozen=True)
class Phase:
    """One timed measurement."""

    requests: int  # completed inside the measured window
    seconds: float
    p50_ms: float
    p99_ms: float
    answered: int  # every answer with the expected status, warm-up included
    # CPU milliseconds per measured request, by process group (see cpu_seconds)
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True)
class Run:
    trivial: Phase
    api: Phase
    floor: Phase

    @property
    def ratio(self) -> float:
        return self.api.rate / self.trivial.rate

    @property
    def floor_ratio(self) -> float:
        return self.floor.rate / self.trivial.rate


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def answers(child: Child, port: int) -> bool:
    """The server answers ``/healthz`` (its workers are up, not only its socket)."""
    child.check_alive()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# CPU accounting: where each request's CPU goes
# --------------------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Sessions:
    """The process sessions (start_new_session) of the servers this run started."""

    web: int = 0
    redis: int = 0


SESSIONS = Sessions()


def _proc_stat(pid: str) -> tuple[int, float, str] | None:
    """(session id, user+system CPU seconds, command line) of a process, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "(comm)": state is field 3
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / TICKS, cmdline


def cpu_seconds() -> dict[str, float]:
    """CPU used so far by the gunicorn workers and master, this run's redis-server and
    the Postgres backends connected to the bench database (not Postgres' shared WAL
    writer or checkpointer, nor the load generator). Linux only; empty elsewhere."""
    totals = {"web": 0.0, "postgres": 0.0, "redis": 0.0}
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        found = _proc_stat(entry.name)
        if found is None:
            continue
        session, seconds, cmdline = found
        if SESSIONS.web and session == SESSIONS.web:
            totals["web"] += seconds
        elif SESSIONS.redis and session == SESSIONS.redis:
            totals["redis"] += seconds
        elif cmdline.startswith("postgres: ") and f" {DB_NAME} " in cmdline:
            totals["postgres"] += seconds
    return totals


def start_redis(stack: contextlib.ExitStack, logs: Path) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(logs)]
    server = Child("redis-server", argv, logs / "redis.log", dict(os.environ)).start()
    stack.callback(server.stop)
    assert server.proc is not None
    SESSIONS.redis = server.proc.pid

    def pings() -> bool:
        server.check_alive()
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(pings, 10, "redis-server to listen")
    return f"redis://127.0.0.1:{port}/0"


def app_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
            "REDIS_URL": redis_url,
            "SECRET_KEY": "bench",
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py makes a private one
    return env


def start_web(stack: contextlib.ExitStack, env: dict[str, str], logs: Path, workers: int) -> int:
    """gunicorn as deployed (deploy/start-web.sh, sync workers), without access log.

    Its settings are the product's plus one bench-only URL, ``/bench/floor``
    (bench/api_floor/): the same server answers the trivial view, the API and the floor.
    """
    env = {
        **env,
        "DJANGO_SETTINGS_MODULE": "floor_settings",
        "PYTHONPATH": os.pathsep.join(p for p in (str(FLOOR_DIR), env.get("PYTHONPATH")) if p),
    }
    port = free_port()
    web = benchlib.web("gunicorn", logs / "web.log", env, port, workers, access_log="").start()
    stack.callback(web.stop)
    assert web.proc is not None
    SESSIONS.web = web.proc.pid
    wait_until(lambda: answers(web, port), 60, "gunicorn to answer /healthz")
    return port


# --------------------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------------------


def truncate_messages() -> None:
    from django.db import connection

    from email_service.models import DeliveryAttempt, Message

    tables = [m._meta.db_table for m in (DeliveryAttempt, Message)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


def bench_key() -> str:
    """A fresh ``send`` key whose rate limit is never reached (it is still checked)."""
    from email_service import services
    from email_service.models import ApiKey

    ApiKey.objects.filter(name="bench-api").delete()
    _, key = services.create_api_key("bench-api", ["send"], rate_limit_per_minute=10**9)
    return key


def message_count() -> int:
    from email_service.models import Message

    return Message.objects.count()


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Requests that start at or after ``start`` and end by ``end`` (time.time()) count."""

    start: float
    end: float


@dataclass
class Tally:
    latencies: list[float]
    answered: int = 0
    errors: int = 0
    first_error: str = ""


def one_request(port: int, target: Target, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(target.method, target.path, body=target.body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def client_loop(
    port: int, target: Target, headers: dict[str, str], window: Window, tally: Tally
) -> None:
    """One client: requests back to back until the window closes (its own tally)."""
    while True:
        began = time.time()
        if began >= window.end:
            return
        try:
            status, body = one_request(port, target, headers)
        except OSError as exc:
            status, body = 0, repr(exc).encode()
        ended = time.time()
        if status != target.expect:
            tally.errors += 1
            tally.first_error = tally.first_error or f"{status}: {body[:300]!r}"
            continue
        tally.answered += 1
        if began >= window.start and ended <= window.end:
            tally.latencies.append(ended - began)


def client_process(
    port: int,
    target: Target,
    headers: dict[str, str],
    threads: int,
    go: MPQueue[Window],
    results: MPQueue[Tally],
) -> None:
    """``threads`` clients in one process; waits for the window, reports one tally."""
    window = go.get()
    tallies = [Tally(latencies=[]) for _ in range(threads)]
    workers = [
        threading.Thread(target=client_loop, args=(port, target, headers, window, tally))
        for tally in tallies
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(
        Tally(
            latencies=[x for t in tallies for x in t.latencies],
            answered=sum(t.answered for t in tallies),
            errors=sum(t.errors for t in tallies),
            first_error=next((t.first_error for t in tallies if t.first_error), ""),
        )
    )


def spread(clients: int, processes: int) -> list[int]:
    """``clients`` threads over at most ``processes`` processes, as evenly as possible."""
    processes = min(processes, clients)
    return [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def run_load(port: int, target: Target, key: str, args: argparse.Namespace) -> Phase:
    context = multiprocessing.get_context("spawn")
    go: MPQueue[Window] = context.Queue()
    results: MPQueue[Tally] = context.Queue()
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
    if target.body is not None:
        headers["Content-Type"] = "application/json"
    shares = spread(args.clients, args.client_processes)
    procs = [
        context.Process(target=client_process, args=(port, target, headers, n, go, results))
        for n in shares
    ]
    for proc in procs:
        proc.start()
    start = time.time() + 1.0 + args.warmup  # a second for the clients to start
    window = Window(start, start + args.seconds)
    for _ in procs:
        go.put(window)
    time.sleep(max(0.0, window.start - time.time()))
    cpu_before = cpu_seconds()
    time.sleep(max(0.0, window.end - time.time()))
    cpu_after = cpu_seconds()
    tallies = [results.get(timeout=args.seconds + args.warmup + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = sum(t.errors for t in tallies)
    if errors:
        first = next(t.first_error for t in tallies if t.first_error)
        raise RuntimeError(f"{target.label}: {errors} unexpected answer(s), e.g. {first}")
    latencies = sorted(x for t in tallies for x in t.latencies)
    if not latencies:
        raise RuntimeError(f"{target.label}: no request completed in the window")
    return Phase(
        requests=len(latencies),
        seconds=args.seconds,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        answered=sum(t.answered for t in tallies),
        cpu_ms={
            name: (cpu_after[name] - cpu_before[name]) * 1000 / len(latencies) for name in cpu_after
        },
    )


TRIVIAL = Target("trivial Django JSON view: GET /healthz", "GET", "/healthz", 200)
SEND = Target("API: POST /api/v1/messages", "POST", "/api/v1/messages", 202, SEND_BODY)
FLOOR = Target(
    "floor: one raw INSERT + one LPUSH (bench-only view)", "POST", "/bench/floor", 202, SEND_BODY
)


def measure_writes(port: int, target: Target, key: str, args: argparse.Namespace) -> Phase:
    """A measure of a view that stores a message: every 202 must have left its row."""
    truncate_messages()
    phase = run_load(port, target, key, args)
    stored = message_count()
    if stored != phase.answered:
        raise RuntimeError(
            f"{target.label}: {phase.answered} requests answered 202 but {stored} rows stored"
        )
    return phase


def run_once(number: int, port: int, key: str, args: argparse.Namespace) -> Run:
    """The three measures; the order rotates between runs (TAF, AFT, FTA) so that a
    drifting machine favours none of them."""
    measures = {
        "trivial": lambda: run_load(port, TRIVIAL, key, args),
        "api": lambda: measure_writes(port, SEND, key, args),
        "floor": lambda: measure_writes(port, FLOOR, key, args),
    }
    names = list(measures)
    shift = number % len(names)
    phases = {name: measures[name]() for name in names[shift:] + names[:shift]}
    return Run(phases["trivial"], phases["api"], phases["floor"])


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def row(label: str, clients: int, phase: Phase, ratio: float) -> str:
    return (
        f"| {label} | {clients} | {phase.requests:,} | {phase.seconds:.0f} | {phase.rate:,.0f} "
        f"| {phase.p50_ms:.1f} | {phase.p99_ms:.1f} | {ratio:.2f} |"
    )


def median_phase(phases: list[Phase]) -> Phase:
    return Phase(
        requests=round(statistics.median(p.requests for p in phases)),
        seconds=phases[0].seconds,
        p50_ms=statistics.median(p.p50_ms for p in phases),
        p99_ms=statistics.median(p.p99_ms for p in phases),
        answered=round(statistics.median(p.answered for p in phases)),
        cpu_ms={
            name: statistics.median(p.cpu_ms.get(name, 0.0) for p in phases)
            for name in phases[0].cpu_ms
        },
    )


def table(runs: list[Run], clients: int) -> list[str]:
    lines = [
        "| measure | clients | requests | seconds | requests/s | p50 ms | p99 ms "
        "| ratio vs trivial |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, run in enumerate(runs, 1):
        suffix = f" (run {number})" if len(runs) > 1 else ""
        lines.append(row(TRIVIAL.label + suffix, clients, run.trivial, 1.0))
        lines.append(row(SEND.label + suffix, clients, run.api, run.ratio))
        lines.append(row(FLOOR.label + suffix, clients, run.floor, run.floor_ratio))
    if len(runs) > 1:
        ratio = statistics.median(r.ratio for r in runs)
        floor_ratio = statistics.median(r.floor_ratio for r in runs)
        lines.append(
            row(f"median: {TRIVIAL.label}", clients, median_phase([r.trivial for r in runs]), 1.0)
        )
        lines.append(
            row(f"median: {SEND.label}", clients, median_phase([r.api for r in runs]), ratio)
        )
        lines.append(
            row(
                f"median: {FLOOR.label}",
                clients,
                median_phase([r.floor for r in runs]),
                floor_ratio,
            )
        )
    return lines


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def facts(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "clients": args.clients,
        "client_processes": len(spread(args.clients, args.client_processes)),
        "web_workers": args.web_workers,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "send_body_bytes": len(SEND_BODY),
    }


def report(runs: list[Run], machine: dict[str, Any]) -> str:
    ratio = statistics.median(r.ratio for r in runs)
    floor_ratio = statistics.median(r.floor_ratio for r in runs)
    verdict = "meets" if ratio >= TARGET else "MISSES"
    lines = ["## API: POST /api/v1/messages vs a trivial Django JSON view, same gunicorn", ""]
    lines += table(runs, machine["clients"])
    lines += [
        "",
        f"Ratio {ratio:.2f}: {verdict} the target ≥ {TARGET}.",
        f"Floor {floor_ratio:.2f}: a view that only commits one outbox row (raw SQL) and "
        "writes one Redis entry, nothing else; no accept that stores the message before "
        f"answering can beat it on this machine ({ratio / floor_ratio:.0%} of it reached).",
        f"Machine: {machine['cpu_count']} CPU(s) ({machine['cpu']}), {machine['system']}, "
        f"Python {machine['python']}. gunicorn: {machine['web_workers']} sync worker(s), "
        f"deploy/gunicorn.conf.py. Load: {machine['clients']} clients in "
        f"{machine['client_processes']} process(es), {machine['seconds']:g} s measured after "
        f"{machine['warmup_seconds']:g} s of warm-up, a new connection per request.",
    ]
    if len(runs) > 1:
        lines.append("Median rows: median of each column; their ratio is the median of the runs'.")
    lines += ["", *cpu_table(runs)]
    return "\n".join(lines)


def cpu_table(runs: list[Run]) -> list[str]:
    """Server-side CPU per request (medians over the runs), the reason for the ratio."""
    trivial = median_phase([r.trivial for r in runs]).cpu_ms
    api = median_phase([r.api for r in runs]).cpu_ms
    if not trivial or not api:
        return []
    names = ["web", "postgres", "redis"]
    lines = [
        "CPU per request, ms (median of runs; the load generator, the kernel's work for "
        "other processes and Postgres' shared WAL writer are not counted):",
        "",
        "| measure | gunicorn | Postgres backends | Redis | total |",
        "|---|---:|---:|---:|---:|",
    ]
    floor = median_phase([r.floor for r in runs]).cpu_ms
    for label, cpu in ((TRIVIAL.label, trivial), (SEND.label, api), (FLOOR.label, floor)):
        cells = " | ".join(f"{cpu.get(n, 0.0):.2f}" for n in names)
        lines.append(f"| {label} | {cells} | {sum(cpu.get(n, 0.0) for n in names):.2f} |")
    return lines


def as_json(runs: list[Run], machine: dict[str, Any]) -> dict[str, Any]:
    return {
        "facts": machine,
        "runs": [
            {
                "trivial": asdict(r.trivial),
                "api": asdict(r.api),
                "floor": asdict(r.floor),
                "ratio": r.ratio,
                "floor_ratio": r.floor_ratio,
            }
            for r in runs
        ],
        "median_ratio": statistics.median(r.ratio for r in runs),
        "median_floor_ratio": statistics.median(r.floor_ratio for r in runs),
        "target": TARGET,
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument(
        "--client-processes", type=int, default=4, help="processes the clients are spread over"
    )
    parser.add_argument(
        "--web-workers",
        type=int,
        default=2 * (os.cpu_count() or 1) + 1,
        help="gunicorn sync workers (default: 2 x CPUs + 1, gunicorn's advice)",
    )
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per phase")
    parser.add_argument(
        "--warmup", type=float, default=WARMUP_SECONDS, help="unmeasured seconds per phase"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs (each measures both)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.clients, args.client_processes, args.web_workers, args.repeat) < 1:
        parser.error("--clients, --client-processes, --web-workers and --repeat must be at least 1")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    return args


def measure(args: argparse.Namespace, logs: Path) -> list[Run]:
    with contextlib.ExitStack() as stack:
        env = app_env(start_redis(stack, logs))
        ensure_database(DB_NAME, env)
        setup_django(env)
        key = bench_key()
        port = start_web(stack, env, logs, args.web_workers)
        return [run_once(n, port, key, args) for n in range(args.repeat)]


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def measured(args: argparse.Namespace) -> list[Run] | None:
    """``measure`` with its logs removed afterwards, or kept when something failed."""
    logs = Path(tempfile.mkdtemp(prefix="mailroom-bench-api-"))
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
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    runs = measured(args)
    if runs is None:
        return 130
    machine = facts(args)
    print(report(runs, machine))
    if args.json:
        args.json.write_text(json.dumps(as_json(runs, machine), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
