"""The system under test, as local processes on private ports.

A private PostgreSQL cluster (initdb + pg_ctl in a temporary directory) and a private
redis-server with AOF on, so the faults never touch the shared instances; the roles as
deployed (gunicorn web, two bulk workers, one high_priority worker, beat); and the
recording SMTP sink of the tests, in this process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mailroom_testkit.processes import APP_DIR, Role, beat, free_port, wait_until, web, worker
from mailroom_testkit.smtp_sink import SMTPSink

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BULK_CONCURRENCY = 2
HIGH_CONCURRENCY = 2
# SMTP conversations each worker process keeps in flight (the product's default).
LANES = 8

# Production's rules on short clocks, so that recovery happens within a run's patience.
# The retry schedule (5 s base, 30 s cap, 5 retries: about 95 s in all) outlasts the 60 s
# relay outage, as the production schedule (10 s base, 1 h cap) does.
CHAOS_ENV = {
    "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
    "SECRET_KEY": "chaos-not-secret",
    "DEBUG": "false",
    "ALLOWED_HOSTS": "127.0.0.1,localhost",
    "EMAIL_HOST": "127.0.0.1",
    "EMAIL_TIMEOUT": "2",
    "DEFAULT_FROM_EMAIL": "Mailroom Chaos <noreply@mailroom.example.com>",
    "MAILROOM_PUBLIC_URL": "https://mail.example.com",
    "MAILROOM_SMTP_CONNECTIONS_PER_PROCESS": str(LANES),
    "MAILROOM_LEASE_SECONDS": "10",
    "MAILROOM_STALE_QUEUED_SECONDS": "5",
    "MAILROOM_RETRY_BASE_SECONDS": "5",
    "MAILROOM_RETRY_MAX_SECONDS": "30",
    "MAILROOM_SWEEP_INTERVAL_SECONDS": "1",
    "MAILROOM_DISPATCH_INTERVAL_SECONDS": "0.5",
    "MAILROOM_API_RATE_LIMIT_PER_MINUTE": "0",
    "CELERY_TASK_SOFT_TIME_LIMIT": "30",
    "CELERY_TASK_TIME_LIMIT": "40",
    "CELERY_VISIBILITY_TIMEOUT": "60",
    # Countdowns stay below the visibility timeout (check mailroom.W031); longer waits are
    # rows that the sweeper enqueues once due.
    "MAILROOM_MAX_COUNTDOWN_SECONDS": "30",
    "LOG_LEVEL": "WARNING",
    "PYTHONUNBUFFERED": "1",
}


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb refuses to run as root: run the cluster's commands as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class PrivatePostgres:
    """A throw-away cluster: trust auth, 127.0.0.1 only, its own port."""

    def __init__(self, root: Path) -> None:
        self.root = root / "pg"
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/mailroom_chaos"

    def _run(self, *argv: str) -> None:
        subprocess.run(_as_postgres(list(argv)), check=True, capture_output=True)

    def init(self) -> PrivatePostgres:
        self.root.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        return self.start()

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "postgres.log")
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"
        )
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self) -> None:
        import psycopg

        admin = self.url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE mailroom_chaos")


class PersistentRedis:
    """A private redis-server with AOF on; restart keeps its data, ``wipe`` loses it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PersistentRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        argv += ["--maxmemory-policy", "noeviction", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._pings, 15, "redis-server to answer")
        return self

    def stop(self) -> None:
        """SIGTERM: redis-server flushes its AOF and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False


class Stack:
    """Everything a chaos run talks to. Use as a context manager: it stops what it started."""

    def __init__(self, smtp_delay: float = 0.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-chaos-"))
        os.chmod(self.root, 0o755)  # noqa: S103 (the postgres user must reach pg/)
        self.postgres = PrivatePostgres(self.root)
        self.redis = PersistentRedis(self.root)
        self.sink = SMTPSink(free_port())
        self.sink_delay = smtp_delay
        self.web_port = free_port()
        self.roles: dict[str, Role] = {}
        self.lock = threading.Lock()  # held by whoever kills or restarts a role
        self.api_key = ""
        self.env: dict[str, str] = {}

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.postgres.init().create_database()
        self.redis.start()
        self.sink.start()
        self.sink.set_delay(self.sink_delay)
        self.env = {
            **os.environ,
            **CHAOS_ENV,
            "DATABASE_URL": self.postgres.url,
            "REDIS_URL": self.redis.url,
            "EMAIL_PORT": str(self.sink.port),
        }
        self.env.pop("PYTEST_CURRENT_TEST", None)
        self._manage("migrate", "--noinput", "-v", "0")
        self.api_key = self._manage("create_api_key", "chaos", "--scopes", "admin", "--quiet")
        for name in ("worker-bulk-1", "worker-bulk-2", "worker-high", "beat", "web"):
            self.start_role(name)

    def _manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=APP_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"manage.py {args[0]} failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip()

    def role(self, name: str) -> Role:
        if name.startswith("worker-bulk"):
            return worker(self.env, "bulk", BULK_CONCURRENCY, name=f"chaos-{name}")
        if name == "worker-high":
            return worker(self.env, "high_priority", HIGH_CONCURRENCY, name="chaos-worker-high")
        if name == "beat":
            return beat(self.env, self.root / "celerybeat-schedule")
        return web(self.env, self.web_port)

    def start_role(self, name: str) -> Role:
        self.roles[name] = self.role(name).start(timeout=60)
        return self.roles[name]

    def revive(self) -> list[str]:
        """Restart every role that exited, as an orchestrator does (a restart policy, a
        Kubernetes Deployment); return what was restarted, with its exit status."""
        revived = []
        with self.lock:
            for name, role in list(self.roles.items()):
                code = role.proc.poll() if role.proc else None
                if code is not None:
                    self.start_role(name)
                    revived.append(f"{name} exited ({code}) and was restarted")
        return revived

    def close(self) -> None:
        for role in reversed(list(self.roles.values())):
            role.stop()
        self.roles.clear()
        with contextlib.suppress(Exception):
            self.sink.stop()
        self.redis.stop()
        self.postgres.stop()
        shutil.rmtree(self.root, ignore_errors=True)
