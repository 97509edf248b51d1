"""Checks applied to every request before a single row is written."""

from __future__ import annotations

import functools
import json
import re
from email.utils import parseaddr
from typing import Any

from django.template import TemplateDoesNotExist, TemplateSyntaxError
from django.template.loader import get_template
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from email_service.exceptions import InvalidEmailRequest

_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_HEADER_BREAKERS = ("\r", "\n", "\x00")
MAX_SUBJECT_LENGTH = 998  # RFC 5322 line limit


def normalize_address(value: object, field: str = "to") -> str:
    """Return the address in the form we store and send to, or raise naming ``field``.

    Policy: internationalised domains are accepted (sent as IDNA), non-ASCII local parts
    are refused because they need SMTPUTF8, which many relays do not offer. The common
    plain-ASCII form takes :func:`fast_normalize`; everything else email-validator.
    """
    if isinstance(value, str):
        fast = fast_normalize(value)
        if fast is not None:
            return fast
    return validator_normalize(value, field)


def validator_normalize(value: object, field: str = "to") -> str:
    """:func:`normalize_address` through email-validator alone (no fast path)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidEmailRequest(field, "an email address is required")
    if any(ch in value for ch in _HEADER_BREAKERS):
        raise InvalidEmailRequest(field, "must not contain CR, LF or NUL characters")
    try:
        result = validate_email(value.strip(), check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidEmailRequest(field, f"{value!r} is not a valid email address: {exc}") from None
    return str(result.ascii_email)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST_ADDRESS = re.compile(
    rf"[ \t]*({_ATOM}(?:\.{_ATOM})*)@((?:{_LABEL}\.)+{_LABEL})[ \t]*", re.ASCII
)
_SPECIAL_SUFFIXES = tuple(f".{name}" for name in SPECIAL_USE_DOMAIN_NAMES)
_CASE_INSENSITIVE = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)
_MAX_ADDRESS = 254


def fast_normalize(value: str) -> str | None:
    """:func:`validator_normalize` for plain ASCII addresses, or None to take that slow
    path (about 25 µs an address). Conservative: whatever it accepts, email-validator
    accepts with the same result (a dot-atom local part, LDH labels, a dot, a TLD ending
    in a letter; no Punycode or other ``--`` labels, no special-use domains); a property
    test holds it to that."""
    match = _FAST_ADDRESS.fullmatch(value)
    if match is None:
        return None
    local, domain = match.groups()
    if len(local) + len(domain) >= _MAX_ADDRESS or not domain[-1].isalpha() or "--" in domain:
        return None
    domain = domain.lower()
    if f".{domain}".endswith(_SPECIAL_SUFFIXES):
        return None
    if local.lower() in _CASE_INSENSITIVE:
        local = local.lower()  # RFC 2142 role names, as email-validator does
    return f"{local}@{domain}"


def normalize_from(value: object, field: str = "from_email") -> str:
    """A sender may carry a display name: ``Team <team@example.com>``."""
    if not isinstance(value, str):
        raise InvalidEmailRequest(field, "must be a string")
    return _normalized_sender(value, field)


@functools.lru_cache(maxsize=256)
def _normalized_sender(value: str, field: str) -> str:
    """Remembered: a service sends from a handful of addresses, and ``parseaddr`` alone
    cost about 0.25 ms an API request. Only results are kept (an error is raised anew)."""
    check_header(value, field)
    name, address = parseaddr(value)
    if not address:
        raise InvalidEmailRequest(field, f"{value!r} is not a valid email address")
    normalized = normalize_address(address, field)
    return f"{name} <{normalized}>" if name else normalized


def storable_text(value: str) -> str:
    """Refuse what PostgreSQL cannot store (NUL) or encode (a lone surrogate, as a JSON
    ``\\ud800`` escape gives): raises ValueError, so pydantic and callers name the field."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no unpaired surrogates)") from None
    return value


MAX_JSON_DEPTH = 32  # a template context is a few levels deep, never hundreds


def storable_json(value: object, depth: int = 0) -> object:
    """``storable_text`` for every key and string inside a JSON value, nested at most
    MAX_JSON_DEPTH levels (deeper, the JSON encoder on the way to Postgres recurses out)."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"must not nest deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        storable_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable_text(str(key))
            storable_json(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            storable_json(item, depth + 1)
    return value


def check_header(value: object, field: str, *, max_length: int = MAX_SUBJECT_LENGTH) -> str:
    if not isinstance(value, str):
        raise InvalidEmailRequest(field, "must be a string")
    if any(ch in value for ch in _HEADER_BREAKERS):
        raise InvalidEmailRequest(field, "must not contain CR, LF or NUL characters")
    if len(value) > max_length:
        raise InvalidEmailRequest(field, f"must be at most {max_length} characters")
    try:
        storable_text(value)
    except ValueError as exc:
        raise InvalidEmailRequest(field, str(exc)) from None
    return value


def check_subject(value: object) -> str:
    subject = check_header(value, "subject")
    if not subject.strip():
        raise InvalidEmailRequest("subject", "must not be empty")
    return subject


def check_context(value: object, field: str = "context") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEmailRequest(field, "must be a JSON object (a dict)")
    try:
        storable_json(value)
    except ValueError as exc:
        raise InvalidEmailRequest(field, str(exc)) from None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidEmailRequest(field, f"must be JSON-serialisable: {exc}") from None
    return value


def check_template(name: object) -> str:
    if not isinstance(name, str) or not _TEMPLATE_NAME.match(name) or ".." in name:
        raise InvalidEmailRequest("template", f"{name!r} is not a valid template name")
    try:
        get_template(f"emails/{name}.html")
    except TemplateDoesNotExist:
        raise InvalidEmailRequest("template", f"unknown template {name!r}") from None
    except TemplateSyntaxError as exc:
        raise InvalidEmailRequest("template", f"template {name!r} is broken: {exc}") from None
    return name
