"""Campaigns end to end: real workers, beat, Redis, Postgres and an SMTP socket."""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from email_service import ratelimit, redisstore, services
from email_service.models import Campaign, Message
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _campaign(count: int, name: str = "Spring", **kwargs: object) -> Campaign:
    campaign = services.create_campaign(
        name=name,
        subject="Hello {{ name }}",
        template="newsletter",
        **kwargs,  # type: ignore[arg-type]
    )
    rows = [
        {"email": f"{name.lower()}{i}@example.com", "context": {"name": f"N{i}"}}
        for i in range(count)
    ]
    report = services.add_recipients(campaign, rows)
    assert report.accepted == count
    return campaign


def _campaign_copies(sink: SMTPSink, campaign: Campaign) -> dict[str, int]:
    prefix = campaign.name.lower()
    return {k: v for k, v in sink.copies().items() if k.startswith(prefix)}


def _settled(campaign: Campaign) -> Callable[[], bool]:
    def check() -> bool:
        progress = services.campaign_progress(campaign)
        return progress["remaining"] == 0 and progress["total"] > 0

    return check


@pytest.fixture
def bulk_pool(start_role: Callable[..., Role]) -> list[Role]:
    return [
        start_role("worker", queues="bulk", concurrency=2, name="worker-bulk"),
        start_role("worker", queues="high_priority", concurrency=1, name="worker-high"),
        start_role("beat"),
    ]


