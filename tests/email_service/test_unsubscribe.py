"""Unsubscribe links: signed tokens, List-Unsubscribe headers, the GET page, one-click POST."""

from __future__ import annotations

import time
from unittest import mock
from urllib.parse import quote, urlparse

import pytest
from django.core import signing
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings
from django.urls import resolve

from email_service import unsubscribe
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Suppression

pytestmark = pytest.mark.django_db

ADDRESS = "Ann.Example@Example.COM"
STORED = "ann.example@example.com"
PUBLIC_URL = "https://mail.example.com"
ONE_CLICK_BODY = "List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def csrf_client() -> Client:
    """A client that enforces CSRF like a browser would: POSTs carry no token here."""
    return Client(enforce_csrf_checks=True)


@pytest.fixture
def url() -> str:
    return f"/u/{unsubscribe.make_token(ADDRESS)}"


def _tampered(token: str) -> str:
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


# --- tokens ------------------------------------------------------------------------------


def test_token_round_trip_normalises_and_is_url_safe() -> None:
    token = unsubscribe.make_token(ADDRESS)
    assert unsubscribe.read_token(token) == STORED
    assert unsubscribe.make_token(STORED) == token  # deterministic, no timestamp
    assert quote(token, safe=":") == token
    assert len(token) < 100
    assert STORED not in token  # the address is not readable in the link


def test_token_never_expires() -> None:
    token = unsubscribe.make_token(ADDRESS)
    ten_years = 10 * 365 * 24 * 3600
    with mock.patch("time.time", return_value=time.time() + ten_years):
        assert unsubscribe.read_token(token) == STORED
    assert token.count(":") == 1  # payload:signature, no timestamp part


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a" * 2000,
        "not-base64!:signature",
    ],
)
def test_bad_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidEmailRequest) as info:
        unsubscribe.read_token(token)
    assert info.value.field == "token"


def test_tampered_and_foreign_tokens_are_refused() -> None:
    token = unsubscribe.make_token(ADDRESS)
    other_payload = unsubscribe.make_token("eve@example.com").split(":")[0]
    other_salt = signing.Signer(salt="another.purpose", algorithm="sha256").sign(
        token.split(":")[0]
    )
    for bad in (_tampered(token), f"{other_payload}:{token.split(':')[1]}", other_salt):
        with pytest.raises(InvalidEmailRequest):
            unsubscribe.read_token(bad)


def test_a_token_needs_a_valid_address() -> None:
    with pytest.raises(InvalidEmailRequest):
        unsubscribe.make_token("not an address")


def test_mask_address() -> None:
    assert unsubscribe.mask_address("ann@example.com") == "a***@example.com"


# --- headers -----------------------------------------------------------------------------


@override_settings(MAILROOM_PUBLIC_URL=PUBLIC_URL, MAILROOM_UNSUBSCRIBE_MAILTO="")
def test_headers_without_mailto() -> None:
    token = unsubscribe.make_token(ADDRESS)
    assert unsubscribe.list_unsubscribe_headers(ADDRESS) == (
        ("List-Unsubscribe", f"<{PUBLIC_URL}/u/{token}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    )
    assert unsubscribe.unsubscribe_url(ADDRESS) == f"{PUBLIC_URL}/u/{token}"


@override_settings(
    MAILROOM_PUBLIC_URL=PUBLIC_URL, MAILROOM_UNSUBSCRIBE_MAILTO="unsubscribe@example.com"
)
def test_headers_with_mailto() -> None:
    token = unsubscribe.make_token(ADDRESS)
    headers = unsubscribe.list_unsubscribe_headers(ADDRESS)
    assert headers == (
        (
            "List-Unsubscribe",
            f"<{PUBLIC_URL}/u/{token}>, "
            f"<mailto:unsubscribe@example.com?subject=unsubscribe%20{token}>",
        ),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    )
    _assert_header_safe(headers)


def _assert_header_safe(headers: tuple[tuple[str, str], ...]) -> None:
    for name, value in headers:
        (name + value).encode("ascii")
        assert "\r" not in value
        assert "\n" not in value
        assert len(f"{name}: {value}") <= 998


def _longest_address() -> str:
    domain = ".".join(["b" * 63, "c" * 63, "d" * 57, "com"])
    address = f"{'a' * 64}@{domain}"
    assert len(address) == 254
    return address


@override_settings(MAILROOM_UNSUBSCRIBE_MAILTO="unsubscribe@example.com")
def test_long_lines_drop_the_mailto_and_stay_under_998() -> None:
    address = _longest_address()
    with override_settings(MAILROOM_PUBLIC_URL=PUBLIC_URL):
        headers = unsubscribe.list_unsubscribe_headers(address)
        assert "mailto:" in headers[0][1]
        _assert_header_safe(headers)
    with override_settings(MAILROOM_PUBLIC_URL=f"{PUBLIC_URL}/{'p' * 300}"):
        headers = unsubscribe.list_unsubscribe_headers(address)
        assert "mailto:" not in headers[0][1]
        _assert_header_safe(headers)
    assert unsubscribe.read_token(unsubscribe.make_token(address)) == address


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("MAILROOM_PUBLIC_URL", "https://mail.example.com/a b"),
        ("MAILROOM_PUBLIC_URL", "https://mäil.example.com"),
        ("MAILROOM_PUBLIC_URL", "https://mail.example.com/\r\nBcc: x"),
        ("MAILROOM_PUBLIC_URL", "https://mail.example.com\n"),
        ("MAILROOM_PUBLIC_URL", f"https://mail.example.com/{'p' * 900}"),
        ("MAILROOM_UNSUBSCRIBE_MAILTO", "unsubscribe@example.com>"),
    ],
)
def test_unsafe_settings_never_reach_a_header(setting: str, value: str) -> None:
    with override_settings(**{setting: value}), pytest.raises(ImproperlyConfigured, match=setting):
        unsubscribe.list_unsubscribe_headers(ADDRESS)


