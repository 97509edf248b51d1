"""The commands in docker-compose.yml are the ones that work: each Mailroom role is started
as a local process, exactly as the file says, and must become healthy and do its job.

There is no Docker engine here, so the container is translated, and only where it must be:
the image's /app is the repository (the Dockerfile copies deploy/ and services/mailroom to
/app/deploy and /app/services/mailroom, and works in the latter, as Role does), the files
Compose mounts from `configs:` are written to a temporary directory, and the variables that
name another container or a listening address point at the tests' Redis, Postgres, SMTP sink
and free ports on 127.0.0.1. Everything else comes from the compose file as it is,
interpolated with no .env; nothing is inherited from the test run's environment. Health is
judged by each service's own `healthcheck` command, translated the same way.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from email_service import apikeys, services
from email_service.models import Message
from mailroom_testkit.processes import APP_DIR, Role, free_port, wait_until
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for
from tests.deploy.composefile import (
    IMAGE_ROOT,
    LONG_RUNNING_ROLES,
    REPO,
    command,
    environment,
    load,
)

pytestmark = pytest.mark.django_db(transaction=True)

DOCKERFILE = REPO / "services" / "mailroom" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
# What each role's main process is once its start script has exec'd it.
EXECS = {
    "web": "gunicorn",
    "worker-high": "celery",
    "worker-bulk": "celery",
    "beat": "celery",
    "flower": "celery",
}
# Container host names that must not survive the translation.
CONTAINER_HOSTS = re.compile(r"@postgres:|redis://redis:|\bmailpit\b")


@dataclass
class Stack:
    """Everything a role needs to run here instead of in its container."""

    compose: dict[str, Any]
    tmp: Path
    database_url: str
    redis_url: str
    smtp_port: int
    ports: dict[str, int]

    def service(self, name: str) -> dict[str, Any]:
        return dict(self.compose["services"][name])

    def argv(self, args: list[str]) -> list[str]:
        return [_local_path(arg) for arg in args]

    def env(self, name: str) -> dict[str, str]:
        env = environment(self.service(name))
        env.update(self._config_files(name, env))
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "EMAIL_HOST": "127.0.0.1",
                "EMAIL_PORT": str(self.smtp_port),
                "MAILROOM_WEB_BIND": f"127.0.0.1:{self.ports['web']}",
                "FLOWER_ADDRESS": "127.0.0.1",
                "FLOWER_PORT": str(self.ports["flower"]),
                # The container's /tmp is its own; here two workers share one machine.
                "MAILROOM_WORKER_HEARTBEAT_FILE": str(self.tmp / f"{name}.heartbeat"),
                "MAILROOM_BEAT_SCHEDULE": str(self.tmp / "celerybeat-schedule"),
            }
        )
        leftover = {k: v for k, v in env.items() if CONTAINER_HOSTS.search(v)}
        assert not leftover, f"{name}: untranslated container addresses {leftover}"
        # The image's PATH starts with its virtualenv; HOME=/tmp as in the Dockerfile.
        return {
            **env,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.tmp),
            "LANG": "C.UTF-8",
        }

    def _config_files(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """Compose's `configs:` mounts, as files here; variables naming them follow."""
        moved = {}
        for mount in self.service(name).get("configs", []):
            path = self.tmp / "configs" / mount["source"]
            path.parent.mkdir(exist_ok=True)
            path.write_text(self.compose["configs"][mount["source"]]["content"])
            moved.update({k: str(path) for k, v in env.items() if v == mount["target"]})
        return moved

    def healthcheck(self, name: str) -> list[str]:
        test = self.service(name)["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: an exec-form health check"
        return self.argv(test[1:])

    def healthy(self, name: str) -> bool:
        result = subprocess.run(
            self.healthcheck(name),
            cwd=APP_DIR,
            env=self.env(name),
            capture_output=True,
            timeout=15,
            check=False,
        )
        return result.returncode == 0


def _local_path(arg: str) -> str:
    return str(REPO / arg[len(IMAGE_ROOT) + 1 :]) if arg.startswith(f"{IMAGE_ROOT}/") else arg


@pytest.fixture
def stack(transactional_db: None, smtp_sink: SMTPSink, tmp_path: Path) -> Stack:
    db = settings.DATABASES["default"]
    return Stack(
        compose=load(),
        tmp=tmp_path,
        database_url=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        redis_url=os.environ["REDIS_URL"],
        smtp_port=int(os.environ["MAILROOM_TEST_SMTP_PORT"]),
        ports={"web": free_port(), "flower": free_port()},
    )


@pytest.fixture
def roles(stack: Stack) -> Iterator[dict[str, Role]]:
    """Every long-running role, started from its compose command; stopped at the end."""
    started: dict[str, Role] = {}
    try:
        for name in LONG_RUNNING_ROLES:
            argv = stack.argv(command(stack.service(name)))
            # Readiness is the health check below, not a log line.
            started[name] = Role(f"compose-{name}", argv, stack.env(name), ready="").start()
        yield started
    finally:
        for role in started.values():
            role.stop(timeout=20)


def _run(stack: Stack, name: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        stack.argv(command(stack.service(name))),
        cwd=APP_DIR,
        env=stack.env(name),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "localhost", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _exe(pid: int) -> str:
    """The program a process runs, from its command line (python -> the script or the
    module it runs: ``python -m celery`` is celery)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    names = [Path(arg.decode()).name for arg in args[:3]]
    if names[0].startswith("python") and len(names) > 1:
        return names[2] if names[1] == "-m" and len(names) > 2 else names[1]
    return names[0]


# --------------------------------------------------------------------------------------
# The translation itself
# --------------------------------------------------------------------------------------


def test_the_image_layout_is_what_the_translation_assumes() -> None:
    text = DOCKERFILE.read_text()
    assert f"COPY services/mailroom {IMAGE_ROOT}/services/mailroom" in text
    assert re.search(rf"COPY deploy/start-web\.sh .*{IMAGE_ROOT}/deploy/$", text, re.S | re.M)
    workdirs = re.findall(r"^WORKDIR (\S+)", text, re.M)
    assert _local_path(workdirs[-1]) == str(APP_DIR)


# --------------------------------------------------------------------------------------
# The one-shot
# --------------------------------------------------------------------------------------


def test_migrate_creates_the_schema_then_the_admin_and_prints_an_api_key_once(
    stack: Stack,
) -> None:
    first = _run(stack, "migrate")
    assert first.returncode == 0, first.stdout + first.stderr
    keys = re.findall(r"\bmr_\w{8}_\w{32}\b", first.stdout)
    assert keys, first.stdout
    assert apikeys.authenticate(keys[0]) is not None, "the printed key works"
    env = stack.env("migrate")
    admin = get_user_model().objects.get(username=env["DJANGO_SUPERUSER_USERNAME"])
    assert admin.is_superuser
    assert admin.check_password(env["DJANGO_SUPERUSER_PASSWORD"])

    again = _run(stack, "migrate")
    assert again.returncode == 0, again.stdout + again.stderr
    assert not re.search(r"\bmr_\w{8}_", again.stdout), "a second run prints no new key"
    assert get_user_model().objects.count() == 1


# --------------------------------------------------------------------------------------
# The long-running roles
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_every_role_starts_from_its_compose_command_becomes_healthy_and_works(
    stack: Stack, roles: dict[str, Role], smtp_sink: SMTPSink
) -> None:
    for name, role in roles.items():
        wait_until(
            partial(_healthy, stack, name, role), 90, interval=0.5, what=f"{name}'s health check"
        )
    for name, role in roles.items():
        assert role.proc is not None
        assert _exe(role.proc.pid) == EXECS[name], f"{name}: the start script must exec"

    # web: ready (Postgres and Redis answer), and /metrics wants the token of the
    # mounted config file.
    status, body = _get(stack.ports["web"], "/readyz")
    assert status == 200, body
    token = stack.compose["configs"]["metrics-token"]["content"]
    assert _get(stack.ports["web"], "/metrics")[0] in (401, 403)
    status, body = _get(stack.ports["web"], "/metrics", {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert b"mailroom_" in body

    # The pools consume their own queue and deliver.
    high = services.send_email(
        to="compose-high@example.com", subject="From worker-high", template="welcome"
    )
    [bulk] = services.send_bulk_batch(
        ["compose-bulk@example.com"], "From worker-bulk", {"headline": "Hi"}, "newsletter"
    )
    wait_for(lambda: smtp_sink.count() >= 2, 60, "both emails at the sink")
    assert {m.rcpt_to for m in smtp_sink.received} == {
        "compose-high@example.com",
        "compose-bulk@example.com",
    }
    for message in (high, bulk):
        message.refresh_from_db()
        assert message.status == Message.Status.SENT
    received = "Task email_service.deliver_bulk["
    assert received in _output(roles["worker-bulk"])
    assert received not in _output(roles["worker-high"])

    # beat ticks.
    wait_for(lambda: "Sending due task" in _output(roles["beat"]), 30, "beat to send a task")

    # Flower answers, behind the basic auth of the compose file.
    credentials = stack.env("flower")["FLOWER_BASIC_AUTH"]
    assert _get(stack.ports["flower"], "/")[0] == 401
    auth = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    assert _get(stack.ports["flower"], "/", auth)[0] == 200

    # The demo service's command, against these roles.
    smtp_sink.reset()
    demo = _run(stack, "demo", timeout=150)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    sent = re.search(r"All (\d+) demo emails delivered", demo.stdout)
    assert sent, demo.stdout
    assert smtp_sink.count() == int(sent[1]) >= 10

    # SIGTERM reaches the role's own process, which shuts down cleanly and soon.
    for role in roles.values():
        assert role.proc is not None
        role.proc.send_signal(signal.SIGTERM)
    for name, role in roles.items():
        assert role.proc is not None
        try:
            code = role.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running 30 s after SIGTERM:\n{role.log_tail()}")
        assert code == 0, f"{name} exited with {code}:\n{role.log_tail()}"


def _output(role: Role) -> str:
    """What the role printed in this run (its log file keeps earlier runs too)."""
    text = role.log_path.read_text(errors="replace")
    return text.rpartition("\n===== start ")[2]


def _healthy(stack: Stack, name: str, role: Role) -> bool:
    if role.proc is not None and role.proc.poll() is not None:
        raise AssertionError(f"{role.name} exited early:\n{role.log_tail()}")
    return stack.healthy(name)


# --------------------------------------------------------------------------------------
# The health check script's failures (the successes are above)
# --------------------------------------------------------------------------------------

HEALTHCHECK = REPO / "deploy" / "healthcheck.py"


def _check(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_worker_whose_heartbeat_went_stale_is_unhealthy(tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat"
    env = {"MAILROOM_WORKER_HEARTBEAT_FILE": str(heartbeat)}
    assert "no worker heartbeat file" in _check("worker", env=env).stderr
    heartbeat.touch()
    assert _check("worker", env=env).returncode == 0
    os.utime(heartbeat, (heartbeat.stat().st_atime, heartbeat.stat().st_mtime - 61))
    stale = _check("worker", env=env)
    assert stale.returncode == 1
    assert "old (limit 60s)" in stale.stderr


def test_beat_is_unhealthy_once_its_schedule_stops_changing(tmp_path: Path) -> None:
    schedule = tmp_path / "celerybeat-schedule"
    env = {"MAILROOM_BEAT_SCHEDULE": str(schedule), "MAILROOM_BEAT_MAX_AGE": "30"}
    assert _check("beat", env=env).returncode == 1
    # dbm may add a suffix to the name it is given.
    written = tmp_path / "celerybeat-schedule.dat"
    written.touch()
    assert _check("beat", env=env).returncode == 0
    os.utime(written, (written.stat().st_atime, written.stat().st_mtime - 31))
    assert _check("beat", env=env).returncode == 1


def test_web_and_flower_are_unhealthy_when_nothing_answers() -> None:
    port = str(free_port())
    down = _check("web", "--ready", env={"MAILROOM_WEB_BIND": f"0.0.0.0:{port}"})
    assert down.returncode == 1
    assert f"GET /readyz on port {port}" in down.stderr
    assert _check("flower", env={"FLOWER_PORT": port}).returncode == 1
    assert _check("nonsense", env={}).returncode == 2
