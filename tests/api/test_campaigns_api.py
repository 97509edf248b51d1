"""The campaign endpoints through the real HTTP stack: gunicorn on a socket, the test
database, Redis, and — for delivery — real Celery workers, beat and an SMTP sink."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.utils import timezone

from email_service.models import Campaign, Message
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.api.conftest import ApiClient, serve_api
from tests.conftest import wait_for

URL = "/api/v1/campaigns"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def bulk_pool(start_role: Callable[..., Role]) -> list[Role]:
    """The smallest real deployment for campaigns: one worker on both queues, and beat
    (its dispatcher feeds campaigns to the bulk queue)."""
    return [
        start_role("worker", queues="high_priority,bulk", concurrency=2),
        start_role("beat"),
    ]


def _rows(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {"email": f"{prefix}{i}@example.com", "context": {"name": f"N{i}", "code": f"K{i}Q"}}
        for i in range(count)
    ]


def _body(name: str = "Spring", **fields: Any) -> dict[str, Any]:
    return {"name": name, "subject": "Hello {{ name }} ({{ code }})", "template": "newsletter"} | (
        fields
    )


def _csv(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _upload(
    client: ApiClient, content: bytes, path: str = URL, key: str | None = None, **form: str
) -> requests.Response:
    campaign = {"name": "Upload", "subject": "Hi {{ name }}", "template": "newsletter"}
    fields = (campaign if path == URL else {}) | form
    return client.post(
        path, key=key, data=fields, files={"file": ("list.csv", content, "text/csv")}
    )


def _created(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return dict(response.json())


def _completed(client: ApiClient, campaign_id: str, timeout: float = 90) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def check() -> bool:
        seen.update(client.get(f"{URL}/{campaign_id}").json())
        return bool(seen["status"] == "completed")

    wait_for(check, timeout, f"campaign {campaign_id} to complete")
    return seen


def _field_errors(response: requests.Response) -> dict[str, str]:
    return {e["field"]: e["message"] for e in response.json()["errors"]}


def _nothing_stored() -> None:
    assert Campaign.objects.count() == 0
    assert Message.objects.count() == 0


# --------------------------------------------------------------------------------------
# Delivery
# --------------------------------------------------------------------------------------


def test_a_json_campaign_reaches_every_recipient_once_with_their_own_data(
    client: ApiClient, bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    response = client.post(URL, json=_body(recipients=_rows("json", 30), start=True))

    created = _created(response)
    assert created["status"] in ("sending", "completed")
    assert created["progress"]["total"] == 30
    assert created["report"] == {
        "accepted": 30,
        "duplicates": 0,
        "suppressed": 0,
        "invalid": 0,
        "stored": True,
        "errors": [],
        "errors_truncated": False,
    }

    done = _completed(client, created["id"])
    progress = done["progress"]
    assert (progress["total"], progress["sent"], progress["remaining"]) == (30, 30, 0)
    assert (progress["failed"], progress["queued"], progress["cancelled"]) == (0, 0, 0)
    assert done["finished_at"] is not None
    copies = smtp_sink.copies()
    assert copies == {f"json{i}@example.com": 1 for i in range(30)}
    by_address = {m.rcpt_to: m.data for m in smtp_sink.received}
    for i in (0, 17, 29):
        data = by_address[f"json{i}@example.com"]
        assert f"Subject: Hello N{i} (K{i}Q)\r\n".encode() in data
        assert f"Hi N{i},".encode() in data

    # A completed campaign cannot move again: each attempt is a clear 409.
    for action, words in (
        ("resume", "a completed campaign cannot be resumed"),
        ("pause", "a completed campaign cannot be paused"),
        ("start", "only a draft can be started"),
        ("cancel", "already completed"),
    ):
        refused = client.post(f"{URL}/{created['id']}/{action}")
        assert refused.status_code == 409, (action, refused.text)
        assert refused.json()["error"] == "invalid_state"
        assert words in refused.json()["detail"]
        assert refused.json()["detail"].startswith(f"cannot {action} the campaign")
    assert client.get(f"{URL}/{created['id']}").json()["status"] == "completed"


def test_a_csv_upload_campaign_is_started_and_each_row_gets_its_own_email(
    client: ApiClient, bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    lines = ["email,name,intro"] + [f"row{i}@example.com,Name{i},Intro {i}" for i in range(25)]
    created = _created(_upload(client, _csv(*lines), name="CSV list"))
    assert created["status"] == "draft"
    assert created["report"]["accepted"] == 25
    assert created["progress"]["total"] == created["progress"]["queued"] == 25
    assert smtp_sink.count() == 0, "a draft sends nothing"

    started = client.post(f"{URL}/{created['id']}/start")
    assert started.status_code == 200, started.text
    assert started.json()["status"] in ("sending", "completed")
    assert started.json()["started_at"] is not None

    done = _completed(client, created["id"])
    assert (done["progress"]["sent"], done["progress"]["remaining"]) == (25, 0)
    assert smtp_sink.copies() == {f"row{i}@example.com": 1 for i in range(25)}
    by_address = {m.rcpt_to: m.parsed() for m in smtp_sink.received}
    for i in (0, 24):
        mail = by_address[f"row{i}@example.com"]
        assert mail["Subject"] == f"Hi Name{i}"
        html = mail.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
        assert f"Hi Name{i}," in html
        assert f"Intro {i}" in html

    listed = client.get(URL, params={"status": "completed"}).json()["items"]
    assert [c["id"] for c in listed] == [created["id"]]


def test_retry_failed_resends_only_the_failed_recipients(
    client: ApiClient, bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_address("retry3@example.com", "554 5.7.1 Rejected by policy")
    created = _created(client.post(URL, json=_body(recipients=_rows("retry", 6), start=True)))
    first = _completed(client, created["id"])
    assert (first["progress"]["sent"], first["progress"]["failed"]) == (5, 1)
    smtp_sink.reset()

    bad = client.post(f"{URL}/{created['id']}/retry-failed", json={"reply_class": "6xx"})
    assert bad.status_code == 422
    assert "reply_class" in _field_errors(bad)
    none = client.post(f"{URL}/{created['id']}/retry-failed", json={"smtp_code": 421})
    assert none.status_code == 200, none.text
    assert (none.json()["messages_requeued"], none.json()["status"]) == (0, "completed")

    retried = client.post(f"{URL}/{created['id']}/retry-failed", json={"smtp_code": 554})
    assert retried.status_code == 200, retried.text
    assert retried.json()["messages_requeued"] == 1
    assert retried.json()["status"] in ("sending", "completed")

    again = _completed(client, created["id"])
    assert (again["progress"]["sent"], again["progress"]["failed"]) == (6, 0)
    assert smtp_sink.copies() == {"retry3@example.com": 1}, "nobody else got a second copy"

    # Without a body: every failed recipient; here there are none left.
    empty = client.post(f"{URL}/{created['id']}/retry-failed")
    assert empty.status_code == 200, empty.text
    assert empty.json()["messages_requeued"] == 0


# --------------------------------------------------------------------------------------
# State changes
# --------------------------------------------------------------------------------------


def test_pause_resume_cancel_and_the_transitions_they_refuse(client: ApiClient) -> None:
    later = (timezone.now() + timedelta(days=1)).isoformat()
    created = _created(client.post(URL, json=_body(recipients=_rows("state", 5), send_at=later)))
    path = f"{URL}/{created['id']}"

    def post(action: str, expected: int, **kwargs: Any) -> dict[str, Any]:
        response = client.post(f"{path}/{action}", **kwargs)
        assert response.status_code == expected, (action, response.text)
        return dict(response.json())

    assert post("pause", 409)["error"] == "invalid_state"
    assert post("start", 200)["status"] == "scheduled", "send_at is tomorrow"
    refused = post("start", 409)
    assert refused["detail"] == (
        "cannot start the campaign: only a draft can be started, this one is scheduled"
    )
    assert refused["errors"] == [
        {"field": "status", "message": "only a draft can be started, this one is scheduled"}
    ]
    assert post("pause", 200)["status"] == "paused"
    assert (
        post("pause", 409)["detail"]
        == "cannot pause the campaign: a paused campaign cannot be paused"
    )
    resumed = post("resume", 200)
    assert resumed["status"] == "sending"
    assert post("resume", 409)["detail"].endswith("a sending campaign cannot be resumed")
    assert post("pause", 200)["status"] == "paused"

    cancelled = post("cancel", 200)
    assert cancelled["status"] == "cancelled"
    assert cancelled["messages_cancelled"] == 5
    assert cancelled["progress"]["cancelled"] == 5
    assert cancelled["progress"]["remaining"] == 0
    assert cancelled["finished_at"] is not None

    for action in ("start", "pause", "resume", "cancel", "retry-failed"):
        assert post(action, 409)["error"] == "invalid_state", action
    more = post("recipients", 409, json={"recipients": [{"email": "new@example.com"}]})
    assert more["detail"] == (
        "cannot add recipients to the campaign: the campaign is cancelled; "
        "recipients cannot be added"
    )
    assert Message.objects.filter(status="cancelled").count() == 5
    assert Message.objects.count() == 5


def test_a_campaign_without_recipients_cannot_be_started(client: ApiClient) -> None:
    refused = client.post(URL, json=_body(start=True))
    assert refused.status_code == 422, refused.text
    assert "start" in _field_errors(refused)
    _nothing_stored()

    draft = _created(client.post(URL, json=_body()))
    assert draft["report"] is None
    assert draft["progress"]["total"] == 0
    response = client.post(f"{URL}/{draft['id']}/start")
    assert response.status_code == 409
    assert (
        response.json()["detail"] == "cannot start the campaign: the campaign has no recipients yet"
    )
    assert Campaign.objects.get().status == "draft"


def test_recipients_can_be_added_to_a_draft_without_duplicates(client: ApiClient) -> None:
    draft = _created(client.post(URL, json=_body()))
    path = f"{URL}/{draft['id']}/recipients"

    first = client.post(path, json={"recipients": _rows("add", 3)})
    assert first.status_code == 200, first.text
    assert first.json()["report"]["accepted"] == 3
    assert first.json()["progress"]["total"] == 3

    csv_more = _upload(
        client, _csv("email,name", "ADD0@example.com,Again", "add9@example.com,X"), path=path
    )
    assert csv_more.status_code == 200, csv_more.text
    report = csv_more.json()["report"]
    assert (report["accepted"], report["duplicates"], report["invalid"]) == (1, 1, 0)

    strict = client.post(
        path,
        json={"strict": True, "recipients": [{"email": "fine@example.com"}, {"email": "nope"}]},
    )
    assert strict.status_code == 422
    assert list(_field_errors(strict)) == ["recipients[1].email"]
    assert Message.objects.count() == 4, "strict mode stored nothing"
    assert client.get(f"{URL}/{draft['id']}").json()["progress"]["total"] == 4


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------


def test_the_list_is_newest_first_cursor_paginated_and_filtered_by_status(
    client: ApiClient,
) -> None:
    ids = [_created(client.post(URL, json=_body(name=f"C{i}")))["id"] for i in range(5)]
    assert client.post(f"{URL}/{ids[1]}/cancel").status_code == 200

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get(URL, params=params)
        assert page.status_code == 200, page.text
        pages += 1
        seen += [c["name"] for c in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ["C4", "C3", "C2", "C1", "C0"]
    assert pages == 3

    cancelled = client.get(URL, params={"status": "cancelled"}).json()
    assert [c["id"] for c in cancelled["items"]] == [ids[1]]
    assert cancelled["next_cursor"] is None
    assert cancelled["items"][0]["progress"]["total"] == 0

    for params in ({"status": "done"}, {"cursor": "not-a-cursor"}, {"limit": 0}, {"limit": 101}):
        refused = client.get(URL, params=params)
        assert refused.status_code == 422, (params, refused.text)
        assert list(_field_errors(refused)) == list(params), params


# --------------------------------------------------------------------------------------
# Refusals: keys, ids, bad input, sizes
# --------------------------------------------------------------------------------------


def test_keys_are_required_and_need_the_campaigns_scope(
    client: ApiClient, make_key: Callable[..., str]
) -> None:
    for key in ("", "mr_not_a_real_key"):
        for response in (client.get(URL, key=key), client.post(URL, key=key, json=_body())):
            assert response.status_code == 401
            assert response.json()["error"] == "unauthorized"
    send_only = make_key("send", name="sender")
    for response in (
        client.get(URL, key=send_only),
        client.post(URL, key=send_only, json=_body()),
        _upload(client, _csv("email", "a@example.com"), key=send_only),
    ):
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden"
    _nothing_stored()
    assert client.get(URL, key=make_key("campaigns", name="marketing")).status_code == 200


def test_unknown_and_malformed_ids_are_404(client: ApiClient) -> None:
    for campaign_id in (str(uuid.uuid4()), "not-a-uuid", "1234", "%00"):
        response = client.get(f"{URL}/{campaign_id}")
        assert response.status_code == 404, (campaign_id, response.text)
        assert response.json()["error"] == "not_found"
        for action in ("start", "pause", "resume", "cancel", "retry-failed"):
            response = client.post(f"{URL}/{campaign_id}/{action}")
            assert response.status_code == 404, (campaign_id, action, response.text)
            assert response.json()["error"] == "not_found"
        response = client.post(f"{URL}/{campaign_id}/recipients", json={"recipients": []})
        assert response.status_code == 404


def test_bad_campaign_fields_are_422_naming_the_field_and_store_nothing(
    client: ApiClient,
) -> None:
    rows = _rows("fields", 3)
    cases: list[tuple[dict[str, Any], str]] = [
        (_body(template="no-such-template", recipients=rows), "template"),
        (_body(subject="", recipients=rows), "subject"),
        (_body(subject="Hi\r\nBcc: x@example.com", recipients=rows), "subject"),
        (_body(name=" ", recipients=rows), "name"),
        (_body(from_email="not an address", recipients=rows), "from_email"),
        (_body(send_at="2030-01-01T09:00:00", recipients=rows), "send_at"),
        (
            _body(
                send_at="2030-01-02T09:00:00Z", expires_at="2030-01-01T09:00:00Z", recipients=rows
            ),
            "expires_at",
        ),
        ({"subject": "Hi", "template": "newsletter"}, "name"),
        (_body(recipient=rows), "recipient"),
        (_body(recipients=[{"email": "a@example.com", "extra": 1}]), "recipients[0].extra"),
        (_body(recipients=[{"email": "a@example.com", "context": [1]}]), "recipients[0].context"),
        (_body(name="nul\x00name", recipients=rows), "name"),
        (_body(recipients=[]), "recipients"),
    ]
    for body, field in cases:
        response = client.post(URL, json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"] == "invalid"
        assert field in _field_errors(response), (field, response.json())
    bad_json = client.post(URL, data=b"{not json", headers={"Content-Type": "application/json"})
    assert (bad_json.status_code, bad_json.json()["error"]) == (400, "bad_request")
    not_object = client.post(URL, json=[1, 2])
    assert not_object.status_code == 422
    form_encoded = client.post(URL, data={"name": "x"})
    assert (form_encoded.status_code, form_encoded.json()["error"]) == (
        415,
        "unsupported_media_type",
    )
    no_file = client.post(
        URL, data=_body(), files={"other": ("x.csv", b"email\na@example.com\n", "text/csv")}
    )
    assert no_file.status_code == 422
    assert "file" in _field_errors(no_file)
    bad_form = _upload(client, _csv("email", "a@example.com"), template="nope")
    assert bad_form.status_code == 422
    assert "template" in _field_errors(bad_form)
    _nothing_stored()


def test_strict_mode_names_each_bad_row_and_stores_nothing(client: ApiClient) -> None:
    rows = _rows("strict", 8)
    rows[3]["email"] = "not-an-email"
    rows[6]["email"] = "someone@"
    response = client.post(URL, json=_body(recipients=rows, strict=True, start=True))

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid"
    assert body["detail"].startswith("2 recipient row(s) are invalid")
    assert [e["field"] for e in body["errors"]] == [
        "recipients[3].email",
        "recipients[6].email",
    ]
    assert "not a valid email address" in body["errors"][0]["message"]
    _nothing_stored()

    upload = _csv(
        "email,name",
        "a@example.com,A",
        "b@example.com,B",
        "c@example.com,C",
        "broken-address,D",
        "e@example.com,E",
    )
    response = _upload(client, upload, strict="true")
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["file:line 5"]
    _nothing_stored()


def test_without_strict_bad_rows_are_skipped_and_reported(client: ApiClient) -> None:
    rows = _rows("lenient", 10)
    rows[3]["email"] = "not-an-email"
    rows[6]["email"] = "x@"
    rows[8]["email"] = "LENIENT0@example.com"  # a duplicate of row 0
    created = _created(client.post(URL, json=_body(recipients=rows)))
    report = created["report"]
    assert (report["accepted"], report["duplicates"], report["invalid"]) == (7, 1, 2)
    assert report["stored"] is True
    assert report["errors_truncated"] is False
    assert [(e["line"], e["index"], e["field"], e["email"]) for e in report["errors"]] == [
        (4, 3, "recipients[3].email", "not-an-email"),
        (7, 6, "recipients[6].email", "x@"),
    ]
    assert all("not a valid email address" in e["reason"] for e in report["errors"])
    assert created["progress"]["total"] == 7
    assert Message.objects.count() == 7

    upload = (
        b"email,name\n"
        b"one@example.com,One\n"
        b'two@example.com,"Two\nlines"\n'
        b"bad address,Three\n"
        b"four@example.com\n"
        b"caf\xe9@example.com,Latin-1\n"
        b"six@example.com,Six\n"
    )
    created = _created(_upload(client, upload, name="Lenient CSV"))
    report = created["report"]
    assert (report["accepted"], report["invalid"]) == (3, 3)
    assert [(e["line"], e["index"], e["field"], e["email"]) for e in report["errors"]] == [
        (5, None, "file:line 5", "bad address"),
        (6, None, "file:line 6", "four@example.com"),
        (7, None, "file:line 7", "caf\ufffd@example.com"),
    ]
    reasons = [e["reason"] for e in report["errors"]]
    assert "not a valid email address" in reasons[0]
    assert reasons[1] == "expected 2 fields, got 1"
    assert "not valid UTF-8" in reasons[2]
    assert Message.objects.filter(campaign_id=created["id"]).count() == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"email,name\n", "no recipients"),
        (b"address,name\na@example.com,A\n", "no 'email' column in the header"),
        ("email,name\na@example.com,Ä\n".encode("utf-16"), "the file is UTF-16"),
        (b"email,n\xe4me\na@example.com,A\n", "is not valid UTF-8"),
    ],
    ids=["empty", "header-only", "no-email-column", "utf-16", "latin-1-header"],
)
def test_unusable_uploads_are_422_with_a_clear_reason(
    client: ApiClient, content: bytes, message: str
) -> None:
    response = _upload(client, content)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == ["file"]
    assert message in errors[0]["message"]
    _nothing_stored()


def test_a_header_of_1700_columns_is_422_naming_the_file_and_stores_nothing(
    client: ApiClient,
) -> None:
    # It was a 500 (psycopg TooManyColumns: the staging table has a column per CSV column).
    header = ",".join(["email", *(f"var{i}" for i in range(1_699))])
    content = _csv(header, "ann@example.com" + ",x" * 1_699, "bob@example.com" + ",y" * 1_699)
    response = _upload(client, content)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid"
    assert [e["field"] for e in body["errors"]] == ["file"]
    assert "the header has 1,700 columns: at most 200 besides 'email'" in body["detail"]
    _nothing_stored()

    draft = _created(client.post(URL, json=_body()))
    added = _upload(client, content, path=f"{URL}/{draft['id']}/recipients")
    assert added.status_code == 422, added.text
    assert [e["field"] for e in added.json()["errors"]] == ["file"]
    assert Message.objects.count() == 0


def test_a_big_upload_is_streamed_from_disk_into_the_campaign(client: ApiClient) -> None:
    # Over Django's FILE_UPLOAD_MAX_MEMORY_SIZE (2.5 MB): spooled to a temporary file.
    padding = "x" * 900
    lines = ["email,name,notes"] + [f"big{i}@example.com,B{i},{padding}" for i in range(3_000)]
    content = _csv(*lines)
    assert len(content) > 2_621_440
    created = _created(_upload(client, content, name="Big"))
    assert created["report"]["accepted"] == 3_000
    assert created["progress"]["total"] == 3_000
    message = Message.objects.get(to_email="big2999@example.com")
    assert message.context == {"name": "B2999", "notes": padding}


@pytest.fixture
def small_limits_client(
    role_env: dict[str, str], redis_server: object, make_key: Callable[..., str]
) -> Iterator[ApiClient]:
    """A server that takes uploads and bodies of at most 2 KiB."""
    limits = {"MAILROOM_API_MAX_UPLOAD_BYTES": "2048", "MAILROOM_API_MAX_BODY_BYTES": "2048"}
    with serve_api(role_env, **limits) as url:
        yield ApiClient(url, make_key("campaigns"))


@pytest.fixture
def short_ingest_client(
    role_env: dict[str, str], redis_server: object, make_key: Callable[..., str]
) -> Iterator[ApiClient]:
    """A server whose requests may spend at most 0.2 s adding recipients."""
    with serve_api(role_env, MAILROOM_API_INGEST_SECONDS="0.2") as url:
        yield ApiClient(url, make_key("campaigns"))


def test_an_upload_or_body_over_the_limit_is_413(small_limits_client: ApiClient) -> None:
    client = small_limits_client
    big = _csv("email,name", *(f"limit{i}@example.com,Name {i}" for i in range(200)))
    response = _upload(client, big)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large"
    assert "2048 bytes" in response.json()["detail"]
    response = client.post(URL, json=_body(recipients=_rows("limit", 100)))
    assert response.status_code == 413, response.text
    _nothing_stored()

    small = _created(_upload(client, _csv("email", "fits@example.com")))
    assert small["report"]["accepted"] == 1


def test_a_list_too_long_for_one_request_is_413_naming_the_field_and_stores_nothing(
    short_ingest_client: ApiClient,
) -> None:
    """Past MAILROOM_API_INGEST_SECONDS an ingest gives up with a 413 and rolls back,
    instead of running into the web server's timeout (a worker killed, no answer)."""
    client = short_ingest_client
    many = _csv("email,name", *(f"long{i}@example.com,N{i}" for i in range(60_000)))
    response = _upload(client, many)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large"
    message = _field_errors(response)["file"]
    assert "nothing was stored" in message
    assert "0.2 s" in message
    _nothing_stored()

    # A short list fits (the first chunk is always stored); a long one added to that
    # campaign is refused as a whole and the campaign keeps what it had.
    created = _created(_upload(client, _csv("email", "first@example.com")))
    path = f"{URL}/{created['id']}/recipients"
    response = _upload(client, many, path=path)
    assert response.status_code == 413, response.text
    rows = [{"email": f"json{i}@example.com"} for i in range(60_000)]
    response = client.post(path, json={"recipients": rows})
    assert response.status_code == 413, response.text
    assert list(_field_errors(response)) == ["recipients"]
    assert Message.objects.filter(campaign_id=created["id"]).count() == 1
    assert client.get(f"{URL}/{created['id']}").json()["progress"]["total"] == 1
