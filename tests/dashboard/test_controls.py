"""The controls: CSRF-protected POSTs that call services; a GET changes nothing."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from email_service import services
from email_service.models import Campaign, Message, Suppression
from tests.dashboard.conftest import make_campaign

pytestmark = pytest.mark.django_db


def _controls(campaign: Campaign) -> list[str]:
    base = f"/dashboard/campaigns/{campaign.id}"
    return [
        "/dashboard/bulk/pause",
        "/dashboard/bulk/resume",
        f"{base}/start",
        f"{base}/pause",
        f"{base}/resume",
        f"{base}/cancel",
        f"{base}/retry",
        "/dashboard/suppressions/add",
        "/dashboard/suppressions/remove",
    ]


def _state() -> tuple[object, ...]:
    return (
        services.is_bulk_paused(),
        sorted(Campaign.objects.values_list("name", "status")),
        sorted(Message.objects.values_list("to_email", "status")),
        sorted(Suppression.objects.values_list("address", "reason")),
    )


def test_a_get_on_any_control_url_is_refused_and_changes_nothing(staff_client: Client) -> None:
    sending = make_campaign("Sending", start=True)
    make_campaign("Draft")
    services.add_suppression("kept@example.com")
    before = _state()
    for url in _controls(sending):
        query = "?address=kept@example.com&confirmed=yes"
        response = staff_client.get(url + query)
        assert response.status_code == 405, url
        assert response["Allow"] == "POST", url
    assert _state() == before


def test_a_post_without_a_csrf_token_is_refused(staff_user: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user)
    campaign = make_campaign("Sending", start=True)
    before = _state()
    for url in _controls(campaign):
        response = client.post(url, {"address": "new@example.com", "confirmed": "yes"})
        assert response.status_code == 403, url
        assert b"CSRF" in response.content, url
    assert _state() == before


def test_a_post_with_the_pages_csrf_token_works(staff_user: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user)
    client.get("/dashboard/")
    token = client.cookies["csrftoken"].value
    response = client.post(
        "/dashboard/bulk/pause", {"confirmed": "yes", "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302
    assert services.is_bulk_paused() is True


def test_pausing_bulk_without_javascript_asks_on_a_page_first(staff_client: Client) -> None:
    page = staff_client.post("/dashboard/bulk/pause")
    assert page.status_code == 200
    assert b"Pause all bulk sending?" in page.content
    assert b'name="confirmed" value="yes"' in page.content
    assert b'action="/dashboard/bulk/pause"' in page.content
    assert services.is_bulk_paused() is False, "asking changes nothing"

    done = staff_client.post("/dashboard/bulk/pause", {"confirmed": "yes"}, follow=True)
    assert done.redirect_chain == [("/dashboard/#queues", 302)]
    assert services.is_bulk_paused() is True
    assert b"Bulk sending is paused" in done.content
    assert b"Resume bulk sending" in done.content


def test_resuming_bulk_needs_no_confirmation(staff_client: Client) -> None:
    services.pause_bulk()
    response = staff_client.post("/dashboard/bulk/resume")
    assert response.status_code == 302
    assert services.is_bulk_paused() is False


def test_every_destructive_control_asks_first(staff_client: Client) -> None:
    sending = make_campaign("Sending", start=True)
    draft = make_campaign("Draft")
    services.add_suppression("kept@example.com")
    before = _state()
    for url in (
        "/dashboard/bulk/pause",
        f"/dashboard/campaigns/{draft.id}/start",
        f"/dashboard/campaigns/{sending.id}/pause",
        f"/dashboard/campaigns/{sending.id}/cancel",
        f"/dashboard/campaigns/{sending.id}/retry",
        "/dashboard/suppressions/remove",
    ):
        response = staff_client.post(url, {"address": "kept@example.com"})
        assert response.status_code == 200, url
        assert b'name="confirmed" value="yes"' in response.content, url
    assert _state() == before


def test_a_campaign_goes_through_its_life_from_the_dashboard(staff_client: Client) -> None:
    campaign = make_campaign("Life", count=4)
    base = f"/dashboard/campaigns/{campaign.id}"

    def status() -> str:
        campaign.refresh_from_db()
        return campaign.status

    staff_client.post(f"{base}/start", {"confirmed": "yes"})
    assert status() == Campaign.Status.SENDING
    staff_client.post(f"{base}/pause", {"confirmed": "yes"})
    assert status() == Campaign.Status.PAUSED
    staff_client.post(f"{base}/resume")
    assert status() == Campaign.Status.SENDING
    response = staff_client.post(f"{base}/cancel", {"confirmed": "yes"}, follow=True)
    assert status() == Campaign.Status.CANCELLED
    assert b"4 unsent message(s) dropped" in response.content
    assert set(Message.objects.values_list("status", flat=True)) == {"cancelled"}


def test_retry_failed_requeues_the_failed_messages_of_the_campaign(staff_client: Client) -> None:
    campaign = make_campaign("Retry", count=3, start=True)
    Message.objects.filter(to_email="retry1@example.com").update(
        status="failed", last_smtp_code=550
    )
    response = staff_client.post(
        f"/dashboard/campaigns/{campaign.id}/retry", {"confirmed": "yes"}, follow=True
    )
    assert b"1 failed message(s) of \xe2\x80\x9cRetry\xe2\x80\x9d queued again" in response.content
    assert Message.objects.get(to_email="retry1@example.com").status == "queued"


def test_a_refused_transition_is_reported_and_changes_nothing(staff_client: Client) -> None:
    campaign = make_campaign("Busy", start=True)
    response = staff_client.post(f"/dashboard/campaigns/{campaign.id}/resume", follow=True)
    assert b"Nothing changed: a sending campaign cannot be resumed." in response.content
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.SENDING


def test_suppressions_are_added_searched_and_removed(staff_client: Client) -> None:
    added = staff_client.post(
        "/dashboard/suppressions/add",
        {"address": "Bounce@Example.com", "reason": "hard_bounce"},
        follow=True,
    )
    assert b"bounce@example.com is suppressed (Hard Bounce)" in added.content
    services.add_suppression("other@example.org")
    found = staff_client.get("/dashboard/?q=bounce")
    assert b"bounce@example.com" in found.content
    assert b"other@example.org" not in found.content

    removed = staff_client.post(
        "/dashboard/suppressions/remove",
        {"address": "bounce@example.com", "q": "bounce", "confirmed": "yes"},
    )
    assert removed["Location"] == "/dashboard/?q=bounce#suppressions"
    assert list(Suppression.objects.values_list("address", flat=True)) == ["other@example.org"]


def test_an_invalid_address_is_not_suppressed(staff_client: Client) -> None:
    response = staff_client.post(
        "/dashboard/suppressions/add", {"address": "not an address"}, follow=True
    )
    assert b"Nothing changed:" in response.content
    assert not Suppression.objects.exists()


def test_the_suppression_list_is_paged(staff_client: Client) -> None:
    for i in range(30):
        services.add_suppression(f"user{i:02d}@example.com")
    first = staff_client.get("/dashboard/")
    assert b"user24@example.com" in first.content
    assert b"user25@example.com" not in first.content
    second = staff_client.get("/dashboard/?after=user24%40example.com")
    assert b"user25@example.com" in second.content
    assert b"user24@example.com" not in second.content
