"""Request guards that apply before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from email_service.validation import nul_field


class AdminQueryGuard:
    """A query string holding a NUL character answers 400 in the Django admin.

    The admin's list filters (``?reason=%00``, ``?status__exact=%00``) hand the value to
    PostgreSQL, which cannot compare text with NUL: a 500. The dashboard checks its own
    fields with the same rule (``validation.nul_field``) and the API its own (a 422 naming
    the field); the admin's views are Django's, so the check sits here.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/admin/") and nul_field(request.GET):
            return HttpResponseBadRequest(
                "A query parameter holds a NUL character; nothing was done.",
                content_type="text/plain; charset=utf-8",
            )
        return self.get_response(request)
