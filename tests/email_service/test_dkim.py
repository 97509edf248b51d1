"""DKIM: messages built like Mailroom's are signed, verify, and break when tampered with."""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dkim
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from dkim.util import parse_tag_value

from email_service import dkim_signing
from email_service.rendering import PreparedMessage, render
from email_service.unsubscribe import list_unsubscribe_headers

DOMAIN = "mailroom.example.com"
SELECTOR = "mail2024"
FROM = "Mailroom <noreply@mailroom.example.com>"
TO = "ann@example.com"


@dataclass(frozen=True)
class KeyPair:
    pem: str
    txt_record: bytes


def _openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


def _key_pair(path: Path, *genrsa_args: str) -> KeyPair:
    _openssl("genrsa", *genrsa_args, "-out", str(path), "2048")
    der = _openssl("rsa", "-in", str(path), "-pubout", "-outform", "DER")
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return KeyPair(pem=path.read_text(), txt_record=record)


@pytest.fixture(scope="session")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A 2048-bit key in PKCS#8 form (what OpenSSL 3 writes by default)."""
    return _key_pair(tmp_path_factory.mktemp("dkim") / "key.pem")


@pytest.fixture(scope="session")
def pkcs1_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return _key_pair(tmp_path_factory.mktemp("dkim") / "rsa.pem", "-traditional")


@pytest.fixture(autouse=True)
def _fresh_key_cache() -> Iterator[None]:
    dkim_signing._load.cache_clear()
    yield
    dkim_signing._load.cache_clear()


def _settings(pem: str) -> override_settings:
    return override_settings(
        MAILROOM_DKIM_DOMAIN=DOMAIN, MAILROOM_DKIM_SELECTOR=SELECTOR, MAILROOM_DKIM_PRIVATE_KEY=pem
    )


@pytest.fixture
def signing_on(rsa_key: KeyPair) -> Iterator[KeyPair]:
    with _settings(rsa_key.pem):
        yield rsa_key


def _dns(key: KeyPair) -> Callable[..., bytes]:
    def lookup(name: bytes, timeout: float = 5) -> bytes:
        assert name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
        return key.txt_record

    return lookup


def _message(subject: str = "Your weekly news", *, bulk: bool = True) -> bytes:
    """Bytes exactly as Mailroom builds them for one recipient."""
    prepared = PreparedMessage(FROM, render("welcome", subject, {"name": "Ann"}))
    headers = list_unsubscribe_headers(TO) if bulk else ()
    return prepared.for_recipient(TO, f"<abc123@{DOMAIN}>", extra_headers=headers)


def _signature(signed: bytes, message: bytes) -> bytes:
    assert signed.endswith(message)
    return signed[: len(signed) - len(message)]


def _tags(signature: bytes) -> dict[bytes, bytes]:
    name, _, value = signature.partition(b":")
    assert name == b"DKIM-Signature"
    return dict(parse_tag_value(value))


@pytest.mark.parametrize("subject", ["Your weekly news", "Café news — naïve résumé " * 4])
def test_a_signed_message_verifies(signing_on: KeyPair, subject: str) -> None:
    message = _message(subject)
    signed = dkim_signing.sign(message)
    signature = _signature(signed, message)
    assert signature.startswith(b"DKIM-Signature: ")
    assert signature.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n", signature) is None  # CRLF only, as the message
    assert dkim.verify(signed, dnsfunc=_dns(signing_on)) is True


def test_tags_and_signed_headers(signing_on: KeyPair) -> None:
    message = _message()
    tags = _tags(_signature(dkim_signing.sign(message), message))
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert (tags[b"d"], tags[b"s"]) == (DOMAIN.encode(), SELECTOR.encode())
    signed = [h.strip() for h in tags[b"h"].split(b":")]
    assert signed == [
        b"from",
        b"to",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"from",
    ]


def test_only_present_headers_are_listed(signing_on: KeyPair) -> None:
    message = _message(bulk=False)
    signed = dkim_signing.sign(message)
    h = _tags(_signature(signed, message))[b"h"]
    assert b"list-unsubscribe" not in h
    assert dkim.verify(signed, dnsfunc=_dns(signing_on)) is True


def _tamper_subject(signed: bytes) -> bytes:
    return signed.replace(b"Subject: Your weekly news", b"Subject: Your weekly newt", 1)


def _tamper_unsubscribe(signed: bytes) -> bytes:
    return signed.replace(b"List-Unsubscribe: <http", b"List-Unsubscribe: <evil+http", 1)


def _tamper_body(signed: bytes) -> bytes:
    return signed.replace(b"Welcome, Ann!", b"Welcome, Eve!", 1)


def _add_from(signed: bytes) -> bytes:
    signature_end = signed.index(b"\r\nTo: ") + 2
    return signed[:signature_end] + b"From: evil@example.net\r\n" + signed[signature_end:]


