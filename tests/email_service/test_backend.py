"""The Django email backend: send_mail() and friends through the durable queue, delivered
by a real Celery worker to an SMTP socket."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from email.message import EmailMessage as ParsedEmail
from email.message import MIMEPart
from email.mime.image import MIMEImage
from pathlib import Path

import pytest
from django.core import mail
from django.test import override_settings

from email_service.exceptions import InvalidEmailRequest
from email_service.models import Message
from mailroom_testkit.processes import APP_DIR, Role
from mailroom_testkit.smtp_sink import Received, SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUED = "email_service.backends.QueuedEmailBackend"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"


@pytest.fixture(autouse=True)
def _queued_backend() -> Iterator[None]:
    with override_settings(EMAIL_BACKEND=QUEUED):
        yield


def _all_sent(count: int) -> bool:
    return Message.objects.filter(status="sent").count() == count


def _header_block(received: Received) -> bytes:
    return received.data.split(b"\r\n\r\n", 1)[0]


def _by_recipient(sink: SMTPSink) -> dict[str, ParsedEmail]:
    return {m.rcpt_to: m.parsed() for m in sink.received}


def _text(mail_part: MIMEPart | None) -> str:
    assert mail_part is not None
    return str(mail_part.get_content()).replace("\r\n", "\n")


# --- delivery ---------------------------------------------------------------------------


def test_to_cc_and_bcc_each_get_one_copy_and_bcc_is_in_no_header(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    email = mail.EmailMessage(
        subject="Your order 42",
        body="Thanks for your order.\n",
        from_email="Shop <shop@example.com>",
        to=["Ann Example <ann@example.com>", "bob@example.com"],
        cc=["Carol <carol@example.com>"],
        bcc=["dave@example.com", "ANN@example.com"],  # Ann once, however often she is named
        reply_to=["Help Desk <help@example.com>"],
        headers={"X-Order-Id": "42", "In-Reply-To": "<order-42@shop.example.com>"},
    )
    assert email.send() == 1
    assert mail.send_mail("Plain", "Just text.", None, ["erin@example.com"]) == 1

    wait_for(lambda: _all_sent(5), 60, "five deliveries")
    assert smtp_sink.copies() == {
        "ann@example.com": 1,
        "bob@example.com": 1,
        "carol@example.com": 1,
        "dave@example.com": 1,
        "erin@example.com": 1,
    }
    assert set(Message.objects.values_list("queue", flat=True)) == {"high_priority"}
    rows = {m.to_email: m for m in Message.objects.all()}
    order = [m for m in smtp_sink.received if m.rcpt_to != "erin@example.com"]
    for received in order:
        parsed = received.parsed()
        assert received.mail_from == "shop@example.com"
        assert parsed["Subject"] == "Your order 42"
        assert parsed["From"] == "Shop <shop@example.com>"
        # Everyone sees the To and Cc lists the sender wrote; nobody sees the Bcc list.
        assert parsed["To"] == "Ann Example <ann@example.com>, bob@example.com"
        assert parsed["Cc"] == "Carol <carol@example.com>"
        assert parsed["Bcc"] is None
        assert b"dave@" not in _header_block(received).lower()
        assert parsed["Reply-To"] == "Help Desk <help@example.com>"
        assert parsed["X-Order-Id"] == "42"
        assert parsed["In-Reply-To"] == "<order-42@shop.example.com>"
        assert parsed["Message-ID"] == rows[received.rcpt_to].message_id_header
        assert parsed.get_content_type() == "text/plain"
        assert _text(parsed) == "Thanks for your order.\n"
    plain = _by_recipient(smtp_sink)["erin@example.com"]
    assert plain["From"] == "Mailroom Tests <noreply@mailroom.example.com>"
    assert plain["To"] == "erin@example.com"
    assert _text(plain) == "Just text.\n"


def test_html_arrives_as_multipart_alternative_with_a_text_part(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    both = mail.EmailMultiAlternatives("Both", "The text part.", None, ["text@example.com"])
    both.attach_alternative("<p>The <b>HTML</b> part.</p>", "text/html")
    html_only = mail.EmailMessage(
        "Html", "<h1>Hi</h1><ul><li>one</li></ul>", None, ["h@example.com"]
    )
    html_only.content_subtype = "html"
    connection = mail.get_connection()
    assert connection.send_messages([both, html_only]) == 2
    datatuples = [
        ("Mass 1", "First.", None, ["m1@example.com"]),
        ("Mass 2", "Second.", None, ["m2@example.com", "m3@example.com"]),
    ]
    assert mail.send_mass_mail(datatuples) == 2

    wait_for(lambda: _all_sent(5), 60, "five deliveries")
    received = _by_recipient(smtp_sink)
    assert set(received) == {f"{n}@example.com" for n in ("text", "h", "m1", "m2", "m3")}
    mixed = received["text@example.com"]
    assert mixed.get_content_type() == "multipart/alternative"
    assert _text(mixed.get_body(preferencelist=("plain",))).strip() == "The text part."
    assert "<b>HTML</b>" in _text(mixed.get_body(preferencelist=("html",)))
    # An HTML-only email gets a readable text part, converted from the HTML.
    converted = received["h@example.com"]
    assert converted.get_content_type() == "multipart/alternative"
    text = _text(converted.get_body(preferencelist=("plain",)))
    assert "Hi" in text
    assert "* one" in text
    assert "<" not in text
    assert "<h1>Hi</h1>" in _text(converted.get_body(preferencelist=("html",)))
    assert received["m3@example.com"]["To"] == "m2@example.com, m3@example.com"
    assert received["m2@example.com"]["Subject"] == "Mass 2"


def test_attachments_arrive_intact(running_worker: Role, smtp_sink: SMTPSink) -> None:
    email = mail.EmailMultiAlternatives("Invoice", "See attached.", None, ["ann@example.com"])
    email.attach_alternative('<p>See attached.</p><img src="cid:logo">', "text/html")
    email.attach("invoice.pdf", PDF, "application/pdf")
    email.attach("notes.txt", "Grüße\n", "text/plain")
    logo = MIMEImage(GIF, "gif")
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.gif")
    email.attach(logo)
    assert email.send() == 1

    wait_for(lambda: _all_sent(1), 60, "the delivery")
    parsed = smtp_sink.received[0].parsed()
    assert parsed.get_content_type() == "multipart/mixed"
    parts = {part.get_filename(): part for part in parsed.iter_attachments()}
    assert parts["invoice.pdf"].get_content_type() == "application/pdf"
    assert parts["invoice.pdf"].get_content() == PDF
    assert _text(parts["notes.txt"]) == "Grüße\n"
    assert parts["logo.gif"]["Content-ID"] == "<logo>"
    assert parts["logo.gif"].get_content() == GIF
    body = parsed.get_body(preferencelist=("html",))
    assert body is not None
    assert 'src="cid:logo"' in str(body.get_content())


def test_the_bulk_queue_is_chosen_by_header_or_backend_option(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    by_header = mail.EmailMessage(
        "News", "Bulk by header.", None, ["b1@example.com"], headers={"X-Mailroom-Queue": "bulk"}
    )
    assert by_header.send() == 1
    bulk = mail.get_connection(queue="bulk")
    assert mail.send_mail("News", "Bulk by option.", None, ["b2@example.com"], connection=bulk)

    wait_for(lambda: _all_sent(2), 60, "two deliveries")
    assert set(Message.objects.values_list("queue", flat=True)) == {"bulk"}
    for received in smtp_sink.received:
        parsed = received.parsed()
        assert parsed["X-Mailroom-Queue"] is None
        assert b"x-mailroom" not in _header_block(received).lower()
        assert parsed["List-Unsubscribe"].startswith("<https://mail.example.com/")
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


# --- refusals -----------------------------------------------------------------------------


def test_an_invalid_address_is_a_clear_error_and_nothing_is_stored() -> None:
    with pytest.raises(InvalidEmailRequest, match=r"to\[0\]: 'not-an-address' is not a valid"):
        mail.send_mail("Hi", "Body", None, ["not-an-address"])
    with pytest.raises(InvalidEmailRequest, match=r"bcc\[0\]"):
        mail.EmailMessage("Hi", "Body", None, ["ok@example.com"], bcc=["x@"]).send()
    with pytest.raises(InvalidEmailRequest, match="subject: must not contain control"):
        mail.send_mail("Hi\nBcc: victim@example.com", "Body", None, ["ann@example.com"])
    assert mail.send_mail("Hi", "Body", None, ["not-an-address"], fail_silently=True) == 0
    assert Message.objects.count() == 0


def test_one_call_is_all_or_nothing_unless_fail_silently() -> None:
    good = mail.EmailMessage("Good", "Body", None, ["good@example.com", "other@example.com"])
    bad = mail.EmailMessage("Bad", "Body", None, ["bad@@example.com"])
    with pytest.raises(InvalidEmailRequest):
        mail.get_connection().send_messages([good, bad])
    assert Message.objects.count() == 0

    assert mail.get_connection(fail_silently=True).send_messages([good, bad]) == 1
    assert sorted(Message.objects.values_list("to_email", flat=True)) == [
        "good@example.com",
        "other@example.com",
    ]
    nobody = mail.EmailMessage("Nobody", "Body", None, [])
    assert mail.get_connection().send_messages([nobody]) == 0


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"X-Tag": "a\r\nBcc: victim@example.com"}, r"headers\[X-Tag\]: must not contain control"),
        ({"Bcc": "victim@example.com"}, "Bcc cannot be set"),
        ({"Message-ID": "<mine@example.com>"}, "Message-ID cannot be set"),
        ({"X-Mailroom-Token": "1"}, "X-Mailroom-Token cannot be set"),
        ({"Bad Name": "1"}, "'Bad Name' is not a valid header name"),
        ({"X-Mailroom-Queue": "urgent"}, "queue: must be one of"),
    ],
)
def test_header_injection_and_reserved_headers_are_refused(
    headers: dict[str, str], error: str
) -> None:
    with pytest.raises(InvalidEmailRequest, match=error):
        mail.EmailMessage("Hi", "Body", None, ["ann@example.com"], headers=headers).send()
    assert Message.objects.count() == 0


def test_attachments_over_the_limit_are_refused_naming_the_setting() -> None:
    email = mail.EmailMessage("Big", "Body", None, ["ann@example.com"])
    email.attach("big.bin", b"x" * 2000, "application/octet-stream")
    with (
        override_settings(MAILROOM_MAX_ATTACHMENT_BYTES=1000),
        pytest.raises(InvalidEmailRequest, match=r"2000 bytes.*MAILROOM_MAX_ATTACHMENT_BYTES"),
    ):
        email.send()
    assert Message.objects.count() == 0
    with override_settings(MAILROOM_MAX_ATTACHMENT_BYTES=2000):
        assert email.send() == 1


# --- another Django project -----------------------------------------------------------------

CLIENT_SETTINGS = """
    import os

    import dj_database_url

    SECRET_KEY = "another-project"
    INSTALLED_APPS = ["email_service"]
    DATABASES = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        "mailroom": dj_database_url.parse(os.environ["MAILROOM_DATABASE_URL"]),
    }
    DATABASE_ROUTERS = ["email_service.backends.MailroomRouter"]
    EMAIL_BACKEND = "email_service.backends.QueuedEmailBackend"
    DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"
    REDIS_URL = os.environ["MAILROOM_REDIS_URL"]
    MAILROOM_BROKER_URL = REDIS_URL
    MAILROOM_BATCH_SIZE = 50
    MAILROOM_MESSAGE_ID_DOMAIN = "shop.example.com"
