"""The system checks of Mailroom's settings (messaging_platform/checks.py): what each one
finds, `manage.py check` in a fresh process, and every role's start script refusing to
start with a setting that cannot work, naming the variable."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core import checks as django_checks
from django.core.exceptions import ImproperlyConfigured
from pytest_django.fixtures import Settings as SettingsWrapper

from mailroom_testkit.processes import APP_DIR, DEPLOY_DIR, free_port
from messaging_platform import checks

BAD_SENDER = "noreply@mailroom.test"
GOOD_SENDER = "Mailroom <noreply@mailroom.example.com>"


def _ids(messages: list[django_checks.CheckMessage]) -> list[str]:
    return sorted(str(m.id) for m in messages)


# --------------------------------------------------------------------------------------
# What each check finds
# --------------------------------------------------------------------------------------


def test_the_test_settings_pass_every_check() -> None:
    errors, warnings = checks.problems()
    assert not errors, errors
    # The tests' short CELERY_VISIBILITY_TIMEOUT (60 s, for recovery within a test) is
    # below the default countdown horizon: suspicious, and said so.
    assert _ids(warnings) in ([], ["mailroom.W031"]), warnings


@pytest.mark.parametrize(
    "sender",
    [
        BAD_SENDER,
        "Mailroom <noreply@localhost>",
        "noreply@mailroom.invalid",
        "not an address",
        "a@example.com, b@example.com",
        "",
    ],
)
def test_a_default_from_email_no_send_accepts_is_an_error(
    settings: SettingsWrapper, sender: str
) -> None:
    settings.DEFAULT_FROM_EMAIL = sender
    [error] = checks.check_senders()
    assert error.id == "mailroom.E001"
    assert error.level == django_checks.ERROR
    assert error.msg.startswith(f"DEFAULT_FROM_EMAIL={sender!r} cannot be sent from: ")
    assert error.hint


@pytest.mark.parametrize("sender", [GOOD_SENDER, '"Bank, Inc" <billing@example.com>'])
def test_a_sendable_default_from_email_passes(settings: SettingsWrapper, sender: str) -> None:
    settings.DEFAULT_FROM_EMAIL = sender
    assert checks.check_senders() == []


def test_every_bad_allowed_sender_is_named(settings: SettingsWrapper) -> None:
    settings.MAILROOM_ALLOWED_SENDERS = [
        "example.com",
        "billing@example.com",
        "mailroom.test",
        "*.example.com",
        "ops@corp.local",
    ]
    found = checks.check_senders()
    assert _ids(found) == ["mailroom.E002"] * 3
    named = " ".join(m.msg for m in found)
    for entry in ("'mailroom.test'", "'*.example.com'", "'ops@corp.local'"):
        assert entry in named
    assert "MAILROOM_ALLOWED_SENDERS" in named


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("MAILROOM_UNSUBSCRIBE_MAILTO", "mailto:unsubscribe@example.com", "mailroom.E003"),
        ("MAILROOM_UNSUBSCRIBE_MAILTO", "unsubscribe@mailroom.test", "mailroom.E003"),
        ("MAILROOM_MESSAGE_ID_DOMAIN", "mail.test", "mailroom.E004"),
        ("MAILROOM_MESSAGE_ID_DOMAIN", "ids@example.com", "mailroom.E004"),
        ("MAILROOM_DKIM_DOMAIN", "example.com", "mailroom.E005"),
    ],
)
def test_other_sender_settings_are_checked(
    settings: SettingsWrapper, name: str, value: str, check_id: str
) -> None:
    setattr(settings, name, value)
    [error] = checks.check_senders()
    assert error.id == check_id
    # DKIM names what is missing: the other two of its three variables.
    assert (name if check_id != "mailroom.E005" else "MAILROOM_DKIM_SELECTOR") in error.msg


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mail.example.com", "http:// or https://"),
        ("ftp://mail.example.com", "http:// or https://"),
        ("https://", "no host"),
        ("https://user:secret@mail.example.com", "user or password"),
        ("https://mail.example.com/?x=1", "query"),
        ("https://mail.example.com:99999", "does not parse"),
    ],
)
def test_a_public_url_that_cannot_make_links_is_an_error(
    settings: SettingsWrapper, url: str, reason: str
) -> None:
    settings.MAILROOM_PUBLIC_URL = url
    [error] = checks.check_urls()
    assert error.id == "mailroom.E010"
    assert f"MAILROOM_PUBLIC_URL={url!r}" in error.msg
    assert reason in error.msg


def test_a_plain_http_public_url_is_a_warning_unless_local(settings: SettingsWrapper) -> None:
    settings.MAILROOM_PUBLIC_URL = "http://mail.example.com"
    [warning] = checks.check_urls()
    assert warning.id == "mailroom.W011"
    assert warning.level == django_checks.WARNING
    for local in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"):
        settings.MAILROOM_PUBLIC_URL = local
        assert checks.check_urls() == [], local


def test_a_public_url_too_long_for_list_unsubscribe_is_an_error(settings: SettingsWrapper) -> None:
    settings.MAILROOM_PUBLIC_URL = "https://mail.example.com/" + "x" * 1000
    [error] = checks.check_urls()
    assert error.id == "mailroom.E012"
    assert "MAILROOM_PUBLIC_URL" in error.msg


def test_dashboard_links_origins_and_redis_url_are_checked(settings: SettingsWrapper) -> None:
    settings.MAILROOM_GRAFANA_URL = "https://"
    settings.CSRF_TRUSTED_ORIGINS = ["https://ok.example.com", "https://mail.example.com/app"]
    settings.REDIS_URL = "127.0.0.1:6379"
    found = checks.check_urls()
    assert _ids(found) == ["mailroom.E013", "mailroom.E014", "mailroom.E015"]
    text = " ".join(m.msg for m in found)
    for name in ("MAILROOM_GRAFANA_URL", "CSRF_TRUSTED_ORIGINS", "REDIS_URL"):
        assert name in text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"EMAIL_PORT": 70000}, ["mailroom.E020"]),
        ({"EMAIL_USE_SSL": True, "EMAIL_PORT": 587}, ["mailroom.W021"]),
        ({"EMAIL_USE_SSL": True, "EMAIL_PORT": 465}, []),
        ({"EMAIL_USE_TLS": True, "EMAIL_PORT": 465}, ["mailroom.W022"]),
        ({"EMAIL_USE_TLS": True, "EMAIL_PORT": 587}, []),
        ({"EMAIL_HOST_USER": "mailroom", "EMAIL_HOST_PASSWORD": ""}, ["mailroom.E023"]),
        ({"EMAIL_HOST_USER": "", "EMAIL_HOST_PASSWORD": "secret"}, ["mailroom.W024"]),
        (
            {"EMAIL_HOST": "smtp.example.net", "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": "p"},
            ["mailroom.W025"],
        ),
        (
            {
                "EMAIL_HOST": "smtp.example.net",
                "EMAIL_PORT": 587,
                "EMAIL_USE_TLS": True,
                "EMAIL_HOST_USER": "u",
                "EMAIL_HOST_PASSWORD": "p",
            },
            [],
        ),
    ],
)
def test_smtp_ports_tls_and_credentials(
    settings: SettingsWrapper, overrides: dict[str, object], expected: list[str]
) -> None:
    for name, value in overrides.items():
        setattr(settings, name, value)
    assert _ids(checks.check_smtp()) == expected


def test_limits_that_contradict_each_other_are_warnings(settings: SettingsWrapper) -> None:
    settings.MAILROOM_RETRY_BASE_SECONDS = 60.0
    settings.MAILROOM_RETRY_MAX_SECONDS = 30.0
    settings.MAILROOM_MAX_COUNTDOWN_SECONDS = 7200.0
    settings.MAILROOM_API_MAX_UPLOAD_BYTES = 1024
    found = checks.check_limits()
    assert _ids(found) == ["mailroom.W030", "mailroom.W031", "mailroom.W032"]
    assert all(m.level == django_checks.WARNING and m.hint for m in found)


def test_enforce_raises_naming_the_variable_and_lets_warnings_pass(
    settings: SettingsWrapper,
) -> None:
    settings.EMAIL_USE_SSL = True
    settings.EMAIL_PORT = 587
    printed = io.StringIO()
    checks.enforce("worker", printed)
    assert "worker: ?: (mailroom.W021)" in printed.getvalue()
    settings.DEFAULT_FROM_EMAIL = BAD_SENDER
    with pytest.raises(ImproperlyConfigured, match=r"mailroom\.E001") as raised:
        checks.enforce("worker", printed)
    assert "DEFAULT_FROM_EMAIL" in str(raised.value)


def test_a_silenced_check_is_left_out(settings: SettingsWrapper) -> None:
    settings.DEFAULT_FROM_EMAIL = BAD_SENDER
    settings.SILENCED_SYSTEM_CHECKS = ["mailroom.E001"]
    assert checks.problems()[0] == []


# --------------------------------------------------------------------------------------
# manage.py check, in a fresh process
# --------------------------------------------------------------------------------------


def _role_env(
    tmp_path: Path, overrides: dict[str, str], base: dict[str, str] | None = None
) -> dict[str, str]:
    """The tests' environment (tests/settings.py) for a process started here, as the roles
    get it (``base``: the ``role_env`` fixture's, pointed at the test database)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.update(base or {})
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
            "REDIS_URL": os.environ["REDIS_URL"],
            "EMAIL_PORT": os.environ["EMAIL_PORT"],
            "MAILROOM_PYTHON": sys.executable,
            "PYTHONUNBUFFERED": "1",
            "MAILROOM_WORKER_QUEUE": "bulk",
            "MAILROOM_WORKER_HEARTBEAT_FILE": str(tmp_path / "heartbeat"),
            "MAILROOM_BEAT_SCHEDULE": str(tmp_path / "celerybeat-schedule"),
            "MAILROOM_WEB_BIND": f"127.0.0.1:{free_port()}",
            "MAILROOM_MIGRATIONS_TIMEOUT": "30",
        }
    )
    env.update(overrides)
    return env


