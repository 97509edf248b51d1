"""Dashboard fixtures: users, signed-in clients, and the web role on a socket."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from email_service import services
from email_service.models import Campaign

PASSWORD = "correct horse battery staple"


@pytest.fixture
def staff_user(db: None) -> User:
    return User.objects.create_user("operator", "operator@example.com", PASSWORD, is_staff=True)


@pytest.fixture
def plain_user(db: None) -> User:
    return User.objects.create_user("reader", "reader@example.com", PASSWORD)


@pytest.fixture
def staff_client(staff_user: User) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


def make_campaign(name: str = "Spring", count: int = 3, start: bool = False) -> Campaign:
    """A campaign of ``count`` recipients at example.com; started when asked."""
    campaign = services.create_campaign(
        name=name, subject="Hello {{ name }}", template="newsletter"
    )
    rows = [
        {"email": f"{name.lower()}{i}@example.com", "context": {"name": f"N{i}"}}
        for i in range(count)
    ]
    services.add_recipients(campaign, rows)
    if start:
        services.start_campaign(campaign)
    return campaign


@pytest.fixture
def web_server(shared_web: str, role_env: dict[str, str], redis_server: object) -> str:
    """The session's gunicorn as deployed (two workers), against the test database."""
    return shared_web
