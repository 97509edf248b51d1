"""Who gets in: staff only, through a login that is throttled."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.test import Client

from email_service import services
from tests.dashboard.conftest import PASSWORD, make_campaign

pytestmark = pytest.mark.django_db

CAMPAIGN = uuid.UUID(int=1)  # fixed: test ids must be the same in every xdist worker
PAGES = ["/dashboard/", "/dashboard/data"]
CONTROLS = [
    "/dashboard/bulk/pause",
    "/dashboard/bulk/resume",
    f"/dashboard/campaigns/{CAMPAIGN}/start",
    f"/dashboard/campaigns/{CAMPAIGN}/pause",
    f"/dashboard/campaigns/{CAMPAIGN}/resume",
    f"/dashboard/campaigns/{CAMPAIGN}/cancel",
    f"/dashboard/campaigns/{CAMPAIGN}/retry",
    "/dashboard/suppressions/add",
    "/dashboard/suppressions/remove",
]


def _login(client: Client, username: str, password: str, **extra: Any):
    return client.post("/login/", {"username": username, "password": password}, **extra)


@pytest.mark.parametrize("path", PAGES)
def test_anonymous_users_are_sent_to_the_login_page(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=/dashboard/")


@pytest.mark.parametrize("path", CONTROLS)
def test_anonymous_posts_to_controls_are_sent_to_login_and_change_nothing(path: str) -> None:
    response = Client().post(path, {"address": "x@example.com", "confirmed": "yes"})
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/dashboard/"
    assert services.is_bulk_paused() is False
    assert services.list_suppressions()[0] == []


@pytest.mark.parametrize("path", PAGES)
def test_a_signed_in_user_who_is_not_staff_gets_403(plain_user: User, path: str) -> None:
    client = Client()
    client.force_login(plain_user)
    response = client.get(path)
    assert response.status_code == 403
    assert b"Staff only" in response.content


def test_a_user_who_is_not_staff_cannot_press_a_control(plain_user: User) -> None:
    client = Client()
    client.force_login(plain_user)
    response = client.post("/dashboard/bulk/pause", {"confirmed": "yes"})
    assert response.status_code == 403
    assert services.is_bulk_paused() is False


def test_staff_see_the_dashboard(staff_client: Client) -> None:
    response = staff_client.get("/dashboard/")
    assert response.status_code == 200
    for heading in ("Delivery", "Queues and workers", "Throughput", "Campaigns",
                    "Retries in progress", "Recent failures", "Suppression list"):  # fmt: skip
        assert heading.encode() in response.content, heading
    assert response["Cache-Control"].startswith("max-age=0")


def test_the_login_page_signs_staff_in_and_sends_them_to_the_dashboard(
    staff_user: User,
) -> None:
    client = Client()
    page = client.get("/login/?next=/dashboard/")
    assert page.status_code == 200
    assert b'name="password"' in page.content
    response = client.post(
        "/login/", {"username": "operator", "password": PASSWORD, "next": "/dashboard/"}
    )
    assert response.status_code == 302
    assert response["Location"] == "/dashboard/"
    assert client.get("/dashboard/").status_code == 200


def test_signing_out_is_a_post(staff_client: Client) -> None:
    assert staff_client.get("/logout/").status_code == 405
    assert staff_client.get("/dashboard/").status_code == 200
    response = staff_client.post("/logout/")
    assert response.status_code == 302
    assert staff_client.get("/dashboard/").status_code == 302


def test_the_sixth_attempt_after_five_failures_is_refused_with_429_even_with_the_password(
    staff_user: User,
) -> None:
    client = Client()
    for _ in range(5):
        response = _login(client, "operator", "wrong")
        assert response.status_code == 200
        assert b"Please enter a correct username and password" in response.content
    refused = _login(client, "operator", PASSWORD)
    assert refused.status_code == 429
    assert b"Too many failed sign-ins" in refused.content
    assert 840 < int(refused["Retry-After"]) <= 900
    assert client.get("/dashboard/").status_code == 302, "not signed in"


def test_the_throttle_is_per_username_and_address(staff_user: User) -> None:
    User.objects.create_user("other", password=PASSWORD, is_staff=True)
    client = Client()
    for _ in range(5):
        _login(client, "operator", "wrong")
    assert _login(client, "operator", PASSWORD).status_code == 429
    assert _login(client, "other", PASSWORD).status_code == 302, "another username"
    elsewhere = Client()
    response = _login(elsewhere, "operator", PASSWORD, REMOTE_ADDR="192.0.2.7")
    assert response.status_code == 302, "the same username from another address"


def test_a_successful_sign_in_forgets_earlier_failures(staff_user: User) -> None:
    client = Client()
    for _ in range(4):
        _login(client, "operator", "wrong")
    assert _login(client, "operator", PASSWORD).status_code == 302
    for _ in range(4):
        assert _login(Client(), "operator", "wrong").status_code == 200
    assert _login(Client(), "operator", PASSWORD).status_code == 302


def test_sign_ins_are_allowed_again_when_the_window_has_passed(
    staff_user: User, settings, redis_server: redis.Redis
) -> None:
    settings.MAILROOM_LOGIN_WINDOW_SECONDS = 60
    client = Client()
    for _ in range(5):
        _login(client, "operator", "wrong")
    refused = _login(client, "operator", PASSWORD)
    assert refused.status_code == 429
    assert 0 < int(refused["Retry-After"]) <= 60
    [key] = redis_server.keys("mailroom:login_failures:*")
    redis_server.pexpire(key, 300)  # the rest of the window passes
    time.sleep(0.5)
    assert _login(client, "operator", PASSWORD).status_code == 302


def test_the_admin_login_is_throttled_too(staff_user: User) -> None:
    client = Client()
    for _ in range(5):
        _login(client, "operator", "wrong")
    response = client.post(
        "/admin/login/", {"username": "operator", "password": PASSWORD, "next": "/admin/"}
    )
    assert response.status_code == 200, "the admin form refuses the right password"
    assert client.get("/admin/").status_code == 302


def test_the_failure_counter_holds_no_username_or_address_in_clear(
    staff_user: User, redis_server: redis.Redis
) -> None:
    _login(Client(), "operator", "wrong")
    keys = [k.decode() if isinstance(k, bytes) else k for k in redis_server.keys("*")]
    assert len(keys) == 1
    assert keys[0].startswith("mailroom:login_failures:")
    assert "operator" not in keys[0]
    assert "127.0.0.1" not in keys[0]


def test_without_redis_sign_ins_still_work(
    staff_user: User, redis_process, redis_server: redis.Redis
) -> None:
    redis_process.stop()
    try:
        assert _login(Client(), "operator", "wrong").status_code == 200
        assert _login(Client(), "operator", PASSWORD).status_code == 302
    finally:
        redis_process.start()


def test_a_campaign_page_of_another_id_is_404_for_staff(staff_client: Client) -> None:
    make_campaign()
    response = staff_client.post(f"/dashboard/campaigns/{CAMPAIGN}/pause", {"confirmed": "yes"})
    assert response.status_code == 404
