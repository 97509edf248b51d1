"""Checks applied to every request before a single row is written."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from email import policy
from email.errors import MessageDefect, MessageError
from email.headerregistry import Address, Group
from typing import Any, Protocol, cast

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from email_service import template_engine
from email_service.exceptions import InvalidEmailRequest, SenderNotAllowed

_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_SUBJECT_LENGTH = 998  # RFC 5322 line limit

# The one header rule: no character that ends or breaks a header line. CR, LF and NUL,
# but also every other C0 control, DEL and the C1 controls (VT, FF, FS, GS and NEL fold
# into bare line breaks in Python's email package), and the Unicode line and paragraph
# separators. A horizontal tab is ordinary whitespace in a header (RFC 5322 WSP) and
# stays allowed.
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
HEADER_RULE = "must not contain control characters or line separators"


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
    _refuse_unsafe(value, field)
    try:
        result = validate_email(value.strip(), check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidEmailRequest(field, f"{value!r} is not a valid email address: {exc}") from None
    _refuse_routing(str(result.ascii_email), field)
    return str(result.ascii_email)


def _refuse_routing(address: str, field: str) -> None:
    """``user%relay@host`` and ``relay!user@host`` are valid RFC 5321 local parts that some
    MTAs still treat as source routes (the "percent hack", UUCP bang paths): mail that
    should stop at one mailbox is relayed on. No real mailbox needs them."""
    local = address.rpartition("@")[0]
    if "%" in local or "!" in local:
        raise InvalidEmailRequest(
            field, f"{address!r}: '%' and '!' in the local part are refused (source routing)"
        )


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
    if "%" in local or "!" in local:
        return None  # email-validator's path refuses it, naming the reason
    if local.lower() in _CASE_INSENSITIVE:
        local = local.lower()  # RFC 2142 role names, as email-validator does
    return f"{local}@{domain}"


def normalize_from(value: object, field: str = "from_email") -> str:
    """A sender may carry a display name: ``Team <team@example.com>``.

    Returns the sender as one correctly quoted mailbox (``"Bank, Inc" <a@example.com>``);
    :func:`envelope_address` gives the address to use as ``MAIL FROM``.
    """
    return parse_mailbox(value, field)[1]


def parse_mailbox(value: object, field: str) -> tuple[str, str]:
    """(the validated address, the mailbox as a header shows it) for exactly one mailbox.

    Parsed as RFC 5322 does (``email.headerregistry``), never split by hand; the name is
    re-quoted or encoded by ``Address``, so ``"x@evil.com" <a@example.com>`` stays a name
    and ``"Bank, Inc" <a@example.com>`` one mailbox.
    """
    if not isinstance(value, str):
        raise InvalidEmailRequest(field, "must be a string")
    return _parsed_mailbox(value, field)


def parse_mailboxes(value: str, field: str) -> list[tuple[str, str]]:
    """:func:`parse_mailbox` for a header that may list several (``Reply-To``)."""
    header = _address_header("Reply-To", value, field)
    if header.defects or any(group.display_name for group in header.groups):
        raise InvalidEmailRequest(field, f"{value!r} is not a list of email addresses")
    return [_formatted(m.display_name, m.addr_spec, field) for m in header.addresses]


@functools.lru_cache(maxsize=256)
def _parsed_mailbox(value: str, field: str) -> tuple[str, str]:
    """Remembered: a service sends from a handful of addresses, and parsing one costs
    about 0.25 ms. Only results are kept (an error is raised anew)."""
    header = _address_header("From", value, field)
    mailboxes = header.addresses
    if len(mailboxes) != 1 or any(group.display_name for group in header.groups):
        raise InvalidEmailRequest(
            field,
            f"{value!r} must be exactly one mailbox (quote a display name that has a comma)",
        )
    if header.defects:
        raise InvalidEmailRequest(field, f"{value!r} is not a valid email address")
    return _formatted(mailboxes[0].display_name, mailboxes[0].addr_spec, field)


class _ParsedAddresses(Protocol):
    """What ``header_factory`` returns for an address header (typeshed splits it)."""

    addresses: tuple[Address, ...]
    groups: tuple[Group, ...]
    defects: tuple[MessageDefect, ...]


def _address_header(name: str, value: str, field: str) -> _ParsedAddresses:
    check_header(value, field)
    try:
        return cast(_ParsedAddresses, policy.default.header_factory(name, value))
    except (MessageError, IndexError, ValueError):
        # The parser raises on some malformed input (IndexError on a lone '"').
        raise InvalidEmailRequest(field, f"{value!r} is not a valid email address") from None


def _formatted(name: str, addr_spec: str, field: str) -> tuple[str, str]:
    address = normalize_address(addr_spec, field)
    if not name:
        return address, address
    check_header(name, field)  # an encoded word may decode to a control character
    return address, str(Address(display_name=name, addr_spec=address))


def envelope_address(sender: str) -> str:
    """The ``MAIL FROM`` address of a sender stored by :func:`normalize_from`.

    Not a parse of the display name: the stored form ends with ``<address>`` whenever it
    has a name, and ``Address`` quotes any ``<`` inside a name, so the address is what
    follows the last ``<``. Rows stored before names were re-quoted (``x@evil.com
    <a@example.com>``) give their real address the same way.
    """
    if not sender.endswith(">"):
        return sender
    return sender[sender.rindex("<") + 1 : -1]


def sender_domain(sender: str) -> str:
    """The domain of a stored sender (for Message-IDs and the allowed-sender rule)."""
    return envelope_address(sender).rpartition("@")[2].lower()


def check_sender_allowed(sender: str, allowed: Iterable[str], field: str = "from_email") -> None:
    """Refuse a sender outside ``allowed``: entries are domains (``example.com``) or
    whole addresses (``billing@example.com``), compared without case."""
    address = envelope_address(sender).lower()
    domain = address.rpartition("@")[2]
    entries = {entry.strip().lower() for entry in allowed}
    if address in entries or domain in entries:
        return
    shown = ", ".join(sorted(entries)) or "none"
    raise SenderNotAllowed(
        field, f"{address!r} is not an allowed sender for this caller (allowed: {shown})"
    )


def nul_field(*forms: Any) -> str | None:
    """The name of the first field of ``forms`` (Django QueryDicts) whose name or a value
    holds a NUL character, or None. PostgreSQL refuses NUL in text: a query comparing with
    one fails and a row holding one is not stored."""
    for data in forms:
        for name, values in data.lists():
            if "\x00" in name or any("\x00" in value for value in values):
                return str(name).replace("\x00", "\N{REPLACEMENT CHARACTER}")
    return None


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
    _refuse_unsafe(value, field)
    if len(value) > max_length:
        raise InvalidEmailRequest(field, f"must be at most {max_length} characters")
    try:
        storable_text(value)
    except ValueError as exc:
        raise InvalidEmailRequest(field, str(exc)) from None
    return value


def _refuse_unsafe(value: str, field: str) -> None:
    found = _HEADER_UNSAFE.search(value)
    if found is not None:
        raise InvalidEmailRequest(
            field, f"{HEADER_RULE} (found U+{ord(found.group()):04X} at {found.start()})"
        )


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
    """A template that can be sent: ``emails/<name>.html`` as the email engine sees it
    (the project's other templates are out of its reach), and not a layout."""
    if not isinstance(name, str) or not _TEMPLATE_NAME.match(name) or ".." in name:
        raise InvalidEmailRequest("template", f"{name!r} is not a valid template name")
    if name in template_engine.LAYOUT_TEMPLATES:
        raise InvalidEmailRequest(
            "template", f"{name!r} is a layout that templates extend, not one that can be sent"
        )
    try:
        template_engine.get_template(f"emails/{name}.html")
    except template_engine.UnknownEmailTemplate:
        raise InvalidEmailRequest("template", f"unknown template {name!r}") from None
    except template_engine.EmailTemplateError as exc:
        raise InvalidEmailRequest("template", f"template {name!r} is broken: {exc}") from None
    return name
