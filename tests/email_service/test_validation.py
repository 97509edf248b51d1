"""Bad input gets a clear error naming the problem, and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Message
from email_service.tasks import send_bulk_email_batch, send_high_priority_email

pytestmark = pytest.mark.django_db

GOOD: dict[str, Any] = {
    "to": "ann@example.com",
    "subject": "Hello",
    "template": "welcome",
    "context": {"name": "Ann"},
}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"to": "not-an-address"}, "to", "not a valid email address"),
        ({"to": "ann@example.com\r\nBcc: all@example.com"}, "to", "control characters"),
        ({"to": ""}, "to", "required"),
        ({"to": "jörg@example.com"}, "to", "not a valid email address"),
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject", "control characters"),
        ({"subject": "Hi\nthere"}, "subject", "control characters"),
        ({"subject": "Hi\x00"}, "subject", "control characters"),
        ({"subject": "   "}, "subject", "must not be empty"),
        ({"subject": "x" * 999}, "subject", "at most 998"),
        ({"template": "no_such_template"}, "template", "unknown template 'no_such_template'"),
        ({"template": "../settings"}, "template", "not a valid template name"),
        ({"context": {"when": object()}}, "context", "JSON-serialisable"),
        ({"context": {"n": float("nan")}}, "context", "JSON-serialisable"),
        ({"context": ["not", "a", "dict"]}, "context", "JSON object"),
        ({"from_email": "Team <team@@example.com>"}, "from_email", "not a valid email address"),
        ({"queue": "urgent"}, "queue", "must be one of"),
    ],
)
def test_send_email_refuses_bad_input_and_stores_nothing(
    change: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidEmailRequest) as caught:
        services.send_email(**(GOOD | change))

    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{field}:")
    assert Message.objects.count() == 0


def test_the_original_delay_call_raises_at_the_caller_and_stores_nothing() -> None:
    with pytest.raises(InvalidEmailRequest, match=r"^subject: must not contain control"):
        send_high_priority_email.delay("ann@example.com", "Hi\r\nX: y", {}, "welcome")
    with pytest.raises(InvalidEmailRequest, match=r"^template: unknown template 'nope'"):
        send_high_priority_email.delay("ann@example.com", "Hi", {}, "nope")
    assert Message.objects.count() == 0


def test_one_bad_address_refuses_the_whole_bulk_batch() -> None:
    recipients = ["a@example.com", "b@example.com", "broken@", "c@example.com"]

    with pytest.raises(InvalidEmailRequest) as caught:
        send_bulk_email_batch.delay(recipients, "News", {}, "newsletter")

    assert caught.value.field == "recipients[2]"
    assert "'broken@'" in str(caught.value)
    assert Message.objects.count() == 0


def test_a_bulk_batch_must_be_a_list_not_one_string() -> None:
    with pytest.raises(InvalidEmailRequest, match=r"^recipients: must be a list"):
        send_bulk_email_batch.delay("a@example.com", "News", {}, "newsletter")


def test_a_template_that_cannot_render_the_context_is_refused_up_front() -> None:
    context = {"items": 42}  # the newsletter template loops over items
    with pytest.raises(InvalidEmailRequest) as caught:
        services.send_email(to="a@example.com", subject="x", template="newsletter", context=context)
    assert caught.value.field == "template"
    assert Message.objects.count() == 0


def test_addresses_are_stored_normalised() -> None:
    message = services.send_email(
        to="  Ann.Lee@Bücher.Example ", subject="Hi", template="welcome", context={}
    )
    assert message.to_email == "Ann.Lee@xn--bcher-kva.example"


def test_duplicate_addresses_in_a_batch_collapse_to_one_message() -> None:
    messages = services.send_bulk_batch(
        ["a@example.com", "A@EXAMPLE.COM", "b@example.com"], "News", {}, "newsletter"
    )
    assert sorted(m.to_email for m in messages) == ["a@example.com", "b@example.com"]
    assert Message.objects.count() == 2


def test_the_same_idempotency_key_returns_the_first_message() -> None:
    first = services.send_email(**GOOD, idempotency_key="signup-42")
    again = services.send_email(**GOOD, idempotency_key="signup-42")
    assert again.id == first.id
    assert Message.objects.count() == 1


def test_rate_limits_refuse_negative_values_naming_the_field() -> None:
    with pytest.raises(InvalidEmailRequest, match=r"^per_hour: must be a number"):
        services.set_rate_limits(per_hour=-5)


def test_a_campaign_needs_a_name_a_valid_subject_and_a_known_template() -> None:
    with pytest.raises(InvalidEmailRequest, match=r"^name: must not be empty"):
        services.create_campaign(name=" ", subject="Hi", template="newsletter")
    with pytest.raises(InvalidEmailRequest, match=r"^subject: is not a valid template"):
        services.create_campaign(name="x", subject="Hi {% if %}", template="newsletter")
    with pytest.raises(InvalidEmailRequest, match=r"^template: unknown template"):
        services.create_campaign(name="x", subject="Hi", template="missing")
