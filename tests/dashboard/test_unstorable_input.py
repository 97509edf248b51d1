"""Input PostgreSQL cannot store (a NUL character) is a 400 page, never a 500: in the
search and paging parameters of the page, and in every field of every control."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from email_service import services
from email_service.models import Campaign, Message, Suppression
from tests.dashboard.conftest import make_campaign

pytestmark = pytest.mark.django_db


@pytest.fixture
def client_500(staff_user: User) -> Client:
    """A signed-in staff client that gets a 500 page instead of the exception, as a
    browser does (the test client re-raises by default)."""
    client = Client(raise_request_exception=False)
    client.force_login(staff_user)
    return client


def _state() -> tuple[object, ...]:
    return (
        services.is_bulk_paused(),
        sorted(Campaign.objects.values_list("name", "status")),
        sorted(Message.objects.values_list("to_email", "status")),
        sorted(Suppression.objects.values_list("address", "reason", "detail")),
    )


@pytest.mark.parametrize(
    "query",
    ["?q=a%00b", "?after=%00", "?q=%00", "?after=a%00b&q=x", "?q=ok&after=user%00"],
)
def test_a_nul_in_the_pages_parameters_is_a_400_page(client_500: Client, query: str) -> None:
    services.add_suppression("kept@example.com")
    response = client_500.get(f"/dashboard/{query}")
    assert response.status_code == 400, response.content[:300]
    assert b"NUL" in response.content
    assert b'href="/dashboard/"' in response.content, "a way back"


def test_a_nul_on_the_data_endpoint_is_a_400(client_500: Client) -> None:
    assert client_500.get("/dashboard/data?q=%00").status_code == 400


@pytest.mark.parametrize(
    "form",
    [
        {"address": "a\x00b@example.com"},
        {"address": "nul@example.com\x00"},
        {"address": "\x00"},
        {"address": "ok@example.com", "detail": "why\x00"},
        {"address": "ok@example.com", "reason": "manual\x00"},
        {"address": "ok@example.com", "q": "a\x00b"},
    ],
)
@pytest.mark.parametrize("confirmed", ["yes", None])
def test_a_nul_in_the_suppression_forms_is_a_400_and_changes_nothing(
    client_500: Client, form: dict[str, str], confirmed: str | None
) -> None:
    services.add_suppression("kept@example.com")
    before = _state()
    fields = form | ({"confirmed": confirmed} if confirmed else {})
    for url in ("/dashboard/suppressions/add", "/dashboard/suppressions/remove"):
        response = client_500.post(url, fields)
        assert response.status_code == 400, (url, response.content[:300])
        assert b"Nothing changed" in response.content
        assert b"NUL" in response.content
    assert _state() == before


def test_a_nul_in_a_campaign_controls_form_is_a_400_and_changes_nothing(
    client_500: Client,
) -> None:
    campaign = make_campaign("Sending", start=True)
    before = _state()
    base = f"/dashboard/campaigns/{campaign.id}"
    for url in ("/dashboard/bulk/pause", f"{base}/pause", f"{base}/cancel", f"{base}/retry"):
        response = client_500.post(url, {"confirmed": "yes", "q": "\x00"})
        assert response.status_code == 400, url
    assert _state() == before


def test_the_same_forms_without_a_nul_still_work(staff_client: Client) -> None:
    added = staff_client.post(
        "/dashboard/suppressions/add", {"address": "Ann@Example.com", "detail": "asked"}
    )
    assert added.status_code == 302
    assert Suppression.objects.get().address == "ann@example.com"
    assert staff_client.get("/dashboard/?q=ann&after=a").status_code == 200
    removed = staff_client.post(
        "/dashboard/suppressions/remove", {"address": "ann@example.com", "confirmed": "yes"}
    )
    assert removed.status_code == 302
    assert not Suppression.objects.exists()


def test_a_nul_in_the_sign_in_form_is_the_form_again(db: None) -> None:
    client = Client(raise_request_exception=False)
    response = client.post("/login/?next=/dashboard/%00", {"username": "a\x00", "password": "x"})
    assert response.status_code == 200
    assert b"Null characters are not allowed" in response.content


@pytest.mark.parametrize(
    "url",
    [
        "/admin/email_service/suppression/?reason=%00",
        "/admin/email_service/message/?status__exact=%00",
        "/admin/email_service/campaign/?status__exact=a%00b",
    ],
)
def test_a_nul_in_an_admin_list_filter_is_a_400_not_a_500(staff_user: User, url: str) -> None:
    staff_user.is_superuser = True
    staff_user.save()
    client = Client(raise_request_exception=False)
    client.force_login(staff_user)

    response = client.get(url)

    assert response.status_code == 400
    assert b"NUL" in response.content
    assert client.get(url.replace("%00", "")).status_code in (200, 302)
