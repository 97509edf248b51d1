"""What a send key, a sloppy client or a hostile input could do, refused.

In-process (Django's test client: the same URLconf, middleware and API) for the
refusals; through a worker into the SMTP sink for the bytes on the wire; through
gunicorn where only the real server shows it (chunked bodies, log lines).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.core import mail
from django.test import Client, override_settings

from email_service import services
from email_service.exceptions import InvalidEmailRequest, SenderNotAllowed
from email_service.models import Campaign, Message
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.api.conftest import serve_api
from tests.conftest import wait_for

QUEUED = "email_service.backends.QueuedEmailBackend"
WELCOME: dict[str, Any] = {
    "to": "ann@example.com",
    "subject": "Welcome aboard",
    "template": "welcome",
    "context": {"name": "Ann"},
}

# Every character that Python's email package folds into a line break, or that ends a
# line elsewhere: each used to be accepted with 202.
LINE_BREAKERS = {
    "VT": "\x0b",
    "FF": "\x0c",
    "FS": "\x1c",
    "GS": "\x1d",
    "RS": "\x1e",
    "NEL": "\x85",
    "LINE SEPARATOR": "\u2028",
    "PARAGRAPH SEPARATOR": "\u2029",
    "BEL": "\x07",
    "DEL": "\x7f",
    "ESC": "\x1b",
}


def _key(*scopes: str, senders: list[str] | None = None, name: str = "test") -> str:
    return services.create_api_key(name, list(scopes) or ["admin"], None, senders or [])[1]


def _post(client: Client, key: str, path: str, body: object, **headers: str) -> Any:
    return client.post(
        path,
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def _errors(response: Any) -> dict[str, str]:
    return {e["field"]: e["message"] for e in response.json()["errors"]}


# --------------------------------------------------------------------------------------
# 1. One header rule: control characters and line separators
# --------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", sorted(LINE_BREAKERS))
def test_a_subject_with_any_line_breaking_character_is_a_422_naming_subject(name: str) -> None:
    key = _key("send")
    subject = f"Hi{LINE_BREAKERS[name]}Bcc : injected@example.net"

    response = _post(Client(), key, "/api/v1/messages", {**WELCOME, "subject": subject})

    assert response.status_code == 422, response.content
    assert "control characters or line separators" in _errors(response)["subject"]
    assert Message.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["VT", "FS", "LINE SEPARATOR", "NEL"])
def test_a_sender_display_name_with_a_line_breaker_is_a_422_naming_from_email(name: str) -> None:
    sender = f"Evil{LINE_BREAKERS[name]}Bcc: evil@example.net <news@example.com>"

    response = _post(Client(), _key("send"), "/api/v1/messages", {**WELCOME, "from_email": sender})

    assert response.status_code == 422, response.content
    assert "from_email" in _errors(response)
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_an_encoded_word_that_decodes_to_a_control_character_is_refused() -> None:
    sender = "=?utf-8?q?Evil=0BBcc=3A_x=40example.net?= <news@example.com>"

    response = _post(Client(), _key("send"), "/api/v1/messages", {**WELCOME, "from_email": sender})

    assert response.status_code == 422
    assert "from_email" in _errors(response)


@pytest.mark.django_db
def test_a_campaign_subject_with_a_line_breaker_is_a_422_and_no_campaign_exists() -> None:
    body = {"name": "Spring", "subject": "News\x0cBcc: x@example.net", "template": "newsletter"}

    response = _post(Client(), _key("campaigns"), "/api/v1/campaigns", body)

    assert response.status_code == 422, response.content
    assert "subject" in _errors(response)
    assert Campaign.objects.count() == 0


@pytest.mark.django_db
@override_settings(EMAIL_BACKEND=QUEUED)
def test_the_email_backend_refuses_a_line_breaker_in_the_subject_and_stores_nothing() -> None:
    with pytest.raises(InvalidEmailRequest, match=r"^subject: must not contain control"):
        mail.send_mail("Hi\u2028Bcc: x@example.net", "Body", None, ["ann@example.com"])
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_a_tab_in_a_subject_is_ordinary_whitespace_and_accepted() -> None:
    response = _post(Client(), _key("send"), "/api/v1/messages", {**WELCOME, "subject": "A\tB"})

    assert response.status_code == 202, response.content


@pytest.mark.django_db(transaction=True)
def test_a_rendered_campaign_subject_with_a_control_character_fails_that_message_only(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    campaign = services.create_campaign(
        name="Spring", subject="Hello {{ name }}", template="newsletter"
    )
    services.add_recipients(
        campaign,
        [
            {"email": "bad@example.com", "context": {"name": "Eve\x07Bcc: x@example.net"}},
            {"email": "good@example.com", "context": {"name": "Ann"}},
        ],
    )
    services.start_campaign(campaign)

    def ended() -> bool:
        return not Message.objects.filter(status__in=["queued", "sending", "deferred"]).exists()

    wait_for(ended, 30, "the campaign to end")
    bad = Message.objects.get(to_email="bad@example.com")
    assert bad.status == Message.Status.FAILED
    assert "subject: must not contain control characters" in bad.last_smtp_reply
    assert [r.rcpt_to for r in smtp_sink.received] == ["good@example.com"]
    assert smtp_sink.received[0].parsed()["Subject"] == "Hello Ann"


# --------------------------------------------------------------------------------------
# 2. The sender: one mailbox, the name quoted, the envelope the validated address
# --------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("sender", "name"),
    [
        ('"x@evil.com" <news@example.com>', "x@evil.com"),
        ('"@" <news@example.com>', "@"),
        ('"Bank, Inc" <news@example.com>', "Bank, Inc"),
        ('"A <b@evil.com>" <news@example.com>', "A <b@evil.com>"),
        ("Zoë <news@example.com>", "Zoë"),
    ],
)
def test_the_envelope_is_the_validated_address_and_from_is_one_quoted_mailbox(
    sender: str, name: str, running_worker: Role, smtp_sink: SMTPSink
) -> None:
    response = _post(Client(), _key("send"), "/api/v1/messages", {**WELCOME, "from_email": sender})
    assert response.status_code == 202, response.content

    wait_for(lambda: smtp_sink.count() == 1, 30, "the email to arrive")
    [received] = smtp_sink.received
    assert received.mail_from == "news@example.com"
    header = received.parsed()["From"]
    assert len(header.addresses) == 1
    assert header.addresses[0].addr_spec == "news@example.com"
    assert header.addresses[0].display_name == name
    assert not header.defects


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("sender", "words"),
    [
        ("news@example.com, boss@example.net", "exactly one mailbox"),
        ("Bank, Inc <news@example.com>", "exactly one mailbox"),
        ("Team: news@example.com;", "exactly one mailbox"),
        ('"unterminated <news@example.com>', "not a valid email address"),
        ('"', "not a valid email address"),
    ],
)
def test_a_sender_that_is_not_exactly_one_mailbox_is_a_422(sender: str, words: str) -> None:
    response = _post(Client(), _key("send"), "/api/v1/messages", {**WELCOME, "from_email": sender})

    assert response.status_code == 422, response.content
    assert words in _errors(response)["from_email"]
    assert Message.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "user%evil.net@example.com"),
        ("to", "evil.net!user@example.com"),
        ("from_email", "News <news%evil.net@example.com>"),
    ],
)
def test_routing_style_local_parts_are_refused(field: str, value: str) -> None:
    response = _post(Client(), _key("send"), "/api/v1/messages", {**WELCOME, field: value})

    assert response.status_code == 422, response.content
    assert "source routing" in _errors(response)[field]


# --------------------------------------------------------------------------------------
# 6. Allowed senders, per key, on every path
# --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_may_send_only_from_its_allowed_senders() -> None:
    key = _key("send", "campaigns", senders=["shop.example.com", "ceo@example.org"])
    client = Client()

    def send(sender: str) -> Any:
        return _post(client, key, "/api/v1/messages", {**WELCOME, "from_email": sender})

    assert send("Shop <orders@shop.example.com>").status_code == 202
    assert send("ceo@example.org").status_code == 202
    assert send("noreply@mailroom.example.com").status_code == 202  # the default sender
    refused = send("CEO <ceo@bank.example>")
    assert refused.status_code == 403, refused.content
    assert refused.json()["error"] == "sender_not_allowed"
    assert "ceo@bank.example" in _errors(refused)["from_email"]
    assert send("cfo@example.org").status_code == 403
    campaign = {
        "name": "x",
        "subject": "x",
        "template": "newsletter",
        "from_email": "a@bank.example",
    }
    assert _post(client, key, "/api/v1/campaigns", campaign).status_code == 403
    assert Message.objects.count() == 3
    assert Campaign.objects.count() == 0


@pytest.mark.django_db
@override_settings(MAILROOM_ALLOWED_SENDERS=[], EMAIL_BACKEND=QUEUED)
def test_without_a_list_only_the_default_senders_domain_is_allowed_on_every_path() -> None:
    key = _key("send")
    response = _post(
        Client(), key, "/api/v1/messages", {**WELCOME, "from_email": "ceo@bank.example"}
    )
    assert response.status_code == 403
    ok = _post(
        Client(), key, "/api/v1/messages", {**WELCOME, "from_email": "x@mailroom.example.com"}
    )
    assert ok.status_code == 202

    with pytest.raises(SenderNotAllowed, match="from_email"):
        services.send_email(**WELCOME, from_email="ceo@bank.example")
    with pytest.raises(SenderNotAllowed):
        services.send_bulk_batch(["a@example.com"], "Hi", {}, "newsletter", from_email="a@evil.io")
    with pytest.raises(SenderNotAllowed):
        services.create_campaign(
            name="x", subject="x", template="newsletter", from_email="a@bank.example"
        )
    with pytest.raises(SenderNotAllowed):
        mail.send_mail("Hi", "Body", "ceo@bank.example", ["ann@example.com"])
    assert Message.objects.count() == 1


@pytest.mark.django_db
def test_allowed_senders_are_validated_when_the_key_is_made() -> None:
    with pytest.raises(InvalidEmailRequest, match="allowed_senders"):
        services.create_api_key("x", ["send"], None, ["not a domain"])
    api_key, _ = services.create_api_key("x", ["send"], None, ["Example.COM", "A@Example.com"])
    assert api_key.allowed_senders == ["a@example.com", "example.com"]


# --------------------------------------------------------------------------------------
# 4. Idempotency keys are scoped per API key
# --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_two_api_keys_may_use_the_same_idempotency_key() -> None:
    client = Client()
    first, second = _key("send", name="billing"), _key("send", name="shop")
    other_body = {**WELCOME, "to": "bob@example.com"}

    a = _post(client, first, "/api/v1/messages", WELCOME, **{"Idempotency-Key": "order-1042"})
    b = _post(client, second, "/api/v1/messages", other_body, **{"Idempotency-Key": "order-1042"})
    again = _post(client, first, "/api/v1/messages", WELCOME, **{"Idempotency-Key": "order-1042"})
    clash = _post(
        client, first, "/api/v1/messages", other_body, **{"Idempotency-Key": "order-1042"}
    )

    assert (a.status_code, b.status_code, again.status_code) == (202, 202, 202)
    assert a.json()["id"] != b.json()["id"]
    assert again.json()["id"] == a.json()["id"]
    assert clash.status_code == 409
    assert sorted(Message.objects.values_list("to_email", flat=True)) == [
        "ann@example.com",
        "bob@example.com",
    ]


# --------------------------------------------------------------------------------------
# 5 and 8. Authentication failures: throttled, and never logged
# --------------------------------------------------------------------------------------


@pytest.mark.django_db
@override_settings(MAILROOM_API_AUTH_FAILURES_PER_MINUTE=5)
def test_bad_keys_from_one_address_are_throttled_with_retry_after() -> None:
    client = Client()
    good = _key("send")
    bad = f"{good[:-4]}XXXX"
    answers = [_post(client, bad, "/api/v1/messages", WELCOME).status_code for _ in range(5)]

    throttled = _post(client, bad, "/api/v1/messages", WELCOME)
    wrong_scheme = client.get("/api/v1/messages", HTTP_AUTHORIZATION=f"Token {good}")

    assert answers == [401] * 5
    assert throttled.status_code == 429
    assert 1 <= int(throttled["Retry-After"]) <= 60
    assert wrong_scheme.status_code == 429
    # A real key still works from there: clients behind one proxy share its address.
    assert _post(client, good, "/api/v1/messages", WELCOME).status_code == 202


def _auth_failures(base_url: str, secrets: dict[str, str]) -> None:
    """Every way to fail authentication, each carrying a secret."""
    parts = urlsplit(base_url)

    def call(method: str, path: str, headers: dict[str, str], body: str | None = None) -> int:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status

    live, revoked = secrets["live"], secrets["revoked"]
    basic = base64.b64encode(f"operator:{secrets['password']}".encode()).decode()
    statuses = [
        call("GET", "/api/v1/messages", {"Authorization": f"Token {live}"}),
        call("GET", "/api/v1/messages", {"Authorization": live}),
        call("GET", "/api/v1/messages", {"Authorization": f"Bearer {live[:-3]}abc"}),
        call("GET", "/api/v1/messages", {"Authorization": f"Bearer {revoked}"}),
        call("GET", "/api/v1/messages", {"Authorization": f"Basic {basic}"}),
        call("GET", "/api/v1/messages", {"Authorization": f"Bearer {live}\x01"}),
        call("GET", "/metrics", {"Authorization": f"Bearer {secrets['metrics'][:-1]}x"}),
        call("GET", "/metrics", {"Authorization": f"Token {secrets['metrics']}"}),
    ]
    assert all(status in (401, 403, 400) for status in statuses), statuses


@pytest.mark.django_db(transaction=True)
def test_no_key_or_password_appears_in_any_log_line_on_any_auth_failure(
    role_env: dict[str, str], redis_server: object
) -> None:
    live = _key("send", name="live")
    revoked = _key("send", name="old")
    services.revoke_api_key("old")
    secrets = {
        "live": live,
        "revoked": revoked,
        "password": "hunter2-correct-horse",
        "metrics": "metrics-token-0123456789",
    }
    # DEBUG on and every logger at DEBUG: where django-ninja logged the whole header.
    env = {"DEBUG": "true", "LOG_LEVEL": "DEBUG", "MAILROOM_METRICS_TOKEN": secrets["metrics"]}
    with serve_api(role_env, **env) as url:
        _auth_failures(url, secrets)
        log = _role_log()
    assert "/api/v1/messages" in log  # the access log is there: the log was read
    for name, secret in secrets.items():
        for piece in {secret, secret[-16:], base64.b64encode(secret.encode()).decode()}:
            assert piece not in log, f"the {name} secret appears in the web role's log"
    assert not re.search(r"mr_[A-Za-z0-9]{8}_[A-Za-z0-9]{8,}", log)


def _role_log() -> str:
    from mailroom_testkit.processes import OUTPUT_DIR

    return "\n".join(p.read_text(errors="replace") for p in OUTPUT_DIR.glob("web-*.log"))


# --------------------------------------------------------------------------------------
# 9. A JSON body sent with Transfer-Encoding: chunked
# --------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_chunked_json_body_is_read_whole(role_env: dict[str, str], redis_server: object) -> None:
    key = _key("send")
    body = json.dumps({**WELCOME, "subject": "Sent in chunks"}).encode()
    limits = {"MAILROOM_API_MAX_UPLOAD_BYTES": "2048", "MAILROOM_API_MAX_BODY_BYTES": "2048"}
    with serve_api(role_env, **limits) as url:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        pieces = (body[i : i + 7] for i in range(0, len(body), 7))
        conn.request("POST", "/api/v1/messages", body=pieces, headers=headers, encode_chunked=True)
        accepted = conn.getresponse()
        accepted_body = json.loads(accepted.read())
        conn.close()

        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        big = (b"x" * 1024 for _ in range(4))
        conn.request("POST", "/api/v1/messages", body=big, headers=headers, encode_chunked=True)
        too_large = conn.getresponse()
        too_large_body = json.loads(too_large.read())
        conn.close()

    assert accepted.status == 202, accepted_body
    assert Message.objects.get(pk=accepted_body["id"]).subject == "Sent in chunks"
    assert too_large.status == 413
    assert too_large_body["error"] == "too_large"
    assert Message.objects.count() == 1
