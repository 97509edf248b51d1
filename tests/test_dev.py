"""`make dev`: dev/run.py starts every role, mail reaches the sink, Ctrl-C stops it all.

dev/run.py runs as a subprocess, as a developer would run it, but pointed at the tests'
private Redis (db 1), at a database of its own (which it must create) and at free ports,
so it never meets a developer's own `make dev`. Mailroom's roles are the image's start
scripts (deploy/start-*.sh), so their node names are the image's too.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from dev import run as dev
from mailroom_testkit.processes import APP_DIR, OUTPUT_DIR, REPO, wait_until
from tests.settings import TEST_ENV

SUBJECT = "Hello from make dev"
RECIPIENT = "dev@example.com"
FLOWER_AUTH = "devtest:not-a-real-secret"
# What each Celery role prints once it is up.
READY = {
    "worker-high": r"high_priority@\S+ ready\.",
    "worker-bulk": r"bulk@\S+ ready\.",
    "beat": r"beat: Starting",
}
# celery-exporter's /metrics: some celery_ family, and a queue length for one of our queues.
CELERY_FAMILY = re.compile(r"^# TYPE celery_\w+ ", re.MULTILINE)
QUEUE_LENGTH = re.compile(
    r'^celery_queue_length\{queue_name="(high_priority|bulk)"\} \d', re.MULTILINE
)
SEND_EMAIL = (
    "from email_service.services import send_email; "
    f"send_email(to={RECIPIENT!r}, subject={SUBJECT!r}, template='welcome')"
)


# --------------------------------------------------------------------------------------
# Processes, seen through /proc
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    ppid: int
    pgrp: int
    state: str
    start: str  # start time in clock ticks: tells a pid apart from a later reuse of it


def _proc_table() -> dict[int, Proc]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # Exited while we looked.
        fields = text.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp...
        table[int(entry.name)] = Proc(int(fields[1]), int(fields[2]), fields[0], fields[19])
    return table


def _descendants(root: int) -> dict[int, Proc]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found: dict[int, Proc] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child]
            todo.append(child)
    return found


def _survivors(known: dict[int, Proc], groups: set[int]) -> list[int]:
    """Processes still alive (not zombies) from ``known`` or in one of ``groups``."""
    table = _proc_table()
    return sorted(
        pid
        for pid, proc in table.items()
        if proc.state != "Z"
        and (proc.pgrp in groups or (pid in known and known[pid].start == proc.start))
    )


# --------------------------------------------------------------------------------------
# One run of dev.py
# --------------------------------------------------------------------------------------


@dataclass
class DevRun:
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    web_port: int
    flower_port: int
    smtp_port: int
    exporter_port: int
    tree: dict[int, Proc] = field(default_factory=dict)
    groups: set[int] = field(default_factory=set)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 80) -> str:
        text = "\n".join(self.output().splitlines()[-lines:])
        return f"\n----- last {lines} lines of dev.py's output -----\n{text}"

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        try:
            wait_until(
                lambda: self.proc.poll() is not None or predicate(), timeout, what, interval=0.2
            )
        except TimeoutError as exc:
            message = f"{exc}{self.tail()}"
        else:
            if self.proc.poll() is None:
                return
            message = f"dev.py exited ({self.proc.returncode}) before {what}{self.tail()}"
        pytest.fail(message)


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _database_url(name: str) -> str:
    """The tests' PostgreSQL server, user and password, with another database name."""
    return urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{name}").geturl()


def _drop_database(name: str) -> None:
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(_database_url("postgres"), autocommit=True) as conn:
        conn.execute(drop)


def _caller_env(database: str) -> dict[str, str]:
    """A developer's environment, overriding only what keeps this run private.

    The test settings' variables are dropped so that dev.py's own defaults apply.
    """
    dropped = {*TEST_ENV, *dev.DEV_DEFAULTS, "REDIS_URL", "EMAIL_PORT", "PYTEST_CURRENT_TEST"}
    env = {name: value for name, value in os.environ.items() if name not in dropped}
    redis_port = os.environ["MAILROOM_TEST_REDIS_PORT"]
    env["DATABASE_URL"] = _database_url(database)
    env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/1"
    env["FLOWER_BASIC_AUTH"] = FLOWER_AUTH
    return env


