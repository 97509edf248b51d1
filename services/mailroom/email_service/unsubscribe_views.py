"""The public unsubscribe page at ``/u/<token>``.

GET only shows what would happen (link scanners and prefetchers follow GETs), POST
unsubscribes. POST needs no login and no CSRF token: mail providers send the RFC 8058
one-click POST (body ``List-Unsubscribe=One-Click``) without cookies, and the signed
token is the only authority needed. Repeating a POST is harmless.
"""

from __future__ import annotations

from django.core.exceptions import SuspiciousOperation
from django.http import HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from email_service import services
from email_service import unsubscribe as unsub
from email_service.exceptions import InvalidEmailRequest

# The pages load nothing from anywhere: inline CSS, a form posting to itself.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
}


@csrf_exempt
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """GET: a confirmation page. POST: unsubscribe now (one-click or the page's button)."""
    try:
        address = unsub.read_token(token)
    except InvalidEmailRequest:
        return _page(request, "email_service/unsubscribe_invalid.html", {}, status=404)
    context = {"masked_address": unsub.mask_address(address)}
    if request.method == "POST":
        services.unsubscribe(address, source=_source(request))
        return _page(request, "email_service/unsubscribed.html", context)
    return _page(request, "email_service/unsubscribe_confirm.html", context)


def _source(request: HttpRequest) -> str:
    """The source to record: "one-click" for an RFC 8058 POST, "page" for any other."""
    try:
        one_click = request.POST.get("List-Unsubscribe") == "One-Click"
    except (MultiPartParserError, SuspiciousOperation):
        one_click = False  # any body is accepted: the token alone decides
    return "one-click" if one_click else "page"


def _page(
    request: HttpRequest, template: str, context: dict[str, str], status: int = 200
) -> HttpResponse:
    response = render(request, template, context, status=status)
    for name, value in _SECURITY_HEADERS.items():
        response[name] = value
    return response