@pytest.mark.parametrize("tamper", [_tamper_subject, _tamper_unsubscribe, _tamper_body, _add_from])
def test_tampering_breaks_the_signature(
    signing_on: KeyPair, tamper: Callable[[bytes], bytes]
) -> None:
    signed = dkim_signing.sign(_message())
    tampered = tamper(signed)
    assert tampered != signed
    assert dkim.verify(tampered, dnsfunc=_dns(signing_on)) is False


def test_relaxed_canonicalisation_survives_whitespace_changes(signing_on: KeyPair) -> None:
    signed = dkim_signing.sign(_message())
    rewrapped = signed.replace(b"Subject: Your weekly news", b"Subject:   Your  weekly news", 1)
    assert dkim.verify(rewrapped, dnsfunc=_dns(signing_on)) is True


@override_settings(MAILROOM_DKIM_DOMAIN="", MAILROOM_DKIM_SELECTOR="", MAILROOM_DKIM_PRIVATE_KEY="")
def test_unconfigured_leaves_the_message_unchanged() -> None:
    message = _message()
    assert dkim_signing.is_configured() is False
    assert dkim_signing.sign(message) == message


@pytest.mark.parametrize(
    "pem_form",
    [
        lambda pem: pem,
        lambda pem: pem.replace("\n", "\r\n"),
        lambda pem: pem.strip().replace("\n", "\\n"),  # a PEM squeezed into one env line
    ],
)
def test_key_forms(rsa_key: KeyPair, pem_form: Callable[[str], str]) -> None:
    with _settings(pem_form(rsa_key.pem)):
        assert dkim_signing.is_configured() is True
        signed = dkim_signing.sign(_message())
    assert dkim.verify(signed, dnsfunc=_dns(rsa_key)) is True


def test_pkcs1_key(pkcs1_key: KeyPair) -> None:
    assert "BEGIN RSA PRIVATE KEY" in pkcs1_key.pem
    with _settings(pkcs1_key.pem):
        signed = dkim_signing.sign(_message())
    assert dkim.verify(signed, dnsfunc=_dns(pkcs1_key)) is True


def test_the_key_is_checked_once_per_process(signing_on: KeyPair) -> None:
    with mock.patch.object(
        dkim_signing, "parse_pem_private_key", wraps=dkim_signing.parse_pem_private_key
    ) as parse:
        dkim_signing.sign(_message())
        dkim_signing.sign(_message())
        assert dkim_signing.is_configured()
    assert parse.call_count == 1


def _bad_keys(tmp: Path, good: str) -> list[str]:
    _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(tmp / "ec.pem"))
    _openssl("genrsa", "-out", str(tmp / "small.pem"), "512")
    lines = good.strip().splitlines()
    return [
        "not a key",
        (tmp / "ec.pem").read_text(),
        "\n".join([*lines[:5], lines[-1]]),  # truncated
        good.replace("M", "*"),
        (tmp / "small.pem").read_text(),
    ]


def test_a_bad_key_is_named_at_first_use(rsa_key: KeyPair, tmp_path: Path) -> None:
    body_line = rsa_key.pem.splitlines()[3]
    for bad in _bad_keys(tmp_path, rsa_key.pem):
        with _settings(bad), pytest.raises(ImproperlyConfigured) as info:
            dkim_signing.sign(_message())
        assert "MAILROOM_DKIM_PRIVATE_KEY" in str(info.value)
        assert body_line not in str(info.value)


@pytest.mark.parametrize(
    ("domain", "selector", "key", "named"),
    [
        (DOMAIN, "", "k", "MAILROOM_DKIM_SELECTOR"),
        ("", SELECTOR, "k", "MAILROOM_DKIM_DOMAIN"),
        (DOMAIN, SELECTOR, "", "MAILROOM_DKIM_PRIVATE_KEY"),
        ("mail room.example.com", SELECTOR, None, "MAILROOM_DKIM_DOMAIN"),
        (DOMAIN, "s1; x=1", None, "MAILROOM_DKIM_SELECTOR"),
        (f"{DOMAIN}\n", SELECTOR, None, "MAILROOM_DKIM_DOMAIN"),
    ],
)
def test_incomplete_or_invalid_settings(
    rsa_key: KeyPair, domain: str, selector: str, key: str | None, named: str
) -> None:
    with (
        override_settings(
            MAILROOM_DKIM_DOMAIN=domain,
            MAILROOM_DKIM_SELECTOR=selector,
            MAILROOM_DKIM_PRIVATE_KEY=rsa_key.pem if key is None else key,
        ),
        pytest.raises(ImproperlyConfigured, match=named),
    ):
        dkim_signing.is_configured()
