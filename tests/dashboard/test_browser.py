"""The dashboard in a real browser: Debian's Chromium driven by Playwright against
gunicorn, a Celery worker, beat and the SMTP sink.

An operator signs in, starts a campaign, watches the figures and the progress bar rise
without a reload, pauses it (accepting the confirmation) while the sink stops receiving,
resumes it and sees it complete. Every request the page makes stays on this machine, and
a hidden tab makes none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from playwright.sync_api import Browser, Dialog, Page, sync_playwright

from email_service.models import Campaign
from mailroom_testkit.processes import OUTPUT_DIR, Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.dashboard.conftest import PASSWORD, make_campaign

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
RECIPIENTS = 300
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
SENT_FIGURE = '#summary [data-figure="sent"]'


@pytest.fixture
def draft(start_role: Callable[..., Role], staff_user: User) -> Campaign:
    """The processes and the draft campaign, made before the browser starts: Playwright's
    sync API runs an event loop, where Django refuses database calls."""
    start_role("worker", queues="high_priority,bulk", concurrency=2)
    start_role("beat")
    return make_campaign("Launch", count=RECIPIENTS)


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            launched.close()


HIDE = """() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
    document.dispatchEvent(new Event("visibilitychange"));
}"""
SHOW = """() => {
    delete document.hidden;
    document.dispatchEvent(new Event("visibilitychange"));
}"""


def _card_sent(page: Page, campaign_id: str) -> int:
    value = page.eval_on_selector(f'[data-campaign="{campaign_id}"]', "card => card.dataset.sent")
    return int(value)


def _bar_width(page: Page, campaign_id: str) -> float:
    selector = f'[data-campaign="{campaign_id}"] .segment.sent'
    if page.query_selector(selector) is None:
        return 0.0
    return float(page.eval_on_selector(selector, "bar => bar.getBoundingClientRect().width"))


def _summary_sent(page: Page) -> int:
    return int((page.text_content(SENT_FIGURE) or "0").replace(",", ""))


def _accept(asked: list[str]) -> Callable[[Dialog], None]:
    def handle(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    return handle


def test_an_operator_starts_watches_pauses_and_resumes_a_campaign(
    web_server: str, smtp_sink: SMTPSink, staff_user: User, draft: Campaign, browser: Browser
) -> None:
    # About 50 emails a second from two processes, whatever their lanes: slow enough to
    # watch the campaign move before it completes.
    smtp_sink.set_delay(0.04 * settings.MAILROOM_SMTP_CONNECTIONS_PER_PROCESS)
    campaign = draft
    card = f'[data-campaign="{campaign.id}"]'

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    asked: list[str] = []

    # Sign in: the dashboard sends an anonymous visitor to the login page.
    page.goto(f"{web_server}/dashboard/")
    assert urlsplit(page.url).path == "/login/"
    page.get_by_label("Username").fill(staff_user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{web_server}/dashboard/")

    # Start the draft from the dashboard (a confirmed POST).
    page.once("dialog", _accept(asked))
    page.click(f"#campaign-{campaign.id}-start")
    page.wait_for_selector(card)
    assert asked[-1].startswith("Start campaign “Launch”?")

    # From here on the page must not reload: the figures come from the poller.
    page.evaluate("window.stillTheSamePage = true")
    page.wait_for_function(f"document.querySelector('{card}').dataset.sent > 0", timeout=30_000)
    first_sent, first_width = _card_sent(page, str(campaign.id)), _bar_width(page, str(campaign.id))
    first_total = _summary_sent(page)
    page.wait_for_function(
        f"document.querySelector('{card}').dataset.sent > {first_sent + 40}"
        f" && Number(document.querySelector('{SENT_FIGURE}').textContent) > {first_total}",
        timeout=30_000,
    )
    assert _bar_width(page, str(campaign.id)) > first_width
    assert page.evaluate("window.stillTheSamePage") is True, "the page was not reloaded"
    OUTPUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT_DIR / "dashboard.png"), full_page=True)

    # Pause, accepting the confirmation: the sink stops receiving.
    page.once("dialog", _accept(asked))
    page.click(f"#campaign-{campaign.id}-pause")
    page.wait_for_selector(f'{card}[data-status="paused"]')
    assert asked[-1].startswith("Pause campaign “Launch”?")
    assert "paused: nothing more is sent" in (page.text_content(".messages") or "")
    time.sleep(1.5)  # the conversations each worker process had in flight
    held = smtp_sink.count()
    time.sleep(3)
    assert smtp_sink.count() == held, "nothing is sent while the campaign is paused"
    assert held < RECIPIENTS

    # Resume: the poller shows it finishing, and everyone got exactly one copy.
    page.click(f"#campaign-{campaign.id}-resume")
    page.wait_for_selector(f'{card}[data-status="sending"]')
    page.evaluate("window.stillTheSamePage = true")
    page.wait_for_selector(card, state="detached", timeout=60_000)  # completed: not active
    page.wait_for_function(
        f"document.querySelector('{SENT_FIGURE}').textContent === '{RECIPIENTS}'"
    )
    assert page.evaluate("window.stillTheSamePage") is True
    copies = smtp_sink.copies()
    assert len(copies) == RECIPIENTS
    assert set(copies.values()) == {1}

    polls = [url for url in requested if urlsplit(url).path == "/dashboard/data"]
    assert len(polls) >= 3, "the page polled for figures"

    # A hidden tab asks for nothing; back in view, it refreshes at once.
    page.evaluate(HIDE)
    time.sleep(0.5)  # a poll already on its way may finish
    before = len(requested)
    time.sleep(5)
    assert requested[before:] == [], "no request while the tab is hidden"
    with page.expect_request(lambda request: urlsplit(request.url).path == "/dashboard/data"):
        page.evaluate(SHOW)
    outside = [url for url in requested if urlsplit(url).hostname not in LOCAL_HOSTS]
    assert outside == [], f"requests that left this machine: {outside}"
