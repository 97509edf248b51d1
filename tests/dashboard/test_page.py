"""The page itself: links from settings, assets served by Mailroom, labelled controls."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from django.test import Client

from tests.dashboard.conftest import make_campaign
from tests.messaging_platform.test_settings import APP_DIR, BASE_ENV

pytestmark = pytest.mark.django_db


def test_links_to_the_other_uis_come_from_settings_and_unset_ones_are_hidden(
    staff_client: Client, settings
) -> None:
    settings.MAILROOM_FLOWER_URL = "http://flower.internal:5555"
    settings.MAILROOM_GRAFANA_URL = ""
    settings.MAILROOM_MAILPIT_URL = "https://mailpit.example.com"
    html = staff_client.get("/dashboard/").content.decode()
    assert '<a href="http://flower.internal:5555"' in html
    assert '<a href="https://mailpit.example.com"' in html
    assert "Grafana" not in html
    assert '<a href="/api/docs">API docs</a>' in html


def test_a_link_that_is_not_an_http_url_stops_the_start() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=APP_DIR,
        env=BASE_ENV | {"MAILROOM_GRAFANA_URL": "grafana:3000"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "MAILROOM_GRAFANA_URL must be an http(s) URL or empty" in done.stderr


def test_every_asset_is_served_by_mailroom(staff_client: Client) -> None:
    html = staff_client.get("/dashboard/").content.decode()
    assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert assets
    for url in assets:
        assert url.startswith("/"), f"not served by Mailroom: {url}"
    for path in ("/static/dashboard/dashboard.css", "/static/dashboard/dashboard.js"):
        assert path in assets
        response = staff_client.get(path)
        assert response.status_code == 200, path
        body = b"".join(response.streaming_content)  # type: ignore[attr-defined]
        assert not re.search(rb"https?://", body), path


def test_every_form_field_has_a_label_and_every_post_a_csrf_token(staff_client: Client) -> None:
    make_campaign("Labelled", start=True)
    html = staff_client.get("/dashboard/").content.decode()
    ids = re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', html)
    assert ids
    for field_id in ids:
        assert f'<label for="{field_id}"' in html, field_id
    forms = re.findall(r'<form[^>]*method="post".*?</form>', html, flags=re.S)
    assert len(forms) >= 4
    for form in forms:
        assert 'name="csrfmiddlewaretoken"' in form


def test_the_page_polls_the_data_endpoint_at_the_configured_interval(
    staff_client: Client, settings
) -> None:
    settings.MAILROOM_DASHBOARD_POLL_SECONDS = 5
    html = staff_client.get("/dashboard/").content.decode()
    assert 'data-live-url="/dashboard/data" data-poll-ms="5000"' in html