def _start(database: str, state_dir: Path) -> DevRun:
    web, flower, smtp, exporter = _free_ports(4)
    env = _caller_env(database)
    OUTPUT_DIR.mkdir(exist_ok=True)
    log = OUTPUT_DIR / "dev.log"
    argv = [sys.executable, str(REPO / "dev" / "run.py"), "--port", str(web)]
    argv += ["--flower-port", str(flower), "--smtp-port", str(smtp)]
    argv += ["--exporter-port", str(exporter)]
    argv += ["--state-dir", str(state_dir)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return DevRun(proc, log, env, web, flower, smtp, exporter)


def _kill_everything(run: DevRun) -> None:
    """Whatever happened, leave nothing running: dev.py first, then anything it left."""
    if run.proc.poll() is None:
        run.tree |= _descendants(run.proc.pid)
        run.proc.send_signal(signal.SIGTERM)
        try:
            run.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(5)
    for pid in _survivors(run.tree, run.groups):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dev_run(redis_server: object, tmp_path: Path) -> Iterator[DevRun]:
    """dev.py, started against the private redis-server (which must be up first)."""
    database = f"mailroom_devtest_{os.getpid()}"
    _drop_database(database)  # A leftover of a killed run with the same pid.
    run = _start(database, tmp_path / "state")
    try:
        yield run
    finally:
        _kill_everything(run)
        _drop_database(database)


# --------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------


def _http_status(port: int, path: str, auth: str | None = None) -> int | None:
    """The HTTP status of GET ``path``, or None when nothing answers yet."""
    headers = {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"} if auth else {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _http_text(port: int, path: str) -> str | None:
    """The body of GET ``path`` if it answers 200, else None. celery-exporter asks the
    workers for their stats and queues on every scrape (up to a second each), hence the
    longer timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return body if response.status == 200 else None


def _exporter_metrics(run: DevRun) -> str | None:
    """celery-exporter's metrics once they hold a celery_ family and a queue length."""
    text = _http_text(run.exporter_port, "/metrics")
    if text and CELERY_FAMILY.search(text) and QUEUE_LENGTH.search(text):
        return text
    return None


def _role_lines(output: str, role: str) -> list[str]:
    lines = (line.partition(" | ") for line in output.splitlines())
    return [text for prefix, _, text in lines if prefix.split()[-1:] == [role]]


def _printed(run: DevRun, role: str, pattern: str) -> bool:
    return any(re.search(pattern, line) for line in _role_lines(run.output(), role))


def _sink_printed_the_message(output: str) -> bool:
    lines = _role_lines(output, "smtp")
    subject = any(line.startswith("Subject:") and SUBJECT in line for line in lines)
    return subject and any(line.startswith("To:") and RECIPIENT in line for line in lines)


def _role_pids(output: str) -> dict[str, int]:
    """The pid dev.py printed for each role it started."""
    found = (re.match(r"(\S+): pid (\d+): ", line) for line in _role_lines(output, "system"))
    return {match[1]: int(match[2]) for match in found if match}


def _send_email(run: DevRun) -> None:
    """What a developer would do: a Django shell with the roles' environment."""
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", SEND_EMAIL],
        cwd=APP_DIR,
        env=dev.environment(run.env, run.smtp_port),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_make_dev_runs_every_role_delivers_to_the_sink_and_stops_cleanly(
    dev_run: DevRun,
) -> None:
    run = dev_run
    run.wait_for(lambda: _http_status(run.web_port, "/healthz") == 200, 40, "web's /healthz")
    run.wait_for(lambda: _http_status(run.web_port, "/readyz") == 200, 10, "web's /readyz")
    assert f"created database mailroom_devtest_{os.getpid()}" in run.output()

    _send_email(run)
    run.wait_for(lambda: _sink_printed_the_message(run.output()), 30, "the sink to print it")

    for role, pattern in READY.items():
        run.wait_for(partial(_printed, run, role, pattern), 30, f"{role} to be ready")
    run.wait_for(lambda: _http_status(run.flower_port, "/") is not None, 20, "Flower")
    assert _http_status(run.flower_port, "/") == 401
    assert _http_status(run.flower_port, "/", auth=FLOWER_AUTH) == 200
    # The first run installs the exporter's own virtualenv from PyPI, hence the minute.
    run.wait_for(lambda: _exporter_metrics(run), 60, "celery-exporter's queue lengths")

    pids = _role_pids(run.output())
    assert set(pids) == {"migrate", *dev.ROLES}, run.tail()
    run.tree = _descendants(run.proc.pid)
    run.groups = {pid for role, pid in pids.items() if role != "migrate"}
    for role in dev.ROLES:
        assert run.tree[pids[role]].pgrp == pids[role], f"{role} is not its own process group"

    run.proc.send_signal(signal.SIGINT)
    try:
        code = run.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dev.py still running 20 s after SIGINT{run.tail()}")
    assert code == 0, run.tail()
    assert "all roles stopped" in run.output()
    with contextlib.suppress(AssertionError):  # Killed processes take a moment to go.
        wait_until(lambda: not _survivors(run.tree, run.groups), 5)
    left = _survivors(run.tree, run.groups)
    assert not left, f"still running after dev.py exited: pids {left}"
