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
from collections.abc import Callable

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from email_service.api import api

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


@pytest.fixture
def served(shared_web: str) -> str:
    """The session's gunicorn (as ``api_server``, shared)."""
    return shared_web


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


# One pytest test per operation, with an id of its own: schemathesis' own parametrize gives
# all of them one node id, which pytest-xdist (make test runs two workers) would collapse
# into a single test.
OPERATIONS = [
    (path, method.upper())
    for path, methods in api.get_openapi_schema()["paths"].items()
    for method in methods
]


def _cases(path: str, method: str) -> st.SearchStrategy[Case]:
    """Valid and invalid requests for one operation, as schemathesis generates them."""
    operation = schema[path][method]
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_api_matches_its_document_and_never_fails(
    path: str, method: str, data: st.DataObject, served: str, admin_headers: dict[str, str]
) -> None:
    case = data.draw(_cases(path, method))
    case.call_and_validate(base_url=served, headers=admin_headers, checks=CHECKS)


# Inputs a probe found accepted (or answered with a 500) before: each must be a 4xx that
# matches the document, like every generated case.
_WIDE_CSV = (",".join(["email", *(f"c{i}" for i in range(1700))]) + "\nann@example.com\n").encode()
_MESSAGE = {"to": "ann@example.com", "subject": "Hi", "template": "welcome"}
_CAMPAIGN = {"name": "Spring", "subject": "News", "template": "newsletter"}
_BREAKERS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x85", "\u2028", "\u2029")
Seed = tuple[str, str, dict[str, object]]
_SUBJECTS: list[Seed] = [
    ("/api/v1/messages", "POST", {"body": {**_MESSAGE, "subject": f"Hi{c}Bcc: x@x.net"}})
    for c in _BREAKERS
]
SEEDED: list[Seed] = [
    *_SUBJECTS,
    (
        "/api/v1/messages",
        "POST",
        {"body": {**_MESSAGE, "from_email": '"Evil\u2028Bcc: x@example.net" <a@example.com>'}},
    ),
    ("/api/v1/messages", "POST", {"body": {**_MESSAGE, "from_email": "a@example.com, b@x.net"}}),
    ("/api/v1/messages", "POST", {"body": {**_MESSAGE, "to": "user%evil.net@example.com"}}),
    ("/api/v1/messages", "POST", {"body": {**_MESSAGE, "template": "base"}}),
    ("/api/v1/campaigns", "POST", {"body": {**_CAMPAIGN, "subject": "News\x1dBcc: x@x.net"}}),
    (
        "/api/v1/campaigns",
        "POST",
        {
            "body": {**{k: str(v) for k, v in _CAMPAIGN.items()}, "file": _WIDE_CSV},
            "media_type": "multipart/form-data",
        },
    ),
    (
        "/api/v1/templates/{name}/preview",
        "POST",
        {
            "path_parameters": {"name": "welcome"},
            "body": {"subject": "{% for a in 'abcdefghij' %}" * 7 + "x" + "{% endfor %}" * 7},
        },
    ),
]


@pytest.mark.parametrize(
    ("path", "method", "case_args"),
    SEEDED,
    ids=[f"{method} {path} #{i}" for i, (path, method, _) in enumerate(SEEDED)],
)
def test_hostile_inputs_found_by_a_probe_are_4xx_that_match_the_document(
    path: str,
    method: str,
    case_args: dict[str, object],
    served: str,
    admin_headers: dict[str, str],
) -> None:
    arguments = {"media_type": "application/json", **case_args}
    case = schema[path][method].Case(**arguments)  # type: ignore[arg-type]
    response = case.call(base_url=served, headers=admin_headers)

    case.validate_response(response, checks=CHECKS)
    assert 400 <= response.status_code < 500, response.text