def _manage_check(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--fail-level", "ERROR"],
        cwd=APP_DIR,
        env=_role_env(tmp_path, overrides),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_manage_py_check_fails_on_a_special_use_sender_naming_it(tmp_path: Path) -> None:
    result = _manage_check(tmp_path, DEFAULT_FROM_EMAIL=BAD_SENDER)
    assert result.returncode != 0
    assert "mailroom.E001" in result.stderr
    assert f"DEFAULT_FROM_EMAIL={BAD_SENDER!r}" in result.stderr
    assert "special-use or reserved name" in result.stderr


def test_manage_py_check_passes_with_a_good_sender(tmp_path: Path) -> None:
    result = _manage_check(tmp_path, DEFAULT_FROM_EMAIL=GOOD_SENDER)
    assert result.returncode == 0, result.stderr
    assert "mailroom.E" not in result.stdout + result.stderr


def test_manage_py_check_prints_a_warning_and_passes(tmp_path: Path) -> None:
    result = _manage_check(tmp_path, EMAIL_USE_SSL="true", EMAIL_PORT="587")
    assert result.returncode == 0, result.stderr
    assert "mailroom.W021" in result.stderr


# --------------------------------------------------------------------------------------
# Every role's start refuses a setting that cannot work
# --------------------------------------------------------------------------------------

# Flower runs no checks: it sends no mail, and it shows the workers a bad setting stopped.
CHECKED_SCRIPTS = sorted(
    {p.name for p in DEPLOY_DIR.glob("start-*.sh")} - {"start-flower.sh"}
    | {"migrate.sh", "wait-for-migrations.sh"}
)


def test_every_start_script_but_flowers_is_covered() -> None:
    assert {"start-web.sh", "start-worker.sh", "start-beat.sh"} <= set(CHECKED_SCRIPTS)


@pytest.mark.parametrize("script", CHECKED_SCRIPTS)
def test_a_role_does_not_start_with_a_sender_no_send_accepts(
    role_env: dict[str, str], tmp_path: Path, script: str
) -> None:
    """Run from elsewhere (the scripts find their own way), against the test database
    (`migrate` looks at it while it checks)."""
    started = time.monotonic()
    result = subprocess.run(
        [str(DEPLOY_DIR / script)],
        cwd=tmp_path,
        env=_role_env(tmp_path, {"DEFAULT_FROM_EMAIL": BAD_SENDER}, role_env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "mailroom.E001" in output, output
    assert f"DEFAULT_FROM_EMAIL={BAD_SENDER!r}" in output
    assert seconds < 30, f"{script} took {seconds:.1f}s to give up"
