"""The HTTP API: django-ninja under ``/api/v1``, OpenAPI at ``/api/openapi.json``.

Every operation calls ``email_service.services``; nothing here decides what happens to a
message. Each router declares the scope its keys need (``send``, ``campaigns``,
``admin``; ``admin`` implies the others).
"""

from __future__ import annotations

from ninja import NinjaAPI

from email_service.api import errors
from email_service.api.admin import router as admin_router
from email_service.api.campaigns import router as campaigns_router
from email_service.api.messages import router as messages_router

api = NinjaAPI(
    title="Mailroom API",
    version="1",
    description=(
        "Asynchronous email delivery. Authenticate with `Authorization: Bearer <key>` "
        "(create one with `python manage.py create_api_key NAME --scopes send`). Errors "
        'read `{"error": code, "detail": sentence, "errors": [{"field", "message"}]}`.'
    ),
    urls_namespace="api",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
errors.install(api)
api.add_router("/v1/messages", messages_router)
api.add_router("/v1/campaigns", campaigns_router)
api.add_router("/v1", admin_router)
