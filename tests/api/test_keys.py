"""API keys from the command line: shown once, stored only as a hash, revocable."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from django.db import connection

from email_service.models import ApiKey
from mailroom_testkit.processes import APP_DIR
from tests.api.conftest import ApiClient

pytestmark = pytest.mark.django_db(transaction=True)


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py`` as an operator runs it, against the test database."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=APP_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _table_text() -> str:
    """Every value of every row of the API key table, as text."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiKey._meta.db_table}")  # noqa: S608
        return repr(cursor.fetchall())


def test_a_key_created_by_the_command_works_and_only_its_hash_is_stored(
    api_server: str, role_env: dict[str, str]
) -> None:
    created = manage(role_env, "create_api_key", "billing", "--scopes", "send")

    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("mr_")
    assert "only now" in created.stdout
    response = ApiClient(api_server, key).get("/api/v1/templates")
    assert response.status_code == 200
    [row] = ApiKey.objects.all()
    assert row.name == "billing"
    assert row.scopes == ["send"]
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key.split("_")[1] == row.prefix
    # The table holds no usable key: not the key, nor its secret part.
    table = _table_text()
    assert key not in table
    assert key.split("_")[2] not in table
    # What the table does hold is not a key either.
    for stored in (row.key_hash, f"mr_{row.prefix}_{row.key_hash}"):
        assert ApiClient(api_server, stored).get("/api/v1/templates").status_code == 401


def test_quiet_prints_only_the_key(api_server: str, role_env: dict[str, str]) -> None:
    created = manage(role_env, "create_api_key", "ops", "--scopes", "admin", "--quiet")

    key = created.stdout.strip()
    assert created.returncode == 0
    assert len(key.splitlines()) == 1
    assert ApiClient(api_server, key).post("/api/v1/bulk/pause").json() == {"paused": True}


def test_a_revoked_key_gets_401(api_server: str, role_env: dict[str, str]) -> None:
    key = manage(role_env, "create_api_key", "old-service", "--quiet").stdout.strip()
    client = ApiClient(api_server, key)
    before = client.get("/api/v1/templates").status_code

    revoked = manage(role_env, "revoke_api_key", key.split("_")[1])
    after = client.get("/api/v1/templates")

    assert before == 200
    assert revoked.returncode == 0, revoked.stderr
    assert "Revoked 'old-service'" in revoked.stdout
    assert after.status_code == 401
    assert after.json()["error"] == "unauthorized"


def test_revoking_by_name_revokes_every_live_key_of_that_name(
    api_server: str, role_env: dict[str, str]
) -> None:
    keys = [manage(role_env, "create_api_key", "twin", "--quiet").stdout.strip() for _ in range(2)]

    revoked = manage(role_env, "revoke_api_key", "twin")

    assert revoked.returncode == 0
    assert revoked.stdout.count("Revoked") == 2
    assert [ApiClient(api_server, k).get("/api/v1/templates").status_code for k in keys] == [
        401,
        401,
    ]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("revoke_api_key", "nosuchkey"), "no live API key"),
        (("create_api_key", "svc", "--rate", "0"), "must be 1 or more"),
        (("create_api_key", " "), "name: must not be empty"),
    ],
)
def test_a_command_refused_by_the_service_exits_non_zero_with_one_line(
    role_env: dict[str, str], args: tuple[str, ...], reason: str
) -> None:
    result = manage(role_env, *args)

    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert reason in line


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("create_api_key",), "the following arguments are required: name"),
        (("create_api_key", "svc", "--scopes", "everything"), "invalid choice: 'everything'"),
        (("create_api_key", "svc", "--rate", "many"), "invalid int value: 'many'"),
        (("revoke_api_key",), "the following arguments are required: key"),
    ],
)
def test_bad_arguments_exit_non_zero_naming_the_problem_on_one_line(
    role_env: dict[str, str], args: tuple[str, ...], reason: str
) -> None:
    result = manage(role_env, *args)

    assert result.returncode != 0
    # argparse prints the usage, then the reason on one line.
    assert reason in result.stderr.strip().splitlines()[-1]
    assert not ApiKey.objects.exists()
