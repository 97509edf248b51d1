"""``/api/v1/messages`` through gunicorn: sending, idempotency, reading, listing, errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from email_service import services
from email_service.models import Message
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.api.conftest import ApiClient, serve_api
from tests.conftest import settle, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

WELCOME = {
    "to": "ann@example.com",
    "subject": "Welcome aboard",
    "template": "welcome",
    "context": {"name": "Ann"},
}


def _field_errors(response: requests.Response) -> dict[str, str]:
    body = response.json()
    return {e["field"]: e["message"] for e in body["errors"]}


# --------------------------------------------------------------------------------------
# Sending and reading back
# --------------------------------------------------------------------------------------


def test_a_posted_message_is_delivered_and_shows_sent_with_its_attempt(
    client: ApiClient, running_worker: Role, smtp_sink: SMTPSink
) -> None:
    response = client.post("/api/v1/messages", json=WELCOME)

    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert accepted["queue"] == "high_priority"
    assert accepted["to"] == "ann@example.com"
    wait_for(lambda: smtp_sink.count() == 1, 30, "the email to arrive")
    [received] = smtp_sink.received
    assert received.rcpt_to == "ann@example.com"
    assert received.parsed()["Subject"] == "Welcome aboard"

    def shown() -> dict[str, Any]:
        return dict(client.get(f"/api/v1/messages/{accepted['id']}").json())

    wait_for(lambda: shown()["status"] == "sent", 10, "the API to show it sent")
    message = shown()
    assert message["id"] == accepted["id"]
    assert message["to"] == "ann@example.com"
    assert message["subject"] == "Welcome aboard"
    assert message["template"] == "welcome"
    assert message["campaign_id"] is None
    assert message["sent_at"] is not None
    assert message["last_smtp_code"] == 250
    [attempt] = message["attempts"]
    assert attempt["attempt"] == 1
    assert attempt["outcome"] == "sent"
    assert attempt["smtp_code"] == 250
    assert "OK" in attempt["smtp_reply"]
    assert attempt["at"]


def test_a_failed_attempt_shows_its_smtp_code_and_reply(
    client: ApiClient, running_worker: Role, smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_address("gone@example.com", "550 5.1.1 no such user")

    message_id = client.post("/api/v1/messages", json={**WELCOME, "to": "gone@example.com"}).json()[
        "id"
    ]

    def shown() -> dict[str, Any]:
        return dict(client.get(f"/api/v1/messages/{message_id}").json())

    wait_for(lambda: shown()["status"] == "failed", 30, "the message to fail")
    message = shown()
    assert message["last_smtp_code"] == 550
    assert "no such user" in message["last_smtp_reply"]
    assert [(a["outcome"], a["smtp_code"]) for a in message["attempts"]] == [("failed", 550)]


def test_bulk_queue_and_sender_are_taken_from_the_body(client: ApiClient) -> None:
    body = {**WELCOME, "queue": "bulk", "from_email": "News <news@example.com>"}

    response = client.post("/api/v1/messages", json=body)

    assert response.status_code == 202
    message = client.get(f"/api/v1/messages/{response.json()['id']}").json()
    assert message["queue"] == "bulk"
    assert message["from_email"] == "News <news@example.com>"


# --------------------------------------------------------------------------------------
# Idempotency
# --------------------------------------------------------------------------------------


def test_the_same_key_and_body_return_the_original_message(client: ApiClient) -> None:
    headers = {"Idempotency-Key": "order-42-receipt"}

    first = client.post("/api/v1/messages", json=WELCOME, headers=headers)
    again = client.post("/api/v1/messages", json=WELCOME, headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert Message.objects.count() == 1


def test_the_same_key_with_another_body_is_a_409(client: ApiClient) -> None:
    headers = {"Idempotency-Key": "order-43-receipt"}
    client.post("/api/v1/messages", json=WELCOME, headers=headers)

    response = client.post(
        "/api/v1/messages", json={**WELCOME, "subject": "Another subject"}, headers=headers
    )

    assert response.status_code == 409
    assert response.json()["error"] == "idempotency_conflict"
    assert "order-43-receipt" in response.json()["detail"]
    assert Message.objects.count() == 1


def _race(client: ApiClient, body: dict[str, Any], key: str) -> list[requests.Response]:
    """Two identical requests released together by a barrier."""
    barrier = threading.Barrier(2)
    results: list[requests.Response] = []

    def post() -> None:
        barrier.wait()
        results.append(client.post("/api/v1/messages", json=body, headers={"Idempotency-Key": key}))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_identical_requests_with_one_key_create_and_send_one_message(
    client: ApiClient, running_worker: Role, smtp_sink: SMTPSink
) -> None:
    rounds = 5
    for n in range(rounds):
        results = _race(client, {**WELCOME, "to": f"race{n}@example.com"}, f"race-{n}")

        assert [r.status_code for r in results] == [202, 202], [r.text for r in results]
        assert results[0].json()["id"] == results[1].json()["id"]

    assert Message.objects.count() == rounds
    wait_for(lambda: smtp_sink.count() == rounds, 30, "every email to arrive")
    settle(1)
    assert smtp_sink.count() == rounds
    assert set(smtp_sink.copies().values()) == {1}


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------


def _send(to: str, **kwargs: Any) -> Message:
    return services.send_email(to=to, subject="Hi", template="welcome", **kwargs)


def test_the_list_is_newest_first_and_cursor_paginated_to_the_end(client: ApiClient) -> None:
    sent = [_send(f"user{i}@example.com").id for i in range(5)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/messages", params=params).json()
        pages += 1
        seen.extend(m["id"] for m in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == [str(i) for i in reversed(sent)]


def test_rows_accepted_in_one_batch_are_paginated_without_gaps(client: ApiClient) -> None:
    # One bulk batch shares one created_at: the id breaks the tie.
    services.send_bulk_batch([f"b{i}@example.com" for i in range(7)], "Hi", {}, "welcome")

    first = client.get("/api/v1/messages", params={"limit": 4}).json()
    second = client.get(
        "/api/v1/messages", params={"limit": 4, "cursor": first["next_cursor"]}
    ).json()

    ids = [m["id"] for m in first["items"] + second["items"]]
    assert len(ids) == len(set(ids)) == 7
    assert second["next_cursor"] is None


def test_the_list_filters_by_status_recipient_and_campaign(client: ApiClient) -> None:
    _send("ann@example.com")
    services.suppress("bob@example.com", "manual")
    suppressed = _send("bob@example.com")
    campaign = services.create_campaign(name="Spring", subject="Hi", template="newsletter")
    services.add_recipients(campaign, [{"email": "cy@example.com"}])

    def ids(**params: str) -> list[str]:
        return [m["id"] for m in client.get("/api/v1/messages", params=params).json()["items"]]

    assert ids(status="suppressed") == [str(suppressed.id)]
    assert ids(to="BOB@Example.com") == [str(suppressed.id)]
    [in_campaign] = client.get("/api/v1/messages", params={"campaign": str(campaign.id)}).json()[
        "items"
    ]
    assert in_campaign["to"] == "cy@example.com"
    assert in_campaign["campaign_id"] == str(campaign.id)
    assert ids(status="sent") == []


def test_a_bad_cursor_is_a_422_naming_cursor(client: ApiClient) -> None:
    for cursor in ("not-a-cursor", "eyJhIjoxfQ", "WyJ4IiwieSJd", "%00"):
        response = client.get("/api/v1/messages", params={"cursor": cursor})
        assert response.status_code == 422, (cursor, response.text)
        assert "cursor" in _field_errors(response)


def test_bad_filters_are_422s_naming_each(client: ApiClient) -> None:
    response = client.get(
        "/api/v1/messages", params={"status": "lost", "limit": 0, "campaign": "x"}
    )

    assert response.status_code == 422
    assert set(_field_errors(response)) == {"status", "limit", "campaign"}


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_an_unknown_message_is_a_404_and_a_malformed_id_a_422(client: ApiClient) -> None:
    missing = client.get("/api/v1/messages/00000000-0000-4000-8000-000000000000")
    malformed = client.get("/api/v1/messages/not-a-uuid")

    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    assert malformed.status_code == 422
    assert "message_id" in _field_errors(malformed)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"to": "not an address"}, "to"),
        ({"to": "ann@example.com\r\nBcc: eve@example.com"}, "to"),
        ({"subject": ""}, "subject"),
        ({"subject": "Hi\nBcc: eve@example.com"}, "subject"),
        ({"subject": "Hi\x00"}, "subject"),
        ({"template": "no-such-template"}, "template"),
        ({"template": "../settings"}, "template"),
        ({"context": ["not", "an", "object"]}, "context"),
        ({"context": {"name": "\x00"}}, "context"),
        ({"context": {"deep": json.loads("[" * 100 + "]" * 100)}}, "context"),
        ({"context": {"items": 5}, "template": "newsletter"}, "template"),
        ({"from_email": "nobody"}, "from_email"),
        ({"queue": "urgent"}, "queue"),
        ({"to": 42}, "to"),
    ],
)
def test_a_bad_field_is_a_422_naming_it(
    client: ApiClient, change: dict[str, Any], field: str
) -> None:
    response = client.post("/api/v1/messages", json={**WELCOME, **change})

    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"
    assert field in _field_errors(response), response.text
    assert Message.objects.count() == 0


def test_every_missing_field_is_named(client: ApiClient) -> None:
    response = client.post("/api/v1/messages", json={})

    assert response.status_code == 422
    assert {"to", "subject", "template"} <= set(_field_errors(response))


def test_a_lone_surrogate_is_a_422_not_a_500(client: ApiClient) -> None:
    body = '{"to": "ann@example.com", "subject": "\\ud800", "template": "welcome"}'

    response = client.post(
        "/api/v1/messages", data=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert "subject" in _field_errors(response)


@pytest.mark.parametrize("key", ["k" * 201, ""])
def test_a_bad_idempotency_key_is_a_422_naming_it(client: ApiClient, key: str) -> None:
    response = client.post("/api/v1/messages", json=WELCOME, headers={"Idempotency-Key": key})

    assert response.status_code == 422
    assert "Idempotency-Key" in _field_errors(response)
    assert Message.objects.count() == 0


def test_malformed_json_is_a_400_that_says_so(client: ApiClient) -> None:
    response = client.post(
        "/api/v1/messages", data=b'{"to": "ann@', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert "parse" in response.json()["detail"]


def test_no_key_a_bad_key_and_a_revoked_key_are_401s(
    client: ApiClient, make_key: Callable[..., str]
) -> None:
    revoked = make_key("send", name="old")
    services.revoke_api_key("old")

    for key in ("", "mr_nope", "mr_abcdefgh_" + "x" * 32, revoked):
        response = client.get("/api/v1/messages", key=key)
        assert response.status_code == 401, key
        assert response.json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_key_without_the_send_scope_is_a_403(
    client: ApiClient, make_key: Callable[..., str]
) -> None:
    key = make_key("campaigns")

    response = client.post("/api/v1/messages", json=WELCOME, key=key)

    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert "send" in response.json()["detail"]
    assert Message.objects.count() == 0


def test_a_key_over_its_rate_gets_429_with_retry_after(
    client: ApiClient, make_key: Callable[..., str]
) -> None:
    key = make_key("send", rate=2)

    statuses = [client.get("/api/v1/messages", key=key).status_code for _ in range(3)]
    response = client.get("/api/v1/messages", key=key)

    assert statuses == [200, 200, 429]
    assert response.status_code == 429
    assert response.json()["error"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60


@pytest.fixture
def small_body_server(role_env: dict[str, str], redis_server: object) -> Iterator[str]:
    """A server whose body limit is 1 KiB (the smallest the setting allows)."""
    with serve_api(role_env, MAILROOM_API_MAX_BODY_BYTES="1024") as url:
        yield url


def test_a_body_over_the_limit_is_a_413(
    small_body_server: str, make_key: Callable[..., str]
) -> None:
    client = ApiClient(small_body_server, make_key("send"))
    small = client.post("/api/v1/messages", json=WELCOME)

    response = client.post("/api/v1/messages", json={**WELCOME, "context": {"name": "A" * 2000}})

    assert small.status_code == 202
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert "1024" in response.json()["detail"]
    assert Message.objects.count() == 1
