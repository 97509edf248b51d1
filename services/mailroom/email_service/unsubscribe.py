"""Unsubscribe links: signed tokens, List-Unsubscribe headers (RFC 2369/8058), the action.

A token is the recipient's normalised, lower-cased address, base64url-encoded and signed
with ``SECRET_KEY`` under a dedicated salt. Tokens never expire: a link in a mail read a
year later must still work. Rotating ``SECRET_KEY`` invalidates every link already sent
unless the old key stays in ``SECRET_KEY_FALLBACKS``.
"""

from __future__ import annotations

import binascii
import logging
import re

from django.conf import settings
from django.core import signing
from django.core.exceptions import ImproperlyConfigured

from email_service.exceptions import InvalidEmailRequest
from email_service.validation import normalize_address

logger = logging.getLogger(__name__)

SALT = "mailroom.unsubscribe"
# A token for the longest valid address (254 characters) is about 390 characters.
MAX_TOKEN_LENGTH = 500
MAX_HEADER_LINE = 998  # RFC 5322 hard limit, field name included
ONE_CLICK = ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
# What may appear inside <...> in List-Unsubscribe: printable ASCII, no space, no
# angle brackets and no comma (RFC 2369 requires those to be escaped).
_URI_SAFE = re.compile(r"[\x21-\x7e]+")
_URI_FORBIDDEN = set("<>,")


def _signer() -> signing.Signer:
    return signing.Signer(salt=SALT, algorithm="sha256")


def make_token(address: str) -> str:
    """A URL-safe signed token naming ``address`` (normalised and lower-cased)."""
    normalised = normalize_address(address, "address").lower()
    payload = signing.b64_encode(normalised.encode("ascii")).decode("ascii")
    return _signer().sign(payload)


def read_token(token: str) -> str:
    """The address a token names, or ``InvalidEmailRequest("token", ...)``."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidEmailRequest("token", "is not a valid unsubscribe token")
    try:
        payload = _signer().unsign(token)
        return signing.b64_decode(payload.encode("ascii")).decode("ascii")
    except (signing.BadSignature, binascii.Error, UnicodeError, ValueError):
        raise InvalidEmailRequest("token", "is not a valid unsubscribe token") from None


def unsubscribe_url(address: str) -> str:
    """The public page that unsubscribes ``address`` (GET shows it, POST acts)."""
    return _url(make_token(address))


def _url(token: str) -> str:
    return f"{settings.MAILROOM_PUBLIC_URL}/u/{token}"


def list_unsubscribe_headers(address: str) -> tuple[tuple[str, str], ...]:
    """``List-Unsubscribe`` and ``List-Unsubscribe-Post`` (one-click) for ``address``.

    The mailto alternative is added when MAILROOM_UNSUBSCRIBE_MAILTO is set and the line
    still fits in 998 characters; values are plain ASCII without CR or LF, never folded.
    """
    return unsubscribe_links(address)[1]


def unsubscribe_links(address: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The unsubscribe URL and the List-Unsubscribe headers, from one signed token (a
    bulk send needs both; signing once per message matters at hundreds per second)."""
    token = make_token(address)
    url = _url(token)
    _check_uri(url, "MAILROOM_PUBLIC_URL")
    value = f"<{url}>"
    mailto = settings.MAILROOM_UNSUBSCRIBE_MAILTO
    if mailto:
        uri = f"mailto:{mailto}?subject=unsubscribe%20{token}"
        _check_uri(uri, "MAILROOM_UNSUBSCRIBE_MAILTO")
        with_mailto = f"{value}, <{uri}>"
        if _line_length("List-Unsubscribe", with_mailto) <= MAX_HEADER_LINE:
            value = with_mailto
    if _line_length("List-Unsubscribe", value) > MAX_HEADER_LINE:
        raise ImproperlyConfigured("MAILROOM_PUBLIC_URL is too long for a List-Unsubscribe header")
    return url, (("List-Unsubscribe", value), ONE_CLICK)


def _line_length(name: str, value: str) -> int:
    return len(name) + 2 + len(value)


def _check_uri(uri: str, setting: str) -> None:
    if not _URI_SAFE.fullmatch(uri) or _URI_FORBIDDEN.intersection(uri):
        raise ImproperlyConfigured(
            f"{setting} must be printable ASCII without spaces, commas or angle brackets"
        )


def mask_address(address: str) -> str:
    """``j***@example.com``: enough to recognise one's own address, not to harvest it."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if local else "***"
