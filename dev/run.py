"""Run the whole Mailroom stack as local processes with one command: ``make dev``.

Mailroom's roles are started by the image's own start scripts in deploy/ (each in its own
process group), so ``make dev`` runs exactly what a container runs; what differs here
(ports, 127.0.0.1, the state files) is passed as the variables the scripts document:

  web          deploy/start-web.sh: gunicorn, 2 workers, on 127.0.0.1 (MAILROOM_WEB_BIND)
  worker-high  deploy/start-worker.sh, MAILROOM_WORKER_QUEUE=high_priority (-c 2)
  worker-bulk  deploy/start-worker.sh, MAILROOM_WORKER_QUEUE=bulk (-c 2)
  beat         deploy/start-beat.sh
  flower       deploy/start-flower.sh on 127.0.0.1, basic auth from FLOWER_BASIC_AUTH
  smtp         an SMTP sink (dev/sink.py) that prints every message it receives
  celery-exporter
               celery-exporter (dev/celery_exporter.sh) on 127.0.0.1: task-level metrics
               and the ``high_priority``/``bulk`` queue lengths; installed into its own
               virtualenv, ``.tools/celery-exporter``, on first use

State (beat's schedule file, the workers' heartbeat files, the web workers' shared
Prometheus files in ``prometheus-web/``, wiped when gunicorn starts) goes to ``.dev/`` at
the repo root (gitignored; ``--state-dir`` moves it). Before the roles start, the
database named by DATABASE_URL is created if it is missing and deploy/migrate.sh runs once
(``--no-migrate`` skips both).

Environment: every role gets the defaults in ``DEV_DEFAULTS`` below (DEBUG=true, a dev
SECRET_KEY, DATABASE_URL=.../mailroom_dev, REDIS_URL=redis://127.0.0.1:6379/1, EMAIL_HOST
and EMAIL_PORT pointing at the sink, ...). Any of them that is set in the caller's
environment wins, e.g. ``REDIS_URL=redis://127.0.0.1:6379/5 make dev``. EMAIL_PORT
defaults to ``--smtp-port``.

Output: every line of every role is printed with a time stamp and a padded role prefix
(coloured on a terminal unless NO_COLOR is set), as foreman or honcho do.

Stopping: Ctrl-C (SIGINT), SIGTERM or SIGHUP sends SIGTERM to every role's main process
(gunicorn's master and Celery's main process stop their children gracefully), waits up to
STOP_TIMEOUT seconds, then SIGKILLs every role's process group, so whatever is left, strays
included, dies (a second Ctrl-C skips the wait). If a role exits on its own, the others
are stopped the same way. The exit status is 0 after a requested stop and non-zero when a
role died or could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO, TextIO

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "services" / "mailroom"
DEPLOY_DIR = REPO / "deploy"
DEV_DIR = REPO / "dev"
SINK = DEV_DIR / "sink.py"
CELERY_EXPORTER = DEV_DIR / "celery_exporter.sh"
STATE_DIR = REPO / ".dev"
# The roles' start scripts: the image's, by role.
SCRIPTS = {
    "web": "start-web.sh",
    "worker-high": "start-worker.sh",
    "worker-bulk": "start-worker.sh",
    "beat": "start-beat.sh",
    "flower": "start-flower.sh",
}

ROLES = ("web", "worker-high", "worker-bulk", "beat", "flower", "smtp", "celery-exporter")
DATABASE_ROLES = {"web", "worker-high", "worker-bulk"}
STOP_TIMEOUT = 10.0
POLL_SECONDS = 0.1

DEV_DEFAULTS = {
    "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
    "DEBUG": "true",
    "SECRET_KEY": "dev-only-insecure",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/mailroom_dev",
    "REDIS_URL": "redis://127.0.0.1:6379/1",
    "EMAIL_HOST": "127.0.0.1",
    "DEFAULT_FROM_EMAIL": "Mailroom Dev <dev@mailroom.example.com>",
    "FLOWER_BASIC_AUTH": "admin:admin",
    "PYTHONUNBUFFERED": "1",
}

DESCRIPTION = """\
Run Mailroom's roles as local processes, against local Redis and PostgreSQL, with the
image's start scripts (deploy/start-*.sh):

  web          gunicorn, 2 workers, on 127.0.0.1 (--port)
  worker-high  celery worker for high_priority, -c 2
  worker-bulk  celery worker for bulk, -c 2
  beat         celery beat, schedule file in --state-dir
  flower       Flower on 127.0.0.1 (--flower-port), basic auth from FLOWER_BASIC_AUTH
  smtp         SMTP sink that prints every message it receives (--smtp-port)
  celery-exporter
               celery-exporter on 127.0.0.1 (--exporter-port): task metrics and queue
               lengths; its own virtualenv, .tools/celery-exporter, is made on first use

