"""``Authorization: Bearer <key>``: who is calling, with which scopes, how often."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest
from ninja.security import HttpBearer

from email_service import apikeys
from email_service.api.errors import MissingScope, RateLimited, TooLarge, TooManyFailures
from email_service.models import ApiKey


class ApiKeyAuth(HttpBearer):
    """Authenticates the key, then checks the body size, the scope and the key's rate.

    Returning None makes django-ninja answer 401; a missing scope raises 403, too many
    requests 429 (with ``Retry-After``), a declared body over the limit 413 — all before
    the body is read. Too many failed authentications from one address answer 429 too.
    """

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope

    def __call__(self, request: HttpRequest) -> ApiKey | None:
        """``Authorization: Bearer <key>``, read here rather than by ``HttpBearer``: with
        DEBUG on, django-ninja logs a header of another scheme (``Token mr_…``, a common
        client mistake) whole, key included. Nothing of the header is ever logged."""
        header = request.headers.get(self.header)
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != self.openapi_scheme or not token.strip():
            self._failed(request)
            return None
        return self.authenticate(request, token.strip())

    def authenticate(self, request: HttpRequest, token: str) -> ApiKey | None:
        api_key = apikeys.authenticate(token)
        if api_key is None:
            self._failed(request)
            return None
        if not api_key.allows(self.scope):
            raise MissingScope(self.scope)
        decision = apikeys.check_rate(api_key)
        if not decision.allowed:
            raise RateLimited(decision.retry_after, decision.limit)
        _check_declared_size(request)
        return api_key

    def _failed(self, request: HttpRequest) -> None:
        decision = apikeys.count_failure(str(request.META.get("REMOTE_ADDR", "")))
        if not decision.allowed:
            raise TooManyFailures(decision.retry_after, decision.limit)


def _check_declared_size(request: HttpRequest) -> None:
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    is_upload = request.content_type == "multipart/form-data"
    limit = (
        settings.MAILROOM_API_MAX_UPLOAD_BYTES
        if is_upload
        else settings.MAILROOM_API_MAX_BODY_BYTES
    )
    if length > limit:
        raise TooLarge(limit, "upload" if is_upload else "request body")


def requires(scope: str) -> ApiKeyAuth:
    """``auth=requires("send")`` on a router or an operation."""
    if scope not in ApiKey.Scope.values:
        raise ValueError(f"unknown scope {scope!r}")
    return ApiKeyAuth(scope)