def test_a_20000_recipient_csv_campaign_gives_everyone_one_email_with_their_own_data(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    lines = ["email,name,code"]
    lines += [f"csv{i}@example.com,Name{i},K{i}Q" for i in range(20_000)]
    campaign = services.create_campaign(name="csv", subject="Hi {{ name }}", template="newsletter")
    report = services.add_recipients(campaign, io.BytesIO("\n".join(lines).encode()))
    assert (report.accepted, report.invalid) == (20_000, 0)
    services.start_campaign(campaign)

    wait_for(_settled(campaign), 240, "20,000 deliveries")
    received = smtp_sink.received
    assert len(received) == 20_000
    by_address = {m.rcpt_to: m.data for m in received}
    assert len(by_address) == 20_000, "nobody got two copies"
    for i in (0, 1, 9_999, 19_999):
        data = by_address[f"csv{i}@example.com"]
        assert f"Subject: Hi Name{i}\r\n".encode() in data
        assert f"Hi Name{i},".encode() in data, "the body greets the recipient by name"
    wait_for(lambda: Campaign.objects.get(id=campaign.id).status == "completed", 10, "completion")
    assert services.campaign_progress(campaign)["sent"] == 20_000


def test_bulk_mail_carries_one_click_unsubscribe_and_a_working_link(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    campaign = _campaign(3, name="unsub")
    services.start_campaign(campaign)
    wait_for(_settled(campaign), 60, "the campaign")

    mail = smtp_sink.received[0].parsed()
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = mail["List-Unsubscribe"].strip("<>").split(">")[0]
    assert url.startswith("https://mail.example.com/u/")
    assert url in mail.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]

    from django.test import Client

    path = url.removeprefix("https://mail.example.com")
    response = Client(enforce_csrf_checks=True).post(
        path, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200
    unsubscribed = mail["To"]

    later = services.create_campaign(name="later", subject="Again", template="newsletter")
    services.add_recipients(later, [{"email": unsubscribed}, {"email": "fresh@example.com"}])
    services.start_campaign(later)
    wait_for(_settled(later), 60, "the later campaign")
    assert smtp_sink.copies()[unsubscribed] == 1, "the later campaign skipped the address"
    assert services.campaign_progress(later)["suppressed"] == 1


def test_pause_at_a_third_holds_and_resume_sends_exactly_the_rest(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_delay(0.005)
    campaign = _campaign(900, name="pause")
    services.start_campaign(campaign)
    wait_for(lambda: smtp_sink.count() >= 300, 60, "a third of the campaign")

    services.pause_campaign(campaign)
    time.sleep(1)
    held = smtp_sink.count()
    time.sleep(4)
    assert smtp_sink.count() == held, "nothing arrives while paused"
    assert held < 900

    services.resume_campaign(campaign)
    wait_for(_settled(campaign), 90, "the rest after resume")
    copies = _campaign_copies(smtp_sink, campaign)
    assert len(copies) == 900
    assert max(copies.values()) == 1


def test_pause_survives_restarting_every_worker_and_flushing_redis(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_delay(0.005)
    roles = [
        start_role("worker", queues="bulk", concurrency=2, name="worker-bulk"),
        start_role("worker", queues="high_priority", concurrency=1, name="worker-high"),
        start_role("beat"),
    ]
    campaign = _campaign(900, name="flush")
    services.start_campaign(campaign)
    wait_for(lambda: smtp_sink.count() >= 300, 60, "a third of the campaign")
    services.pause_campaign(campaign)
    time.sleep(1)
    for role in roles:
        role.stop()
    redisstore.client().flushall()
    held = smtp_sink.count()

    start_role("worker", queues="bulk", concurrency=2, name="worker-bulk-2")
    start_role("worker", queues="high_priority", concurrency=1, name="worker-high-2")
    start_role("beat")
    time.sleep(4)
    assert smtp_sink.count() == held, "still paused after restarts and a flushed Redis"

    campaign.refresh_from_db()
    services.resume_campaign(campaign)
    wait_for(_settled(campaign), 90, "the rest after resume")
    copies = _campaign_copies(smtp_sink, campaign)
    assert len(copies) == 900
    assert max(copies.values()) == 1


def test_cancel_stops_sending_and_the_rest_is_cancelled(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.set_delay(0.005)
    campaign = _campaign(600, name="cancel")
    services.start_campaign(campaign)
    wait_for(lambda: smtp_sink.count() >= 100, 60, "the campaign to be under way")

    services.cancel_campaign(campaign)
    time.sleep(1)
    stopped = smtp_sink.count()
    time.sleep(3)
    assert smtp_sink.count() == stopped
    progress = services.campaign_progress(campaign)
    assert progress["sent"] == stopped
    assert progress["cancelled"] == 600 - stopped
    assert progress["remaining"] == 0


def test_send_at_in_the_future_is_not_sent_early(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    campaign = _campaign(5, name="later", send_at=timezone.now() + timedelta(seconds=4))
    services.start_campaign(campaign)
    assert campaign.status == "scheduled"
    time.sleep(2.5)
    assert smtp_sink.count() == 0

    wait_for(_settled(campaign), 30, "the scheduled send")
    assert len(_campaign_copies(smtp_sink, campaign)) == 5


def test_expires_at_in_the_past_stops_sending(bulk_pool: list[Role], smtp_sink: SMTPSink) -> None:
    campaign = _campaign(5, name="stale", expires_at=timezone.now() + timedelta(seconds=1))
    Campaign.objects.filter(id=campaign.id).update(expires_at=timezone.now() - timedelta(1))
    campaign.refresh_from_db()
    services.start_campaign(campaign)

    wait_for(lambda: Campaign.objects.get(id=campaign.id).status == "cancelled", 20, "expiry")
    time.sleep(1)
    assert smtp_sink.count() == 0
    assert set(Message.objects.values_list("status_reason", flat=True)) == {"expired"}


def test_a_global_bulk_limit_paces_two_worker_processes_and_spares_transactional(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    env = {"MAILROOM_RATE_LIMIT_PER_SECOND": 50, "MAILROOM_RATE_RESERVED_TRANSACTIONAL": 0}
    start_role("worker", queues="bulk", concurrency=1, name="worker-bulk-a", env=env)
    start_role("worker", queues="bulk", concurrency=1, name="worker-bulk-b", env=env)
    start_role("worker", queues="high_priority", concurrency=1, name="worker-high", env=env)
    start_role("beat", env=env)
    campaign = _campaign(1200, name="paced")
    services.start_campaign(campaign)
    wait_for(lambda: smtp_sink.count() >= 50, 30, "the campaign to be under way")

    services.send_email(to="reset@example.com", subject="Reset", template="welcome")
    asked = time.monotonic()
    wait_for(lambda: "reset@example.com" in smtp_sink.copies(), 10, "the transactional email")
    arrived = next(m.at for m in smtp_sink.received if m.rcpt_to == "reset@example.com")
    # The pace from the sink's own arrival times over 300 campaign messages (no fixed
    # sleep: a loaded machine takes longer to get there, the rate it sees is the same).
    before = len(_campaign_copies(smtp_sink, campaign))
    wait_for(lambda: len(_campaign_copies(smtp_sink, campaign)) >= before + 300, 30, "300 more")
    times = sorted(m.at for m in smtp_sink.received if m.rcpt_to != "reset@example.com")
    window = times[before : before + 301]
    rate = (len(window) - 1) / (window[-1] - window[0])

    assert 45 <= rate <= 55, f"observed {rate:.1f}/s for a limit of 50/s"
    assert arrived - asked < 3, "transactional mail did not wait behind the campaign"
    assert services.campaign_progress(campaign)["remaining"] > 400


def test_421_replies_slow_bulk_down_lose_nothing_and_recover(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    env = {"MAILROOM_RATE_LIMIT_PER_SECOND": 200, "MAILROOM_THROTTLE_COOLDOWN_SECONDS": 2}
    start_role("worker", queues="bulk", concurrency=2, name="worker-bulk", env=env)
    start_role("worker", queues="high_priority", concurrency=1, name="worker-high", env=env)
    start_role("beat", env=env)
    smtp_sink.refuse_every(3, "421 4.7.0 Slow down", until_message=300)
    campaign = _campaign(500, name="throttled")
    services.start_campaign(campaign)

    factors: list[float] = []
    deadline = time.monotonic() + 120
    while not _settled(campaign)() and time.monotonic() < deadline:
        factors.append(ratelimit.throttle_factor())
        time.sleep(0.2)
    assert _settled(campaign)()
    assert min(factors) < 1, "throttling replies lowered the bulk rate"
    copies = _campaign_copies(smtp_sink, campaign)
    assert len(copies) == 500
    assert max(copies.values()) == 1
    wait_for(lambda: ratelimit.throttle_factor() == 1, 30, "the rate to recover")


def test_a_worker_with_a_dkim_key_signs_bulk_mail_that_verifies(
    start_role: Callable[..., Role], smtp_sink: SMTPSink, tmp_path: Path
) -> None:
    import dkim

    key = tmp_path / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    env = {
        "MAILROOM_DKIM_DOMAIN": "mailroom.example.com",
        "MAILROOM_DKIM_SELECTOR": "mr1",
        "MAILROOM_DKIM_PRIVATE_KEY_FILE": str(key),
    }
    start_role("worker", queues="bulk,high_priority", concurrency=1, env=env)
    start_role("beat")
    campaign = _campaign(2, name="signed")
    services.start_campaign(campaign)
    wait_for(_settled(campaign), 30, "the signed campaign")

    def dns(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"mr1._domainkey.mailroom.example.com."
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    for received in smtp_sink.received:
        assert received.data.startswith(b"DKIM-Signature:")
        assert dkim.verify(received.data, dnsfunc=dns)
        signed_headers = received.data.split(b"; h=", 1)[1].split(b";", 1)[0].lower()
        assert b"list-unsubscribe" in signed_headers
        assert b"list-unsubscribe-post" in signed_headers


def test_retry_failed_requeues_only_the_failed_and_never_the_suppressed(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_address("replay1@example.com", "554 5.7.1 Rejected by policy")
    smtp_sink.refuse_address("replay2@example.com", "550 5.1.1 No such user")
    campaign = _campaign(6, name="replay")
    services.start_campaign(campaign)
    wait_for(_settled(campaign), 30, "the first pass")
    assert services.campaign_progress(campaign)["failed"] == 2
    smtp_sink.reset()

    requeued = services.retry_failed(campaign)

    assert requeued == 1, "the 5.1.1 bounce is suppressed and stays failed"
    wait_for(lambda: smtp_sink.copies() == {"replay1@example.com": 1}, 30, "the replay")
    wait_for(_settled(campaign), 30, "the campaign to settle again")
    progress = services.campaign_progress(campaign)
    assert (progress["sent"], progress["failed"]) == (5, 1)
    assert smtp_sink.copies() == {"replay1@example.com": 1}, "nobody else got a second copy"
