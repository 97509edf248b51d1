"""What every benchmark script needs: its own database, migrated, Django set up, and
child processes it can start, watch and stop: Mailroom's roles among them, started by the
image's start scripts (deploy/start-*.sh, through mailroom_testkit), as the tests do.

Each script keeps a private database between runs (created here when missing) so that
its figures never touch a developer's data or another script's tables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from mailroom_testkit.processes import beat_command, web_command, worker_command
from mailroom_testkit.processes import free_port as free_port  # the scripts import both from here
from mailroom_testkit.processes import wait_until as wait_until

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "services" / "mailroom"
PG_URL = "postgres://postgres@127.0.0.1:5432"


def ensure_database(name: str, env: dict[str, str]) -> None:
    """Create database ``name`` if missing (it is kept between runs) and migrate it."""
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    argv = [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"]
    done = subprocess.run(argv, cwd=APP_DIR, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{done.stdout}{done.stderr}")


def setup_django(env: dict[str, str]) -> None:
    """Django in this process, with the script's environment (the app's directory is on
    the virtualenv's path: ``make setup``)."""
    # WhiteNoise: no collectstatic here, the files come from the app finders.
    warnings.filterwarnings("ignore", "No directory at", UserWarning)
    os.environ.update(env)
    import django

    django.setup()


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


def worker(
    name: str, log: Path, env: dict[str, str], queues: str, concurrency: int, node: str
) -> Child:
    """deploy/start-worker.sh for ``queues``, node ``<node>@%h``; it logs " ready."."""
    argv, role_env = worker_command(env, queues, concurrency, node)
    return Child(name, argv, log, role_env)


def beat(name: str, log: Path, env: dict[str, str], schedule_file: Path) -> Child:
    """deploy/start-beat.sh; it logs "beat: Starting..."."""
    argv, role_env = beat_command(env, schedule_file)
    return Child(name, argv, log, role_env)


def web(
    name: str, log: Path, env: dict[str, str], port: int, workers: int = 2, access_log: str = "-"
) -> Child:
    """deploy/start-web.sh on 127.0.0.1:``port`` (``access_log=""``: none); it logs
    "Booting worker"."""
    argv, role_env = web_command(env, port, workers, access_log)
    return Child(name, argv, log, role_env)
