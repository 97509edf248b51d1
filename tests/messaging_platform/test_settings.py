"""Settings come from the environment only; a bad value stops the process at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from messaging_platform import env

APP_DIR = Path(__file__).resolve().parents[2] / "services" / "mailroom"
BASE_ENV = {
    "PATH": os.environ["PATH"],
    "SECRET_KEY": "x",
    "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
}


def _start(then: str = "print('started')", **overrides: str) -> subprocess.CompletedProcess[str]:
    """Django set up in a fresh process with this environment, then ``then`` run."""
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {then}"],
        cwd=APP_DIR,
        env=BASE_ENV | overrides,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_defaults_start() -> None:
    result = _start()
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"EMAIL_PORT": "twenty-five"}, "EMAIL_PORT must be an integer, got 'twenty-five'"),
        ({"EMAIL_PORT": "0"}, "EMAIL_PORT must be at least 1"),
        ({"EMAIL_USE_TLS": "maybe"}, "EMAIL_USE_TLS must be a boolean"),
        ({"EMAIL_USE_TLS": "1", "EMAIL_USE_SSL": "1"}, "mutually exclusive"),
        ({"EMAIL_TIMEOUT": "soon"}, "EMAIL_TIMEOUT must be a number"),
        ({"MAILROOM_MAX_RETRIES": "-1"}, "MAILROOM_MAX_RETRIES must be at least 0"),
        ({"MAILROOM_BATCH_SIZE": "0"}, "MAILROOM_BATCH_SIZE must be at least 1"),
        ({"MAILROOM_MESSAGES_PER_CONNECTION": "x"}, "MAILROOM_MESSAGES_PER_CONNECTION must be"),
        ({"DATABASE_URL": "mysql://root@localhost/mail"}, "DATABASE_URL must point at PostgreSQL"),
        ({"DEBUG": "perhaps"}, "DEBUG must be a boolean"),
        ({"CELERY_TASK_TIME_LIMIT": "100"}, "CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT"),
        ({"SECRET_KEY_FILE": "/nonexistent/secret"}, "SECRET_KEY_FILE: cannot read"),
        ({"MAILROOM_WEB_TIMEOUT": "5"}, "MAILROOM_WEB_TIMEOUT must be at least 10"),
        (
            {"MAILROOM_WEB_TIMEOUT": "60", "MAILROOM_API_INGEST_SECONDS": "60"},
            "MAILROOM_API_INGEST_SECONDS (60) must be below MAILROOM_WEB_TIMEOUT (60)",
        ),
    ],
)
def test_a_bad_value_stops_the_start_naming_the_variable(
    overrides: dict[str, str], message: str
) -> None:
    result = _start(**overrides)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr


def test_secret_key_is_required_outside_debug() -> None:
    result = _start(SECRET_KEY="")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_a_secret_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("EMAIL_HOST_PASSWORD_FILE", str(secret))
    assert env.env_secret("EMAIL_HOST_PASSWORD", "") == "s3cret"


def test_helpers_read_typed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_BOOL", "Yes")
    monkeypatch.setenv("X_INT", "42")
    monkeypatch.setenv("X_LIST", "a.example.com, b.example.com,,")
    assert env.env_bool("X_BOOL", False) is True
    assert env.env_int("X_INT", 1, minimum=1) == 42
    assert env.env_list("X_LIST", []) == ["a.example.com", "b.example.com"]
    assert env.env_float("X_UNSET_FLOAT", 2.5) == 2.5
    monkeypatch.setenv("X_INT", "4.2")
    with pytest.raises(ImproperlyConfigured, match="X_INT must be an integer"):
        env.env_int("X_INT", 1)


GUNICORN_CONF = APP_DIR.parents[1] / "deploy" / "gunicorn.conf.py"


def _gunicorn_timeout(metrics_dir: Path, **overrides: str) -> int:
    """The ``timeout`` gunicorn takes from deploy/gunicorn.conf.py with this environment
    (``metrics_dir``: so that loading the file makes no directory of its own)."""
    code = f"import runpy; print(runpy.run_path({str(GUNICORN_CONF)!r})['timeout'])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=BASE_ENV | {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)} | overrides,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def _ingest_seconds(**overrides: str) -> float:
    code = "from django.conf import settings as s; print(s.MAILROOM_API_INGEST_SECONDS)"
    result = _start(code, **overrides)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


@pytest.mark.parametrize("overrides", [{}, {"MAILROOM_WEB_TIMEOUT": "120"}])
def test_the_api_stops_adding_recipients_before_gunicorn_would_kill_the_worker(
    overrides: dict[str, str], tmp_path: Path
) -> None:
    """gunicorn and Django read the same MAILROOM_WEB_TIMEOUT; the API's ingest budget
    ends well inside it, so a long list gets a 413, never a killed worker."""
    timeout = _gunicorn_timeout(tmp_path, **overrides)
    assert timeout == int(overrides.get("MAILROOM_WEB_TIMEOUT", "300"))
    assert _ingest_seconds(**overrides) <= 0.8 * timeout
