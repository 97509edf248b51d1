"""DKIM signatures (RFC 6376) for outgoing mail: rsa-sha256, relaxed/relaxed.

Signing is on when MAILROOM_DKIM_DOMAIN, MAILROOM_DKIM_SELECTOR and
MAILROOM_DKIM_PRIVATE_KEY (or MAILROOM_DKIM_PRIVATE_KEY_FILE) are all set, and off when
none is; setting only some of them is a configuration error. The key is read, checked
and cached once per process, at first use; a bad key raises ``ImproperlyConfigured``.
"""

from __future__ import annotations

import binascii
import functools
import re
from dataclasses import dataclass

import dkim
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

# Signed when present, in this order. From is signed twice ("oversigned", RFC 6376
# 5.4.2) so that a second From cannot be added without breaking the signature.
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
OVERSIGNED_HEADERS = (b"from",)
MIN_KEY_BITS = 1024  # RFC 8301: verifiers must not accept smaller RSA keys
_DNS_LABELS = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*")
_HEADER_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):")


@dataclass(frozen=True)
class _Signer:
    domain: bytes
    selector: bytes
    key_pem: bytes


def is_configured() -> bool:
    """Whether outgoing mail is signed. Checks (and caches) the key on first call."""
    return _signer() is not None


def sign(message: bytes) -> bytes:
    """``message`` (CRLF lines) with a ``DKIM-Signature:`` header prepended.

    Unchanged when DKIM is not configured. Raises ``dkim.DKIMException`` for a message
    dkimpy cannot sign (no From header, malformed header block).
    """
    signer = _signer()
    if signer is None:
        return message
    signature: bytes = dkim.sign(
        message,
        signer.selector,
        signer.domain,
        signer.key_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=b"rsa-sha256",
        include_headers=signed_headers(message),
        linesep=b"\r\n",
    )
    return signature.rstrip(b"\r\n") + b"\r\n" + message


def signed_headers(message: bytes) -> list[bytes]:
    """The names (lower case) to list in h=: those of SIGNED_HEADERS the message has."""
    present = _header_names(message)
    names = [name for name in SIGNED_HEADERS if name in present]
    return names + [name for name in OVERSIGNED_HEADERS if name in present]


def _header_names(message: bytes) -> set[bytes]:
    head = re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]
    names = set()
    for line in re.split(rb"\r?\n", head):
        match = _HEADER_NAME.match(line)
        if match:
            names.add(match.group(1).lower())
    return names


def _signer() -> _Signer | None:
    domain = settings.MAILROOM_DKIM_DOMAIN
    selector = settings.MAILROOM_DKIM_SELECTOR
    key = settings.MAILROOM_DKIM_PRIVATE_KEY
    if not (domain or selector or key):
        return None
    missing = [
        name
        for name, value in (
            ("MAILROOM_DKIM_DOMAIN", domain),
            ("MAILROOM_DKIM_SELECTOR", selector),
            ("MAILROOM_DKIM_PRIVATE_KEY", key),
        )
        if not value
    ]
    if missing:
        raise ImproperlyConfigured(
            f"DKIM needs all three settings; {', '.join(missing)} is not set"
        )
    return _load(domain, selector, key)


@functools.lru_cache(maxsize=4)
def _load(domain: str, selector: str, key: str) -> _Signer:
    """Check the settings and the key once; keyed by value, so a change is seen."""
    for name, value in (("MAILROOM_DKIM_DOMAIN", domain), ("MAILROOM_DKIM_SELECTOR", selector)):
        if not _DNS_LABELS.fullmatch(value):
            raise ImproperlyConfigured(f"{name} must be a DNS name (ASCII labels), got {value!r}")
    pem = _pem_bytes(key)
    _check_key(pem)
    return _Signer(domain=domain.encode("ascii"), selector=selector.encode("ascii"), key_pem=pem)


def _pem_bytes(key: str) -> bytes:
    """The PEM as dkimpy reads it: LF line ends, real newlines (not ``\\n`` escapes)."""
    text = key.strip().replace("\\n", "\n").replace("\r\n", "\n")
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise ImproperlyConfigured("MAILROOM_DKIM_PRIVATE_KEY must be an ASCII PEM") from None


def _check_key(pem: bytes) -> None:
    try:
        parsed = parse_pem_private_key(pem)
    except (UnparsableKeyError, binascii.Error, ValueError, IndexError, TypeError):
        # The parser's message could quote key material: it is not repeated here.
        raise ImproperlyConfigured(
            "MAILROOM_DKIM_PRIVATE_KEY is not an unencrypted RSA private key in PEM form "
            "(PKCS#1 'BEGIN RSA PRIVATE KEY' or PKCS#8 'BEGIN PRIVATE KEY')"
        ) from None
    bits = int(parsed["modulus"]).bit_length()
    if bits < MIN_KEY_BITS:
        raise ImproperlyConfigured(
            f"MAILROOM_DKIM_PRIVATE_KEY is a {bits}-bit RSA key; at least {MIN_KEY_BITS} "
            "bits are needed (2048 recommended)"
        )
