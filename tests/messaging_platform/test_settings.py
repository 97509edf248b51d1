"""Settings come from the environment only; a bad value stops the process at start."""

from __future__ import annotations

import json
import os
import secrets
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
        ({"SESSION_COOKIE_SECURE": "sure"}, "SESSION_COOKIE_SECURE must be a boolean"),
        ({"SECURE_HSTS_SECONDS": "-1"}, "SECURE_HSTS_SECONDS must be at least 0"),
        ({"SECURE_HSTS_SECONDS": "1y"}, "SECURE_HSTS_SECONDS must be an integer"),
        ({"MAILROOM_TRUST_X_FORWARDED_PROTO": "maybe"}, "MAILROOM_TRUST_X_FORWARDED_PROTO must"),
        (
            {"CSRF_TRUSTED_ORIGINS": "https://ok.example.com,mail.example.com"},
            "CSRF_TRUSTED_ORIGINS must be origins such as https://mail.example.com, "
            "got 'mail.example.com'",
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


# --------------------------------------------------------------------------------------
# HTTPS hardening: `manage.py check --deploy` as an operator runs it before going live
# --------------------------------------------------------------------------------------

SECURE_ENV = {
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_SSL_REDIRECT": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "SECURE_HSTS_PRELOAD": "true",
    "MAILROOM_TRUST_X_FORWARDED_PROTO": "true",
    "CSRF_TRUSTED_ORIGINS": "https://mail.example.com",
}
# The warnings each of the secure settings above silences, off.
INSECURE_WARNINGS = ("security.W004", "security.W008", "security.W012", "security.W016")


def _production_env(**overrides: str) -> dict[str, str]:
    """Outside debug, a long random key, a real host name, and the secure settings."""
    return {
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "mail.example.com",
        **SECURE_ENV,
        **overrides,
    }


def _check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=APP_DIR,
        env=BASE_ENV | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_deploy_finds_nothing_in_the_production_environment() -> None:
    result = _check_deploy(_production_env())
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_names_each_secure_setting_left_off() -> None:
    off = dict.fromkeys(SECURE_ENV, "")
    result = _check_deploy(_production_env(**off))
    assert result.returncode != 0
    for warning in INSECURE_WARNINGS:
        assert warning in result.stderr, warning


SECURE_SETTINGS = (
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
    "CSRF_TRUSTED_ORIGINS",
    "SECURE_CONTENT_TYPE_NOSNIFF",
    "SECURE_REDIRECT_EXEMPT",
)


def _secure_settings(**overrides: str) -> dict[str, object]:
    code = (
        "import json; from django.conf import settings as s; "
        f"print(json.dumps({{n: getattr(s, n) for n in {SECURE_SETTINGS!r}}}))"
    )
    result = _start(code, **overrides)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_the_secure_settings_are_off_by_default_outside_debug_too() -> None:
    """`make dev`, the tests and `docker compose up` serve http on localhost."""
    for debug in ("true", "false"):
        assert _secure_settings(DEBUG=debug) == {
            "SESSION_COOKIE_SECURE": False,
            "CSRF_COOKIE_SECURE": False,
            "SECURE_SSL_REDIRECT": False,
            "SECURE_HSTS_SECONDS": 0,
            "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
            "SECURE_HSTS_PRELOAD": False,
            "SECURE_PROXY_SSL_HEADER": None,
            "CSRF_TRUSTED_ORIGINS": [],
            "SECURE_CONTENT_TYPE_NOSNIFF": True,
            "SECURE_REDIRECT_EXEMPT": ["^healthz$", "^readyz$", "^metrics$"],
        }


def test_each_secure_setting_comes_from_its_variable() -> None:
    values = _secure_settings(
        **SECURE_ENV
        | {
            "CSRF_TRUSTED_ORIGINS": "https://mail.example.com, https://mail.example.org:8443",
            "SECURE_CONTENT_TYPE_NOSNIFF": "false",
        }
    )
    assert values == {
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "CSRF_TRUSTED_ORIGINS": ["https://mail.example.com", "https://mail.example.org:8443"],
        "SECURE_CONTENT_TYPE_NOSNIFF": False,
        "SECURE_REDIRECT_EXEMPT": ["^healthz$", "^readyz$", "^metrics$"],
    }
