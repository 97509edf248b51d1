"""The chaos scenario: a campaign per fault, a trickle of transactional mail, the table.

Each fault is one phase. A phase starts a campaign of its own share of the recipients
(addresses ``c<n>@<fault>.example.com``), waits until it is under way, injects the fault
while it drains (the fault's window), then waits until every row of the campaign is
settled in Postgres and counts what the SMTP sink received. A transactional email is sent
through the HTTP API every ``TRICKLE_SECONDS`` for the whole run; each belongs to the
phase in which the API accepted it, and its latency is from the API's answer to the
sink's acceptance.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.stack import BULK_CONCURRENCY, HIGH_CONCURRENCY, LANES, Stack
from mailroom_testkit.processes import wait_until

TRICKLE_SECONDS = 0.5
# A worker process holds at most LANES + 1 deliveries that the relay accepted and Postgres
# has not recorded: one on the wire per lane, and one whose record is committing while the
# next conversations run (services.delivery._BatchRun pipelines the record). A process
# that dies there sends those again after their lease expires.
IN_FLIGHT_PER_PROCESS = LANES + 1
ALL_PROCESSES = 2 * BULK_CONCURRENCY + HIGH_CONCURRENCY


class Api:
    """The HTTP API as a client sees it."""

    def __init__(self, port: int, key: str) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.key = key

    def call(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 (a loopback URL of our own)
            self.base + path, data=data, method=method
        )
        request.add_header("Authorization", f"Bearer {self.key}")
        request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    def must(self, method: str, path: str, body: object = None) -> Any:
        status, answer = self.call(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer


@dataclass
class TxMessage:
    address: str
    phase: str
    accepted_at: float


class Trickle(threading.Thread):
    """A steady stream of transactional email, retried by the client (with the same
    Idempotency-Key) until the API accepts it, as a careful client does."""

    def __init__(self, api: Api) -> None:
        super().__init__(name="trickle", daemon=True)
        self.api = api
        self.phase = "start"
        self.sent: list[TxMessage] = []
        self.refused: Counter[str] = Counter()  # answers other than 2xx, by phase
        self.stopping = threading.Event()
        self.tag = uuid.uuid4().hex[:6]  # runs against one sink never share an address

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            number += 1
            self._send(f"tx{number}-{self.tag}@transactional.example.com")
            self.stopping.wait(TRICKLE_SECONDS)

    def _send(self, address: str) -> None:
        body = {"to": address, "subject": "Your code", "template": "welcome"}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        while not self.stopping.is_set():
            phase = self.phase
            status, _ = self.api.call("POST", "/messages", body, headers)
            if 200 <= status < 300:
                self.sent.append(TxMessage(address, phase, time.monotonic()))
                return
            self.refused[phase] += 1
            self.stopping.wait(0.5)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


@dataclass
class Context:
    stack: Stack
    api: Api
    trickle: Trickle
    scale: float  # multiplies every fault window
    settle_timeout: float
    log: Callable[[str], None] = print


@dataclass
class Injected:
    """What a fault did: the duplicates it may cause, and why."""

    bound: int = 0
    why: str = ""


@dataclass
class Row:
    fault: str
    window: float
    expected: int
    delivered: int
    lost: int
    duplicated: int
    bound: int
    why: str
    worst_latency: float | None
    refused: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated <= self.bound


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


def kill_bulk_workers(ctx: Context, window: float) -> Injected:
    """SIGKILL a bulk worker (main process and pool) every few seconds, then restart it."""
    deadline = time.monotonic() + window
    kills = 0
    while time.monotonic() < deadline:
        name = f"worker-bulk-{kills % 2 + 1}"
        with ctx.stack.lock:
            ctx.stack.roles[name].kill()
            kills += 1
            time.sleep(0.5)
            ctx.stack.start_role(name)
        time.sleep(2)
    processes = kills * BULK_CONCURRENCY
    return Injected(
        processes * IN_FLIGHT_PER_PROCESS,
        f"{kills} SIGKILLs x {BULK_CONCURRENCY} pool processes x "
        f"{IN_FLIGHT_PER_PROCESS} in flight (accepted by the relay, not yet recorded)",
    )


def restart_redis(ctx: Context, window: float, wipe: bool) -> Injected:
    """Stop redis-server (SIGTERM: the AOF is flushed), optionally delete its files, start
    it again on the same port. Workers reconnect; a wiped queue is refilled by the sweeper."""
    started = time.monotonic()
    ctx.stack.redis.stop()
    if wipe:
        ctx.stack.redis.wipe()
    time.sleep(1)
    ctx.stack.redis.start()
    time.sleep(max(0.0, window - (time.monotonic() - started)))
    return Injected(
        ALL_PROCESSES * IN_FLIGHT_PER_PROCESS,
        f"tasks cancelled on broker connection loss: {ALL_PROCESSES} worker processes x "
        f"{IN_FLIGHT_PER_PROCESS} in flight",
    )


def stop_postgres(ctx: Context, window: float) -> Injected:
    """pg_ctl stop -m fast, half the window (10 s) without a database, start again."""
    ctx.stack.postgres.stop()
    time.sleep(window / 2)
    ctx.stack.postgres.start()
    time.sleep(window / 2)
    return Injected(
        ALL_PROCESSES * IN_FLIGHT_PER_PROCESS,
        f"records that could not be written: {ALL_PROCESSES} worker processes x "
        f"{IN_FLIGHT_PER_PROCESS} in flight",
    )


def smtp_down(ctx: Context, window: float) -> Injected:
    """Every new SMTP connection is cut at once, for the window (60 s)."""
    ctx.stack.sink.set_down(True)
    time.sleep(window)
    ctx.stack.sink.set_down(False)
    return Injected()


def smtp_try_later(ctx: Context, window: float) -> Injected:
    """For a while, one message in five is refused: 421 or 451, alternately."""
    until = time.monotonic() + window

    def rule(number: int, _rcpt: str) -> str | None:
        if time.monotonic() > until or number % 5:
            return None
        return "421 4.7.0 Try again later" if number % 10 else "451 4.3.0 Try again later"

    ctx.stack.sink.add_rule(rule)
    time.sleep(max(0.0, until - time.monotonic()))
    return Injected()


def smtp_drop(ctx: Context, window: float) -> Injected:
    """Connections dropped mid-DATA (before acceptance: nothing may be duplicated) and a
    few right after acceptance (the relay has the message, we never hear its 250)."""
    sink = ctx.stack.sink
    first = sink.data_commands + 1
    span = 5000
    before = sink.dropped_after_accept
    sink.drop_connection_at(*range(first, first + span, 13))
    sink.drop_after_accepting_at(*range(first + 50, first + span, 97))
    time.sleep(window)
    with sink.lock:  # the rest of the planned drops never happen
        sink.state.drop_at.clear()
        sink.state.drop_after_accept_at.clear()
    dropped = sink.dropped_after_accept - before
    return Injected(dropped, f"{dropped} connection(s) dropped after the relay accepted DATA")


def pause_resume(ctx: Context, window: float, campaign: str) -> Injected:
    """Pause and resume the campaign through the API, again and again (every 1.5 s)."""
    for _ in range(max(2, round(window / 3))):
        ctx.api.must("POST", f"/campaigns/{campaign}/pause")
        time.sleep(1.5)
        ctx.api.must("POST", f"/campaigns/{campaign}/resume")
        time.sleep(1.5)
    return Injected()


Inject = Callable[[Context, float, str], Injected]


@dataclass(frozen=True)
class Fault:
    key: str
    title: str
    window: float  # seconds at --scale 1
    least: float  # the shortest window a small scale may give
    inject: Inject


FAULTS = (
    Fault(
        "kill", "SIGKILL a bulk worker every few s", 30, 8, lambda c, w, _: kill_bulk_workers(c, w)
    ),
    Fault(
        "redis", "Redis restarted (AOF on)", 15, 6, lambda c, w, _: restart_redis(c, w, wipe=False)
    ),
    Fault(
        "redis-wiped",
        "Redis restarted, data wiped",
        15,
        6,
        lambda c, w, _: restart_redis(c, w, wipe=True),
    ),
    Fault(
        "postgres",
        "Postgres stopped for half the window",
        20,
        6,
        lambda c, w, _: stop_postgres(c, w),
    ),
    Fault("smtp-down", "SMTP relay down for the window", 60, 5, lambda c, w, _: smtp_down(c, w)),
    Fault(
        "smtp-4xx", "SMTP 421/451 to 1 message in 5", 30, 6, lambda c, w, _: smtp_try_later(c, w)
    ),
    Fault("smtp-drop", "SMTP connections dropped in DATA", 20, 6, lambda c, w, _: smtp_drop(c, w)),
    Fault("pause", "campaign paused/resumed repeatedly", 18, 6, pause_resume),
)


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


def addresses(fault: Fault, count: int) -> list[str]:
    return [f"c{n}@{fault.key}.example.com" for n in range(count)]


def delivered_to(stack: Stack, domain: str) -> int:
    suffix = "@" + domain
    return sum(1 for m in stack.sink.received if m.rcpt_to.endswith(suffix))


def settled(stack: Stack, campaign: str, count: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(stack.postgres.url, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT count(*) FROM email_service_message WHERE campaign_id = %s "
                "AND status IN ('sent', 'failed', 'suppressed')",
                [campaign],
            ).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0] >= count)


@dataclass
class PhaseResult:
    fault: Fault
    recipients: list[str]
    injected: Injected
    fault_started: float
    fault_ended: float
    window: float
    notes: list[str]


def run_phase(ctx: Context, fault: Fault, count: int) -> PhaseResult:
    stack = ctx.stack
    ctx.trickle.phase = fault.key
    recipients = addresses(fault, count)
    body = {
        "name": f"chaos {fault.key}",
        "subject": "Hello {{ name }}",
        "template": "newsletter",
        "recipients": [{"email": a, "context": {"name": a.split("@")[0]}} for a in recipients],
        "start": True,
    }
    campaign = str(ctx.api.must("POST", "/campaigns", body)["id"])
    domain = f"{fault.key}.example.com"
    window = max(fault.least, fault.window * ctx.scale)
    # The relay takes its time, so the campaign outlasts the fault: about 1.5 windows at
    # full speed over the bulk pool's processes (at most 0.2 s a message).
    stack.sink.set_delay(min(0.2, 1.5 * window * 2 * BULK_CONCURRENCY / count))
    wait_until(lambda: delivered_to(stack, domain) >= max(1, count // 10), 120, "the campaign")
    ctx.log(f"[{fault.key}] {fault.title}: injecting")
    started = time.monotonic()
    injected = fault.inject(ctx, window, campaign)
    ended = time.monotonic()
    notes = []
    under_way = delivered_to(stack, domain)
    if under_way >= count:
        notes.append("the campaign finished during the fault window")
    ctx.log(f"[{fault.key}] fault over after {ended - started:.0f}s; waiting for every row")
    try:
        wait_until(lambda: settled(stack, campaign, count), ctx.settle_timeout, "every row")
    except TimeoutError as exc:
        notes.append(str(exc))
    return PhaseResult(fault, recipients, injected, started, ended, window, notes)


def describe(stack: Stack, addresses: list[str]) -> str:
    """Where the outbox says these addresses are: status, attempts, last reply."""
    import psycopg

    with psycopg.connect(stack.postgres.url, connect_timeout=3) as conn:
        found = conn.execute(
            "SELECT to_email, status, attempts, last_smtp_code FROM email_service_message "
            "WHERE to_email = ANY(%s)",
            [addresses],
        ).fetchall()
    known = {row[0]: row[1:] for row in found}
    return ", ".join(f"{a} {known.get(a, ('no row',))}" for a in addresses)


def account(results: list[PhaseResult], trickle: Trickle, stack: Stack) -> list[Row]:
    copies = stack.sink.copies()
    received_at: dict[str, float] = {}
    for message in stack.sink.received:
        received_at.setdefault(message.rcpt_to, message.at)
    rows = []
    for result in results:
        tx = [m for m in trickle.sent if m.phase == result.fault.key]
        expected = [*result.recipients, *(m.address for m in tx)]
        delivered = sum(1 for a in expected if copies[a])
        duplicated = sum(copies[a] - 1 for a in expected if copies[a] > 1)
        during = [m for m in tx if result.fault_started <= m.accepted_at <= result.fault_ended]
        latencies = [received_at.get(m.address, float("inf")) - m.accepted_at for m in during]
        missing = [a for a in expected if not copies[a]]
        if missing:
            result.notes.append(f"never delivered: {describe(stack, missing[:5])}")
        rows.append(
            Row(
                fault=result.fault.title,
                window=result.window,
                expected=len(expected),
                delivered=delivered,
                lost=len(expected) - delivered,
                duplicated=duplicated,
                bound=result.injected.bound,
                why=result.injected.why,
                worst_latency=max(latencies) if latencies else None,
                refused=trickle.refused[result.fault.key],
                notes=result.notes,
            )
        )
    return rows


class Supervisor(threading.Thread):
    """Restarts a role that exits on its own, noting it against the current phase."""

    def __init__(self, stack: Stack, trickle: Trickle, log: Callable[[str], None]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.stack = stack
        self.trickle = trickle
        self.log = log
        self.notes: dict[str, list[str]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(1):
            try:
                revived = self.stack.revive()
            except Exception as exc:  # a role that cannot start yet: try again next second
                revived = [f"a restart failed: {exc}"]
            for note in revived:
                self.log(f"[{self.trickle.phase}] {note}")
                self.notes.setdefault(self.trickle.phase, []).append(note)


def run(
    stack: Stack,
    recipients: int,
    scale: float,
    faults: list[Fault],
    settle_timeout: float = 600,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every fault in turn against one running stack; the table's rows."""
    api = Api(stack.web_port, stack.api_key)
    trickle = Trickle(api)
    ctx = Context(stack, api, trickle, scale, settle_timeout, log)
    share = max(1, recipients // len(faults))
    supervisor = Supervisor(stack, trickle, log)
    trickle.start()
    supervisor.start()
    results = []
    try:
        for fault in faults:
            results.append(run_phase(ctx, fault, share))
        trickle.phase = "end"
        trickle.stop()  # first: an email accepted after the wait below would count as lost
        log("waiting for the last transactional email")
        wait_for_transactional(stack, trickle.sent, 60)
    finally:
        supervisor.stopping.set()
        supervisor.join(120)
        trickle.stop()
    for result in results:
        result.notes.extend(supervisor.notes.get(result.fault.key, []))
    return account(results, trickle, stack)


def wait_for_transactional(stack: Stack, sent: list[TxMessage], timeout: float) -> None:
    def arrived() -> bool:
        copies = stack.sink.copies()
        return all(copies[m.address] for m in sent)

    with contextlib.suppress(TimeoutError):  # a missing one is counted as lost
        wait_until(arrived, timeout, "the transactional email")


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return "never arrived" if seconds == float("inf") else f"{seconds:.2f} s"


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | window | expected | delivered | lost | duplicated | allowed "
        "| worst transactional latency | API refusals (retried) | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.fault} | {r.window:.0f} s | {r.expected:,} | {r.delivered:,} | {r.lost} "
            f"| {r.duplicated} "
            f"| {r.bound} | {_latency(r.worst_latency)} | {r.refused} "
            f"| {'pass' if r.ok else 'FAIL'} |"
        )
    explained = [f"- {r.fault}: up to {r.bound} duplicate(s): {r.why}" for r in rows if r.bound]
    notes = [f"- {r.fault}: {note}" for r in rows for note in r.notes]
    extra = []
    if explained:
        extra += ["", "Allowed duplicates (the relay accepted, we could not record it):"]
        extra += explained
    if notes:
        extra += ["", "Notes:", *notes]
    return "\n".join(lines + extra)
