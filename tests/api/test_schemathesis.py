"""Schemathesis against the API as served by gunicorn, with a valid admin key.

Every operation of the OpenAPI document gets generated requests, valid and invalid:
none may answer 5xx, every answer must match the document (status, content type,
headers, body schema), and requests that break the schema must be refused with a 4xx.

The document is built in this process (so that pytest can list one test per
operation at collection time); ``test_the_served_document_is_the_one_tested`` checks
that gunicorn serves exactly the same one. One gunicorn serves the whole module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import pytest
import requests
import schemathesis
from django.conf import settings as django_settings
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from email_service.api import api
from tests.api.conftest import serve_api
from tests.support.processes import RedisServer

pytestmark = pytest.mark.django_db(transaction=True)

# What must hold for valid and invalid requests alike: no 5xx, and answers that match
# the document. Left out: "schema-valid data is accepted" (a string that is no address
# is valid by the schema and a 422 by design) and "schema-invalid data is refused"
# (unknown query parameters are ignored, as most APIs do).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_dict(api.get_openapi_schema())


@pytest.fixture(scope="module")
def served(django_db_setup: None, redis_process: RedisServer) -> Iterator[str]:
    """gunicorn on the test database for the whole module (as ``api_server``, shared)."""
    db = django_settings.DATABASES["default"]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    with serve_api(env) as url:
        yield url


@pytest.fixture
def admin_headers(served: str, make_key: Callable[..., str]) -> dict[str, str]:
    key = make_key("admin", name="schemathesis", rate=1_000_000)
    return {"Authorization": f"Bearer {key}"}


def test_the_served_document_is_the_one_tested(served: str) -> None:
    response = requests.get(f"{served}/api/openapi.json", timeout=30)
    docs = requests.get(f"{served}/api/docs", timeout=30)

    assert response.json()["info"]["title"] == "Mailroom API"
    assert docs.status_code == 200

    # Through JSON, as served: status codes become strings.
    assert response.json() == json.loads(json.dumps(api.get_openapi_schema()))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_matches_its_document_and_never_fails(
    case: Case, served: str, admin_headers: dict[str, str]
) -> None:
    case.call_and_validate(base_url=served, headers=admin_headers, checks=CHECKS)
