"""Start and stop the real roles (web, Celery workers, beat) and a redis-server as processes.

Every Mailroom role is started through its start script in deploy/, the one the image
runs: what a test needs to differ (a port, the queues, the concurrency, the node name, the
heartbeat and schedule files, the log level) is passed as the environment variables the
scripts document, and ``MAILROOM_PYTHON`` points them at this interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "services" / "mailroom"
DEPLOY_DIR = REPO / "deploy"
OUTPUT_DIR = REPO / "test-output"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str = "", *, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until it is true; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate}")


class Role:
    """One process started in its own session, so a kill takes its children too."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], ready: str) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.ready = ready
        OUTPUT_DIR.mkdir(exist_ok=True)
        # One file per test run: concurrent runs must not see each other's "ready" lines.
        self.log_path = OUTPUT_DIR / f"{name}-{os.getpid()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Role:
        log = self.log_path.open("ab")
        log.write(f"\n===== start {' '.join(self.argv)}\n".encode())
        log.flush()
        offset = log.tell()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=APP_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def is_ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log_tail()}")
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return self.ready.encode() in f.read()

        wait_until(is_ready, timeout, what=f"{self.name} to be ready")
        return self

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no cleanup."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def script(name: str) -> list[str]:
    """The argv of deploy/<name>, a start script of the image."""
    return [str(DEPLOY_DIR / name)]


def role_env(env: Mapping[str, str], **variables: object) -> dict[str, str]:
    """``env`` plus the scripts' variables (``variables`` win) and this interpreter."""
    return {
        **env,
        "MAILROOM_PYTHON": sys.executable,
        **{name: str(value) for name, value in variables.items()},
    }


def worker_command(
    env: Mapping[str, str], queues: str, concurrency: int = 2, name: str = "worker"
) -> tuple[list[str], dict[str, str]]:
    """deploy/start-worker.sh for ``queues``, node ``<name>@%h``, logging at INFO (the
    " ready." line), with a heartbeat file of its own unless ``env`` names one."""
    OUTPUT_DIR.mkdir(exist_ok=True)
    heartbeat = env.get("MAILROOM_WORKER_HEARTBEAT_FILE") or str(
        OUTPUT_DIR / f"{name}-{os.getpid()}.heartbeat"
    )
    variables = {
        "MAILROOM_WORKER_QUEUE": queues,
        "MAILROOM_WORKER_CONCURRENCY": concurrency,
        "MAILROOM_WORKER_NAME": f"{name}@%h",
        "MAILROOM_WORKER_HEARTBEAT_FILE": heartbeat,
        "LOG_LEVEL": "INFO",
    }
    return script("start-worker.sh"), role_env(env, **variables)


def beat_command(env: Mapping[str, str], schedule_file: Path) -> tuple[list[str], dict[str, str]]:
    """deploy/start-beat.sh with its schedule in ``schedule_file``, logging at INFO."""
    variables = {"MAILROOM_BEAT_SCHEDULE": schedule_file, "LOG_LEVEL": "INFO"}
    return script("start-beat.sh"), role_env(env, **variables)


def web_command(
    env: Mapping[str, str], port: int, workers: int = 2, access_log: str = "-"
) -> tuple[list[str], dict[str, str]]:
    """deploy/start-web.sh on 127.0.0.1:``port`` with ``workers`` gunicorn workers
    (``access_log=""``: none)."""
    variables = {
        "MAILROOM_WEB_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": workers,
        "MAILROOM_WEB_ACCESS_LOG": access_log,
    }
    return script("start-web.sh"), role_env(env, **variables)


def worker(env: dict[str, str], queues: str, concurrency: int = 2, name: str = "worker") -> Role:
    argv, role_environment = worker_command(env, queues, concurrency, name)
    return Role(name, argv, role_environment, ready=" ready.")


def beat(env: dict[str, str], schedule_file: Path) -> Role:
    argv, role_environment = beat_command(env, schedule_file)
    return Role("beat", argv, role_environment, ready="beat: Starting")


class RedisServer:
    """A private redis-server that a test may stop and start again on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        OUTPUT_DIR.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(OUTPUT_DIR),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(self._pings, 10, what="redis-server to answer")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def _pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False


def web(env: dict[str, str], port: int) -> Role:
    """The web role as deployed: gunicorn with two workers."""
    argv, role_environment = web_command(env, port)
    return Role("web", argv, role_environment, ready="Booting worker")


def prometheus(config: Path, data_dir: Path, port: int) -> Role:
    argv = [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return Role("prometheus", argv, dict(os.environ), ready="Server is ready to receive")