"""

CLIENT_SCRIPT = """
    import django

    django.setup()
    from django.core.mail import EmailMessage

    email = EmailMessage("Shipped", "On its way.", to=["erin@example.com"], bcc=["log@example.com"])
    print(email.send())
"""


def test_another_django_project_sends_through_mailroom(
    running_worker: Role, smtp_sink: SMTPSink, role_env: dict[str, str], tmp_path: Path
) -> None:
    """The recipe of docs/integration.md: a project with its own (here SQLite) database, Mailroom's
    database as a second alias, and no Celery app of its own."""
    (tmp_path / "client_settings.py").write_text(textwrap.dedent(CLIENT_SETTINGS))
    env = {
        "PATH": role_env["PATH"],
        "PYTHONPATH": f"{APP_DIR}:{tmp_path}",
        "DJANGO_SETTINGS_MODULE": "client_settings",
        "MAILROOM_DATABASE_URL": role_env["DATABASE_URL"],
        "MAILROOM_REDIS_URL": role_env["REDIS_URL"],
    }
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLIENT_SCRIPT)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"
    # No beat runs here: a prompt delivery means the task reached Mailroom's broker.
    wait_for(lambda: _all_sent(2), 30, "two deliveries")
    received = _by_recipient(smtp_sink)
    assert set(received) == {"erin@example.com", "log@example.com"}
    assert received["log@example.com"]["To"] == "erin@example.com"
    assert received["erin@example.com"]["Message-ID"].endswith("@shop.example.com>")
