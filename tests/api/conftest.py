"""The API through the real HTTP stack: gunicorn on a socket, the test database, Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from email_service import services
from mailroom_testkit.processes import Role, free_port, web


@dataclass
class ApiClient:
    """``requests`` bound to the running server, with a key by default."""

    base_url: str
    key: str | None = None

    def request(
        self, method: str, path: str, *, key: str | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        token = key if key is not None else self.key
        if token:
            headers.setdefault("Authorization", f"Bearer {token}")
        return requests.request(method, self.base_url + path, headers=headers, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


@contextlib.contextmanager
def serve_api(role_env: dict[str, str], **settings: str) -> Iterator[str]:
    """gunicorn (as deployed) on a free port, pointed at the test database, with these
    environment settings on top of the test ones; yields its base URL."""
    port = free_port()
    role: Role = web({**role_env, **settings}, port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        role.stop()


@pytest.fixture
def api_server(shared_web: str, role_env: dict[str, str], redis_server: object) -> str:
    """The session's gunicorn (as deployed), on the test database, for this test."""
    return shared_web


@pytest.fixture
def make_key(transactional_db: None) -> Callable[..., str]:
    """Create a key in the test database (visible to the server) and return it in clear."""

    def make(*scopes: str, name: str = "test", rate: int | None = None) -> str:
        _, key = services.create_api_key(name, list(scopes) or ["admin"], rate)
        return key

    return make


@pytest.fixture
def client(api_server: str, make_key: Callable[..., str]) -> ApiClient:
    """A client with an admin key."""
    return ApiClient(api_server, make_key("admin"))