# --- the page ----------------------------------------------------------------------------


def test_get_shows_a_confirm_form_and_changes_nothing(csrf_client: Client, url: str) -> None:
    response = csrf_client.get(url)
    assert response.status_code == 200
    page = response.content.decode()
    assert '<form method="post" action="">' in page
    assert '<button type="submit">Unsubscribe</button>' in page
    assert 'lang="en"' in page
    assert "a***@example.com" in page
    assert STORED not in page
    for external in ("<script", "<link", "src=", "http://", "https://"):
        assert external not in page
    assert response["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response["Content-Security-Policy"]
    assert not Suppression.objects.exists()


def test_post_unsubscribes_without_csrf_token_and_is_idempotent(
    csrf_client: Client, url: str
) -> None:
    first = csrf_client.post(url)
    assert first.status_code == 200
    assert "You are unsubscribed" in first.content.decode()
    row = Suppression.objects.get()
    assert (row.address, row.reason, row.detail) == (STORED, "unsubscribe", "page")

    second = csrf_client.post(url)
    assert second.status_code == 200
    assert "You are unsubscribed" in second.content.decode()
    assert Suppression.objects.count() == 1


@pytest.mark.parametrize(
    ("kwargs", "source"),
    [
        ({"data": ONE_CLICK_BODY, "content_type": FORM}, "one-click"),
        ({"data": {"List-Unsubscribe": "One-Click"}}, "one-click"),  # multipart/form-data
        ({"data": "{}", "content_type": "application/json"}, "page"),
        ({"data": "garbage", "content_type": "multipart/form-data; boundary=x"}, "page"),
        ({"data": "\xff\xfe=\x00", "content_type": FORM}, "page"),
    ],
)
def test_rfc8058_one_click_and_any_other_body(
    csrf_client: Client, url: str, kwargs: dict[str, object], source: str
) -> None:
    response = csrf_client.post(url, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200
    assert Suppression.objects.get().detail == source


@override_settings(MAILROOM_PUBLIC_URL=PUBLIC_URL)
def test_the_header_link_is_this_view(csrf_client: Client) -> None:
    header = dict(unsubscribe.list_unsubscribe_headers(ADDRESS))["List-Unsubscribe"]
    path = urlparse(header.strip("<>")).path
    assert resolve(path).url_name == "unsubscribe"
    response = csrf_client.post(path, data=ONE_CLICK_BODY, content_type=FORM)
    assert response.status_code == 200
    assert Suppression.objects.get().address == STORED


@pytest.mark.parametrize("method", ["get", "post"])
def test_tampered_token_is_a_404_page(csrf_client: Client, url: str, method: str) -> None:
    response = getattr(csrf_client, method)(_tampered(url))
    assert response.status_code == 404
    assert "not valid" in response.content.decode()
    assert not Suppression.objects.exists()


@pytest.mark.parametrize("method", ["put", "patch", "delete", "options"])
def test_other_methods_are_refused(csrf_client: Client, url: str, method: str) -> None:
    response = getattr(csrf_client, method)(url)
    assert response.status_code == 405
    assert response["Allow"] == "GET, POST"
    assert not Suppression.objects.exists()