The database is created if missing and deploy/migrate.sh runs first."""

# The roles' colours (honcho's palette): cyan, yellow, green, magenta, red, blue, then the
# bright ones. The supervisor's own lines are bold.
COLOURS = ("36", "33", "32", "35", "31", "34", "1;36", "1;33", "1;32", "1;35", "1;31", "1;34")


# --------------------------------------------------------------------------------------
# Options and environment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    roles: tuple[str, ...]
    port: int
    flower_port: int
    smtp_port: int
    exporter_port: int
    migrate: bool
    state_dir: Path


def _roles(text: str) -> tuple[str, ...]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(ROLES))
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise argparse.ArgumentTypeError(f"unknown role(s) {given}; choose from {', '.join(ROLES)}")
    return tuple(role for role in ROLES if role in names)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _epilog() -> str:
    lines = [f"  {name}={value}" for name, value in DEV_DEFAULTS.items()]
    return (
        "environment given to every role (a variable set in your environment wins):\n"
        + "\n".join(lines)
        + "\n  EMAIL_PORT=<--smtp-port>\n\n"
        "Ctrl-C or SIGTERM stops every role (SIGTERM, then SIGKILL after "
        f"{STOP_TIMEOUT:g}s);\nif one role exits, the others are stopped and the exit status "
        "is non-zero."
    )


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="dev/run.py",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        type=_roles,
        default=ROLES,
        metavar="ROLE[,ROLE...]",
        help="run only these roles, comma-separated (default: all)",
    )
    parser.add_argument("--port", type=_port, default=8000, help="web port (default: 8000)")
    parser.add_argument(
        "--flower-port", type=_port, default=5555, help="Flower port (default: 5555)"
    )
    parser.add_argument(
        "--smtp-port",
        type=_port,
        default=1025,
        help="SMTP sink port, also the default EMAIL_PORT (default: 1025)",
    )
    parser.add_argument(
        "--exporter-port",
        type=_port,
        default=9808,
        help="celery-exporter port (default: 9808)",
    )
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not create the database or run deploy/migrate.sh first",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=STATE_DIR,
        help="where beat's schedule and the workers' heartbeats go (default: .dev/)",
    )
    ns = parser.parse_args(argv)
    return Options(
        roles=ns.only,
        port=ns.port,
        flower_port=ns.flower_port,
        smtp_port=ns.smtp_port,
        exporter_port=ns.exporter_port,
        migrate=not ns.no_migrate,
        state_dir=ns.state_dir.resolve(),
    )


def environment(caller: Mapping[str, str], smtp_port: int) -> dict[str, str]:
    """The roles' environment: the dev defaults, overridden by the caller's environment.

    An empty FLOWER_BASIC_AUTH is dropped: Flower reads that variable itself, and an
    empty one would lock everybody out instead of turning authentication off (so
    deploy/start-flower.sh refuses to start without it, and the flower role is skipped).
    """
    env = {**DEV_DEFAULTS, "EMAIL_PORT": str(smtp_port), **caller}
    if not env["FLOWER_BASIC_AUTH"]:
        del env["FLOWER_BASIC_AUTH"]
    return env


def role_environment(name: str, opts: Options, env: Mapping[str, str]) -> dict[str, str]:
    """One role's environment: ``env`` plus what the role's script reads to run here
    rather than in a container. The scripts run this interpreter (MAILROOM_PYTHON); the
    web role's gunicorn workers share their Prometheus metrics through files in
    ``<state-dir>/prometheus-web`` (wiped by deploy/gunicorn.conf.py when gunicorn starts)
    unless PROMETHEUS_MULTIPROC_DIR is set; the workers' heartbeat files and beat's schedule
    go to the state directory (a container's /tmp is its own; here the pools share one).
    WEB_CONCURRENCY and MAILROOM_WORKER_CONCURRENCY (2) can be set in the caller's
    environment; the addresses and files cannot."""
    base = {**env, "MAILROOM_PYTHON": sys.executable}
    state = opts.state_dir
    if name == "web":
        return {
            "PROMETHEUS_MULTIPROC_DIR": str(state / "prometheus-web"),
            "WEB_CONCURRENCY": "2",
            **base,
            "MAILROOM_WEB_BIND": f"127.0.0.1:{opts.port}",
        }
    if name in ("worker-high", "worker-bulk"):
        return {
            "MAILROOM_WORKER_CONCURRENCY": "2",
            **base,
            "MAILROOM_WORKER_QUEUE": "high_priority" if name == "worker-high" else "bulk",
            "MAILROOM_WORKER_HEARTBEAT_FILE": str(state / f"{name}.heartbeat"),
        }
    if name == "beat":
        return {**base, "MAILROOM_BEAT_SCHEDULE": str(state / "celerybeat-schedule")}
    if name == "flower":
        return {**base, "FLOWER_PORT": str(opts.flower_port), "FLOWER_ADDRESS": "127.0.0.1"}
    if name == "celery-exporter":
        return {**env, "CELERY_EXPORTER_PORT": str(opts.exporter_port)}
    return dict(env)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def commands(opts: Options) -> dict[str, list[str]]:
    """Every role's argv, by role name: Mailroom's roles are their start scripts."""
    scripts = {name: [str(DEPLOY_DIR / script)] for name, script in SCRIPTS.items()}
    return {
        **scripts,
        "smtp": [sys.executable, str(SINK), "--host", "127.0.0.1", "--port", str(opts.smtp_port)],
        "celery-exporter": ["bash", str(CELERY_EXPORTER)],
    }


# What the scripts read, shown next to the command (the rest of the environment is the
# same for every role).
_SHOWN = (
    "MAILROOM_WEB_BIND",
    "MAILROOM_WORKER_QUEUE",
    "MAILROOM_WORKER_CONCURRENCY",
    "FLOWER_PORT",
    "CELERY_EXPORTER_PORT",
)


def _describe(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The command as printed: ``python`` for this interpreter, paths from the repo root,
    and the variables that make this role what it is."""
    shown = ["python", *argv[1:]] if argv and argv[0] == sys.executable else list(argv)
    shown = [
        str(Path(arg).relative_to(REPO)) if arg.startswith(f"{REPO}/") else arg for arg in shown
    ]
    variables = [f"{name}={env[name]}" for name in _SHOWN if env and name in env]
    return shlex.join([*variables, *shown])


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def use_colour(stream: TextIO, env: Mapping[str, str]) -> bool:
    if "NO_COLOR" in env:
        return False
    return bool(env.get("FORCE_COLOR")) or stream.isatty()


class Printer:
    """Writes whole lines from many threads, each behind a padded, coloured prefix."""

    def __init__(self, names: Iterable[str], stream: TextIO, colour: bool) -> None:
        labels = ["system", *names]
        colours = ["1", *(COLOURS[i % len(COLOURS)] for i in range(len(labels) - 1))]
        width = max(len(label) for label in labels)
        self._prefixes = {
            label: self._paint(label.ljust(width) + " |", code, colour)
            for label, code in zip(labels, colours, strict=True)
        }
        self._stream = stream
        self._lock = threading.Lock()

    @staticmethod
    def _paint(text: str, colour: str, enabled: bool) -> str:
        return f"\033[{colour}m{text}\033[0m" if enabled else text

    def line(self, name: str, text: str) -> None:
        head = f"{time.strftime('%H:%M:%S')} {self._prefixes[name]} "
        record = "".join(f"{head}{part}\n" for part in text.splitlines() or [""])
        with self._lock:
            try:
                self._stream.write(record)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # Nobody is reading any more; keep stopping the roles regardless.

    def system(self, text: str) -> None:
        self.line("system", text)


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


class Role:
    """One child process, started in its own session and so its own process group."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], printer: Printer
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.printer = printer
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=APP_DIR,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._pump = threading.Thread(
            target=self._copy, args=(self.proc.stdout,), name=f"out-{self.name}", daemon=True
        )
        self._pump.start()
        self.printer.system(f"{self.name}: pid {self.proc.pid}: {_describe(self.argv, self.env)}")

    def _copy(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                self.printer.line(self.name, raw.decode("utf-8", "replace").rstrip("\r\n"))

    def poll(self) -> int | None:
        """The exit status once the process has exited, else None (also before start)."""
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM the role's main process only: gunicorn's master and Celery's main process
        then stop their own children gracefully (a Celery pool child that got SIGTERM itself
        would die mid-task)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def signal_group(self, signum: signal.Signals) -> None:
        """Signal the role's whole process group: gunicorn and Celery children included."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # Gone already.
            os.killpg(self.proc.pid, signum)

    def reap(self) -> None:
        """Wait for the process and for the last of its output."""
        if self.proc is None:
            return
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.printer.system(f"{self.name}: pid {self.proc.pid} did not die")
        if self._pump is not None:
            self._pump.join(2)


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


class Supervisor:
    """Starts roles, watches them, and stops them all when asked or when one dies."""

    def __init__(self, printer: Printer, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.printer = printer
        self.stop_timeout = stop_timeout
        self.roles: list[Role] = []
        self.requested: str | None = None
        self.forced = False

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only flags here: printing from a handler could deadlock on the printer's lock.
        if self.requested:
            self.forced = True
        else:
            self.requested = signal.Signals(signum).name

    def run_once(self, role: Role) -> int:
        """Run one role to completion (``migrate``); a stop request interrupts it."""
        if self.requested:
            return 0
        self.roles = [role]
        role.start()
        while role.alive() and not self.requested:
            time.sleep(POLL_SECONDS)
        if self.requested:
            self.printer.system(f"{self.requested} received; stopping")
            self.stop()
            return 0
        role.reap()
        return role.poll() or 0

    def run(self, roles: list[Role]) -> int:
        """Start every role, then block until a stop request or an unexpected exit."""
        self.roles = roles
        try:
            for role in roles:
                if not self.requested:
                    role.start()
            code = self._watch()
        except OSError as exc:
            self.printer.system(f"cannot start a role: {exc}")
            code = 1
        self.stop()
        return code

    def _watch(self) -> int:
        while not self.requested:
            for role in self.roles:
                code = role.poll()
                if code is not None:
                    status = _exit_status(code)
                    self.printer.system(f"{role.name} exited with {status}; stopping the others")
                    return code if code > 0 else 1
            time.sleep(POLL_SECONDS)
        self.printer.system(f"{self.requested} received; stopping")
        return 0

    def stop(self) -> None:
        """SIGTERM every live role, wait, then SIGKILL every process group that is left."""
        live = [role for role in self.roles if role.alive()]
        for role in live:
            self.printer.system(f"{role.name}: sending SIGTERM")
            role.terminate()
        deadline = time.monotonic() + self.stop_timeout
        while any(r.alive() for r in live) and time.monotonic() < deadline and not self.forced:
            time.sleep(POLL_SECONDS)
        for role in self.roles:
            if role.alive():
                self.printer.system(f"{role.name}: still running; sending SIGKILL")
            # Also catches strays whose leader already exited (a Celery pool child, say).
            role.signal_group(signal.SIGKILL)
            role.reap()
        self.printer.system("all roles stopped")


# --------------------------------------------------------------------------------------
# Database
# --------------------------------------------------------------------------------------


def ensure_database(url: str) -> str | None:
    """Create the PostgreSQL database named by ``url`` unless it exists; return its name
    if it was created. Connects to the ``postgres`` maintenance database to do so."""
    if not url.startswith(("postgres://", "postgresql://")):
        return None  # The settings will say what is wrong with it.
    name = str(conninfo_to_dict(url).get("dbname") or "")
    if not name:
        return None
    with psycopg.connect(url, dbname="postgres", autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return None
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return None  # Someone else created it meanwhile.
    return name


def prepare_database(env: Mapping[str, str], supervisor: Supervisor) -> int:
    """Create the database if needed, then run the migrate one-shot (deploy/migrate.sh:
    the schema; no admin user or API key, as their variables are not set here)."""
    url = env.get("DATABASE_URL", "")
    try:
        created = ensure_database(url)
    except psycopg.Error as exc:
        supervisor.printer.system(f"cannot prepare the database of DATABASE_URL: {exc}")
        return 1
    if created:
        supervisor.printer.system(f"created database {created}")
    argv = [str(DEPLOY_DIR / "migrate.sh")]
    migrate_env = {**env, "MAILROOM_PYTHON": sys.executable}
    code = supervisor.run_once(Role("migrate", argv, migrate_env, supervisor.printer))
    if code:
        supervisor.printer.system(f"migrate failed with {_exit_status(code)}; nothing started")
        return code if code > 0 else 1
    return 0


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _warn_about_mismatches(opts: Options, env: Mapping[str, str], printer: Printer) -> None:
    if "smtp" in opts.roles and env.get("EMAIL_PORT") != str(opts.smtp_port):
        printer.system(
            f"note: EMAIL_PORT={env.get('EMAIL_PORT')} comes from your environment, so the "
            f"workers will not send to the sink on port {opts.smtp_port}"
        )
    if "flower" in opts.roles and not env.get("FLOWER_BASIC_AUTH"):
        printer.system(
            "note: FLOWER_BASIC_AUTH is empty: flower is not started (deploy/start-flower.sh "
            "refuses to run without authentication)"
        )


def _banner(opts: Options, env: Mapping[str, str], printer: Printer) -> None:
    user = env.get("FLOWER_BASIC_AUTH", "").partition(":")[0]
    urls = {
        "web": f"http://127.0.0.1:{opts.port}/  (/healthz, /readyz, /metrics, /admin/)",
        "flower": f"http://127.0.0.1:{opts.flower_port}/  ({f'user {user}' if user else 'open'})",
        "smtp": f"smtp://127.0.0.1:{opts.smtp_port}  (messages are printed, never delivered)",
        "celery-exporter": f"http://127.0.0.1:{opts.exporter_port}/metrics",
    }
    for role, url in urls.items():
        if role in opts.roles:
            printer.system(f"{role}: {url}")
    printer.system("Ctrl-C stops everything")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    env = environment(os.environ, opts.smtp_port)
    printer = Printer([*opts.roles, "migrate"], sys.stdout, use_colour(sys.stdout, env))
    supervisor = Supervisor(printer)
    supervisor.install_signal_handlers()
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    _warn_about_mismatches(opts, env, printer)
    if "flower" in opts.roles and not env.get("FLOWER_BASIC_AUTH"):
        opts = replace(opts, roles=tuple(role for role in opts.roles if role != "flower"))
    if opts.migrate and DATABASE_ROLES & set(opts.roles):
        code = prepare_database(env, supervisor)
        if code or supervisor.requested:
            return code
    argvs = commands(opts)
    _banner(opts, env, printer)
    roles = [
        Role(name, argvs[name], role_environment(name, opts, env), printer) for name in opts.roles
    ]
    return supervisor.run(roles)


if __name__ == "__main__":
    sys.exit(main())
