"""A subject that passes the campaign's checks but blows the work limit with one
recipient's context fails that message alone, in a real worker, with the reason."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from email_service import services
from email_service.models import Message
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# Three nested loops over the recipient's own ``x``: nothing with the empty context of
# the create-time check, 8 iterations for "ab", 64,000 (over the limit) for 40 letters.
SUBJECT = "Hi{% for a in x %}{% for b in x %}{% for c in x %}.{% endfor %}{% endfor %}{% endfor %}"


def test_a_subject_over_the_work_limit_for_one_recipient_fails_only_that_message(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    start_role("worker", queues="high_priority,bulk", concurrency=2)
    start_role("beat")
    campaign = services.create_campaign(name="limits", subject=SUBJECT, template="newsletter")
    rows = [
        {"email": "first@example.com", "context": {"x": "ab"}},
        {"email": "greedy@example.com", "context": {"x": "y" * 40}},
        {"email": "last@example.com", "context": {"x": "ab"}},
    ]
    assert services.add_recipients(campaign, rows).accepted == 3
    services.start_campaign(campaign)

    def settled() -> bool:
        return services.campaign_progress(campaign)["remaining"] == 0

    wait_for(settled, 60, "the campaign")
    greedy = Message.objects.get(campaign=campaign, to_email="greedy@example.com")
    assert greedy.status == Message.Status.FAILED
    assert "5.6.0 Mailroom could not render the message" in greedy.last_smtp_reply
    assert "template work limit exceeded (more than 20000 steps)" in greedy.last_smtp_reply
    assert set(smtp_sink.copies()) == {"first@example.com", "last@example.com"}
    delivered = [m.parsed()["Subject"] for m in smtp_sink.received]
    assert delivered == ["Hi........", "Hi........"]
    assert services.campaign_progress(campaign)["sent"] == 2
