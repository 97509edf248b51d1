"""One error shape for every API failure, and the handlers that produce it.

Every error body reads ``{"error": <stable code>, "detail": <sentence>, "errors": [...]}``
where ``errors`` names each bad field (``{"field": "to", "message": "..."}``); clients
branch on ``error``, people read ``detail``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError

from email_service.exceptions import IdempotencyConflict, InvalidEmailRequest, SenderNotAllowed


class FieldError(Schema):
    field: str
    message: str


class ErrorOut(Schema):
    error: str
    detail: str
    errors: list[FieldError] = []


class ApiError(Exception):
    """An error with a status, a stable code and optional field errors."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


class MissingScope(ApiError):
    def __init__(self, scope: str) -> None:
        super().__init__(403, "forbidden", f"this API key lacks the {scope!r} scope")


class RateLimited(ApiError):
    def __init__(self, retry_after: int, limit: int) -> None:
        super().__init__(
            429,
            "rate_limited",
            f"more than {limit} requests a minute with this key; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class TooManyFailures(ApiError):
    def __init__(self, retry_after: int, limit: int) -> None:
        super().__init__(
            429,
            "rate_limited",
            f"more than {limit} failed authentications a minute from this address; "
            f"retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class TooLarge(ApiError):
    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(413, "too_large", f"the {what} is larger than {limit} bytes")


# Errors every authenticated endpoint can return, for the OpenAPI document. 414 comes
# from gunicorn itself (a request line over 4 KiB, e.g. a long query string), with no
# JSON body: None documents the status without a body. (Typed Any for that None.)
COMMON_ERRORS: dict[int, Any] = {
    401: ErrorOut,
    403: ErrorOut,
    413: ErrorOut,
    414: None,
    422: ErrorOut,
    429: ErrorOut,
}


def _field_name(loc: list[Any] | tuple[Any, ...]) -> str:
    """``("body", "payload", "to")`` → ``to``; ``("query", "limit")`` → ``limit``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form", "file")]
    if parts and parts[0] in ("payload", "data", "params", "filters"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def respond(api: NinjaAPI, request: HttpRequest, error: ApiError) -> HttpResponse:
    body = {"error": error.code, "detail": error.detail, "errors": error.errors}
    response = api.create_response(request, body, status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def install(api: NinjaAPI) -> None:
    """Register the handlers that turn every failure into the one error shape."""

    def api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
        return respond(api, request, exc)

    def invalid(request: HttpRequest, exc: InvalidEmailRequest) -> HttpResponse:
        errors = [{"field": exc.field, "message": exc.message}]
        return respond(api, request, ApiError(422, "invalid", str(exc), errors))

    def forbidden_sender(request: HttpRequest, exc: SenderNotAllowed) -> HttpResponse:
        errors = [{"field": exc.field, "message": exc.message}]
        return respond(api, request, ApiError(403, "sender_not_allowed", str(exc), errors))

    def validation(request: HttpRequest, exc: ValidationError) -> HttpResponse:
        errors = [
            {"field": _field_name(e.get("loc", ())), "message": str(e.get("msg", "is invalid"))}
            for e in exc.errors
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return respond(api, request, ApiError(422, "invalid", detail, errors))

    def unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
        error = ApiError(
            401,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="mailroom"'},
        )
        return respond(api, request, error)

    def http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "error"
        )
        return respond(api, request, ApiError(exc.status_code, code, str(exc)))

    def not_found(request: HttpRequest, exc: Http404 | ObjectDoesNotExist) -> HttpResponse:
        return respond(api, request, ApiError(404, "not_found", "no such object"))

    def conflict(request: HttpRequest, exc: IdempotencyConflict) -> HttpResponse:
        return respond(api, request, ApiError(409, "idempotency_conflict", str(exc)))

    def too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
        from django.conf import settings

        return respond(api, request, TooLarge(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))

    handlers: list[tuple[type[Exception], Any]] = [
        (ApiError, api_error),
        (InvalidEmailRequest, invalid),
        (SenderNotAllowed, forbidden_sender),
        (ValidationError, validation),
        (AuthenticationError, unauthenticated),
        (HttpError, http_error),
        (Http404, not_found),
        (ObjectDoesNotExist, not_found),
        (IdempotencyConflict, conflict),
        (RequestDataTooBig, too_big),
    ]
    for exc_type, handler in handlers:
        # django-ninja types a handler's exception as Exc | type[Exc]; ours take the instance.
        api.add_exception_handler(exc_type, handler)
