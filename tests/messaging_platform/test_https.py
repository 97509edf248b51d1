"""The HTTPS settings at work, as k8s/overlays/prod turns them on: http is redirected
to https except for the probes and the scrape, which reach the pod over plain http;
behind the proxy, X-Forwarded-Proto says a request came over https."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db

# What the Ingress adds to a request that came over https.
PROXY = {"X-Forwarded-Proto": "https"}


@pytest.fixture
def https_on(settings: Any) -> None:
    # Read by SecurityMiddleware when a Client loads the middleware (its first request).
    settings.SECURE_SSL_REDIRECT = True
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")


@pytest.mark.usefixtures("https_on")
def test_the_probes_and_the_scrape_answer_plain_http() -> None:
    client = Client(HTTP_HOST="localhost")  # as the kubelet and healthcheck.py send it
    for path in ("/healthz", "/readyz", "/metrics"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
        assert "Strict-Transport-Security" not in response, "HSTS is for https only"


@pytest.mark.usefixtures("https_on")
def test_everything_else_over_http_is_redirected_to_https() -> None:
    client = Client()
    for path in ("/dashboard/", "/login/", "/api/v1/templates", "/admin/", "/healthz/x"):
        response = client.get(path)
        assert response.status_code == 301, path
        assert response["Location"] == f"https://testserver{path}"


@pytest.mark.usefixtures("https_on")
def test_behind_the_proxy_https_is_served_with_hsts_and_secure_cookies() -> None:
    User.objects.create_user("operator", password="pw-for-tests", is_staff=True)
    client = Client(headers=PROXY)
    page = client.get("/login/")
    assert page.status_code == 200
    assert page["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    assert page["X-Content-Type-Options"] == "nosniff"
    assert page.cookies["csrftoken"]["secure"] is True
    signed_in = client.post("/login/", {"username": "operator", "password": "pw-for-tests"})
    assert signed_in.status_code == 302
    assert signed_in.cookies["sessionid"]["secure"] is True


def test_by_default_plain_http_works_as_before() -> None:
    """What `make dev`, the tests and `docker compose up` rely on."""
    client = Client()
    page = client.get("/login/")
    assert page.status_code == 200
    assert "Strict-Transport-Security" not in page
    assert page.cookies["csrftoken"]["secure"] == ""
