"""The API is mounted, documented and refuses callers without a key."""

from __future__ import annotations

from tests.api.conftest import ApiClient


def test_openapi_is_served_and_keys_are_required(client: ApiClient) -> None:
    schema = client.get("/api/openapi.json", key="").json()
    assert schema["info"]["title"] == "Mailroom API"
    assert client.get("/api/docs", key="").status_code == 200
    response = client.get("/api/v1/stats", key="mr_nope")
    assert response.status_code in (401, 404)
