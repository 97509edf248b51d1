"""The bulk switch, suppressions, templates and figures through gunicorn."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from email_service import services
from email_service.models import Message, Suppression
from mailroom_testkit.processes import RedisServer
from tests.api.conftest import ApiClient

pytestmark = pytest.mark.django_db(transaction=True)


# --------------------------------------------------------------------------------------
# The bulk switch
# --------------------------------------------------------------------------------------


def test_bulk_pause_and_resume_flip_the_global_switch(client: ApiClient) -> None:
    paused = client.post("/api/v1/bulk/pause")
    figures = client.get("/api/v1/stats").json()
    resumed = client.post("/api/v1/bulk/resume")

    assert paused.status_code == 200
    assert paused.json() == {"paused": True}
    assert figures["bulk_paused"] is True
    assert resumed.json() == {"paused": False}
    assert services.is_bulk_paused() is False


def test_pausing_twice_is_harmless(client: ApiClient) -> None:
    client.post("/api/v1/bulk/pause")

    assert client.post("/api/v1/bulk/pause").json() == {"paused": True}
    assert services.is_bulk_paused() is True


def test_the_switch_and_the_suppression_list_need_the_admin_scope(
    client: ApiClient, make_key: Callable[..., str]
) -> None:
    key = make_key("send", "campaigns")

    responses = [
        client.post("/api/v1/bulk/pause", key=key),
        client.post("/api/v1/bulk/resume", key=key),
        client.get("/api/v1/suppressions", key=key),
        client.post("/api/v1/suppressions", json={"address": "a@example.com"}, key=key),
        client.delete("/api/v1/suppressions/a@example.com", key=key),
    ]

    assert [r.status_code for r in responses] == [403] * 5
    assert all("admin" in r.json()["detail"] for r in responses)
    assert services.is_bulk_paused() is False
    assert not Suppression.objects.exists()


# --------------------------------------------------------------------------------------
# Suppressions
# --------------------------------------------------------------------------------------


def test_a_suppressed_address_gets_no_mail_until_the_suppression_is_lifted(
    client: ApiClient,
) -> None:
    added = client.post(
        "/api/v1/suppressions", json={"address": "Ann@Example.com", "detail": "asked by phone"}
    )
    blocked = client.post(
        "/api/v1/messages",
        json={"to": "ann@example.com", "subject": "Hi", "template": "welcome"},
    )
    lifted = client.delete("/api/v1/suppressions/ANN@example.com")
    again = client.delete("/api/v1/suppressions/ann@example.com")
    allowed = client.post(
        "/api/v1/messages",
        json={"to": "ann@example.com", "subject": "Hi again", "template": "welcome"},
    )

    assert added.status_code == 201
    assert added.json()["address"] == "ann@example.com"
    assert added.json()["reason"] == "manual"
    assert added.json()["detail"] == "asked by phone"
    assert blocked.json()["status"] == "suppressed"
    assert lifted.status_code == 204
    assert lifted.content == b""
    assert again.status_code == 404
    assert again.json()["error"] == "not_found"
    assert allowed.json()["status"] == "queued"


def test_suppressing_again_keeps_the_first_reason(client: ApiClient) -> None:
    services.suppress("bob@example.com", Suppression.Reason.HARD_BOUNCE, "550 no such user")

    response = client.post(
        "/api/v1/suppressions", json={"address": "bob@example.com", "reason": "complaint"}
    )

    assert response.status_code == 201
    assert response.json()["reason"] == "hard_bounce"
    assert Suppression.objects.count() == 1


def test_the_suppression_list_is_searched_and_paginated(client: ApiClient) -> None:
    for name in ("ann", "bob", "cy", "dee", "eve"):
        services.suppress(f"{name}@example.com", "manual")
    services.suppress("zed@other.example", "unsubscribe")

    found = client.get("/api/v1/suppressions", params={"q": "OTHER"}).json()
    pages: list[list[str]] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2, "q": "@example.com"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/suppressions", params=params).json()
        pages.append([s["address"] for s in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert [s["address"] for s in found["items"]] == ["zed@other.example"]
    assert found["items"][0]["reason"] == "unsubscribe"
    assert found["next_cursor"] is None
    assert pages == [
        ["ann@example.com", "bob@example.com"],
        ["cy@example.com", "dee@example.com"],
        ["eve@example.com"],
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "not an address"}, "address"),
        ({}, "address"),
        ({"address": "ann@example.com", "reason": "because"}, "reason"),
        ({"address": "ann@example.com", "detail": "a\x00b"}, "detail"),
    ],
)
def test_a_bad_suppression_is_a_422_naming_the_field(
    client: ApiClient, body: dict[str, str], field: str
) -> None:
    response = client.post("/api/v1/suppressions", json=body)

    assert response.status_code == 422
    assert field in {e["field"] for e in response.json()["errors"]}
    assert not Suppression.objects.exists()


def test_a_bad_suppression_cursor_is_a_422_naming_cursor(client: ApiClient) -> None:
    response = client.get("/api/v1/suppressions", params={"cursor": "nope"})

    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["cursor"]


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


def test_the_template_list_names_the_sendable_templates(client: ApiClient) -> None:
    templates = client.get("/api/v1/templates").json()["templates"]

    assert {"welcome", "newsletter"} <= set(templates)
    assert "base" not in templates


def test_a_preview_renders_subject_html_and_text_and_sends_nothing(client: ApiClient) -> None:
    response = client.post(
        "/api/v1/templates/welcome/preview",
        json={"subject": "Welcome, {{ name }}", "context": {"name": "Ann <b>"}},
    )

    assert response.status_code == 200
    preview = response.json()
    assert preview["subject"] == "Welcome, Ann <b>"
    assert "Welcome, Ann &lt;b&gt;!" in preview["html"]
    assert "Welcome, Ann <b>!" in preview["text"]
    assert "<p>" not in preview["text"]
    assert not Message.objects.exists()


def test_a_preview_of_an_unknown_template_is_a_404(client: ApiClient) -> None:
    for name in ("nope", "base", "..%2Fsettings"):
        response = client.post(f"/api/v1/templates/{name}/preview", json={"subject": "Hi"})
        assert response.status_code == 404, name
        assert response.json()["error"] == "not_found"


def test_a_preview_that_cannot_render_is_a_422(client: ApiClient) -> None:
    broken_subject = client.post(
        "/api/v1/templates/welcome/preview", json={"subject": "Hi {% if %}"}
    )
    # The newsletter loops over ``items``: a number cannot be looped over.
    broken_context = client.post(
        "/api/v1/templates/newsletter/preview", json={"subject": "Hi", "context": {"items": 5}}
    )

    assert broken_subject.status_code == 422
    assert [e["field"] for e in broken_subject.json()["errors"]] == ["subject"]
    assert broken_context.status_code == 422
    assert [e["field"] for e in broken_context.json()["errors"]] == ["template"]


def test_templates_need_only_the_send_scope(
    client: ApiClient, make_key: Callable[..., str]
) -> None:
    send = make_key("send")
    campaigns_only = make_key("campaigns")

    assert client.get("/api/v1/templates", key=send).status_code == 200
    assert client.get("/api/v1/stats", key=send).status_code == 200
    assert client.get("/api/v1/templates", key=campaigns_only).status_code == 403


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def test_stats_show_the_counters_queues_pause_and_workers(
    client: ApiClient, redis_server: redis.Redis
) -> None:
    redis_server.set("mailroom:sent_total:high_priority", 5)
    redis_server.set("mailroom:sent_total:bulk", 10)
    redis_server.set("mailroom:failed_total:bulk", 5)
    redis_server.rpush("bulk", "task-1", "task-2")
    redis_server.set("mailroom:worker:bulk:w1@host", "1", ex=30)
    redis_server.set("mailroom:worker:bulk:w2@host", "1", ex=30)
    services.pause_bulk()

    figures = client.get("/api/v1/stats").json()

    assert figures["sent"] == 15
    assert figures["failed"] == 5
    assert figures["success_rate"] == 0.75
    assert figures["queues"]["bulk"] == {"sent": 10, "failed": 5, "suppressed": 0, "depth": 2}
    assert figures["queues"]["high_priority"]["depth"] == 0
    assert figures["bulk_paused"] is True
    assert figures["workers"]["bulk"] == 2
    assert figures["workers"]["high_priority"] == 0


def test_stats_before_any_delivery_have_no_success_rate(client: ApiClient) -> None:
    figures = client.get("/api/v1/stats").json()

    assert figures["sent"] == figures["failed"] == 0
    assert figures["success_rate"] is None
    assert figures["bulk_paused"] is False


def test_stats_without_redis_are_a_503_and_mail_is_still_accepted(
    client: ApiClient, redis_process: RedisServer
) -> None:
    redis_process.stop()

    figures = client.get("/api/v1/stats")
    accepted = client.post(
        "/api/v1/messages", json={"to": "ann@example.com", "subject": "Hi", "template": "welcome"}
    )

    assert figures.status_code == 503
    assert figures.json()["error"] == "unavailable"
    # The row is the truth; the sweeper enqueues it once Redis is back.
    assert accepted.status_code == 202
    assert Message.objects.get().status == "queued"
