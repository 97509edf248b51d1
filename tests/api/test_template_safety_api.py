"""Templates and subjects are caller code: through gunicorn, the API refuses what would
run for seconds or reach the project's own templates, with a 422 naming the field."""

from __future__ import annotations

import pytest
import requests

from email_service.models import Campaign, Message
from tests.api.conftest import ApiClient

pytestmark = pytest.mark.django_db(transaction=True)

# Seven nested loops over a 10-character string: 21.5 s a preview before the limits.
NESTED = "{% for a in x %}" * 7 + "." + "{% endfor %}" * 7
# The same, carrying its string: a campaign's subject is checked with an empty context.
NESTED_ALONE = '{% with x="0123456789" %}' + NESTED + "{% endwith %}"
# What must never show in an answer: Python's words for an internal error, or what a
# project file holds (the settings, a rendered admin or login page).
INTERNAL = ("NoneType", "object has no attribute", "Traceback", "SECRET_KEY", "<html")


def _field_errors(response: requests.Response) -> dict[str, str]:
    return {e["field"]: e["message"] for e in response.json()["errors"]}


def _preview(client: ApiClient, subject: str, **context: object) -> requests.Response:
    return client.post(
        "/api/v1/templates/welcome/preview", json={"subject": subject, "context": context}
    )


def _campaign(client: ApiClient, subject: str) -> requests.Response:
    return client.post(
        "/api/v1/campaigns", json={"name": "Loops", "subject": subject, "template": "newsletter"}
    )


def test_a_preview_with_the_nested_loop_subject_is_a_422_naming_subject(
    client: ApiClient,
) -> None:
    response = _preview(client, NESTED, x="0123456789")

    assert response.status_code == 422, response.text
    errors = _field_errors(response)
    assert list(errors) == ["subject"]
    assert "template work limit exceeded (more than 20000 steps)" in errors["subject"]


def test_a_campaign_with_the_nested_loop_subject_is_a_422_naming_subject(
    client: ApiClient,
) -> None:
    response = _campaign(client, NESTED_ALONE)

    assert response.status_code == 422, response.text
    errors = _field_errors(response)
    assert list(errors) == ["subject"]
    assert "template work limit exceeded" in errors["subject"]
    assert not Campaign.objects.exists()


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        ('{% include "admin/base.html" %}', "unknown template 'admin/base.html'"),
        ('{% include "../../settings.py" %}', "unknown template '../../settings.py'"),
        ('{% include "/etc/passwd" %}', "unknown template '/etc/passwd'"),
        ('{% extends "registration/login.html" %}', "unknown template 'registration/login.html'"),
        ("{% load static %}", "Invalid block tag on line 1: 'load'"),
        ("{% debug %}", "Invalid block tag on line 1: 'debug'"),
    ],
)
def test_a_subject_cannot_reach_the_projects_templates_or_tags(
    client: ApiClient, subject: str, reason: str
) -> None:
    for response in (_preview(client, subject), _campaign(client, subject)):
        assert response.status_code == 422, response.text
        errors = _field_errors(response)
        assert list(errors) == ["subject"]
        assert reason in errors["subject"]
        assert not any(word in response.text for word in INTERNAL), response.text
    assert not Campaign.objects.exists()


def test_the_base_layout_cannot_be_sent(client: ApiClient) -> None:
    message = {"to": "ann@example.com", "subject": "Hi", "template": "base"}

    response = client.post("/api/v1/messages", json=message)

    assert response.status_code == 422, response.text
    assert "layout" in _field_errors(response)["template"]
    assert not Message.objects.exists()
