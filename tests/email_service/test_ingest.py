"""Recipients ingestion: CSV streams and lists, bad lines, strict mode, dedupe, suppression."""

from __future__ import annotations

import io
import re
import string
from collections import Counter
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from email_service import ingest
from email_service.exceptions import InvalidEmailRequest
from email_service.ingest import IngestError, RowError, ingest_csv, ingest_rows
from email_service.models import Campaign, CampaignCount, Message, Suppression
from email_service.rendering import message_id_header
from email_service.validation import fast_normalize, validator_normalize

pytestmark = pytest.mark.django_db

MESSAGE_ID = re.compile(r"^<[0-9a-f]{32}@mailroom\.example\.com>$")


@pytest.fixture
def campaign() -> Campaign:
    return Campaign.objects.create(
        name="Spring",
        subject="Hello {{ first_name }}",
        template="newsletter",
        from_email="News <news@mailroom.example.com>",
    )


def _csv(*lines: str) -> io.BytesIO:
    return io.BytesIO("\n".join(lines).encode())


def _stored(campaign: Campaign) -> dict[str, Message]:
    return {m.to_email: m for m in Message.objects.filter(campaign=campaign)}


def _assert_counts_match(campaign: Campaign) -> None:
    """The trigger-kept CampaignCount agrees with the messages, status by status."""
    counted: Counter[str] = Counter()
    for status, count in CampaignCount.objects.filter(campaign=campaign).values_list(
        "status", "count"
    ):
        counted[status] += count
    actual = Counter(Message.objects.filter(campaign=campaign).values_list("status", flat=True))
    assert +counted == actual


def _errors(report: ingest.IngestReport) -> list[tuple[int, str]]:
    return [(e.line, e.reason) for e in report.errors]


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def test_a_20000_row_csv_gives_every_recipient_their_own_context(campaign: Campaign) -> None:
    lines = ["Email, First Name ,city"]
    lines += [f"user{i}@Example.COM,Name {i},City {i % 7}" for i in range(20_000)]

    report = ingest_csv(campaign, _csv(*lines))

    assert report == ingest.IngestReport(accepted=20_000, stored=True)
    messages = _stored(campaign)
    assert len(messages) == 20_000
    for i in (0, 1, 9_999, 10_000, 19_999):
        message = messages[f"user{i}@example.com"]
        assert message.context == {"First Name": f"Name {i}", "city": f"City {i % 7}"}
    message = messages["user0@example.com"]
    assert (message.queue, message.status, message.status_reason) == ("bulk", "queued", "")
    assert (message.from_email, message.subject) == (campaign.from_email, campaign.subject)
    assert message.template == "newsletter"
    assert (message.attempts, message.dispatch_token, message.dispatched_at) == (0, "", None)
    assert (message.idempotency_key, message.last_smtp_reply) == (None, "")
    assert message.created_at == message.updated_at
    assert MESSAGE_ID.match(message.message_id_header)
    assert message.message_id_header == f"<{message.id.hex}@mailroom.example.com>"
    _assert_counts_match(campaign)


def test_duplicates_collapse_to_the_first_occurrence_across_chunks(
    campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 3)
    report = ingest_csv(
        campaign,
        _csv(
            "email,n",
            "ann@example.com,1",
            "bob@example.com,2",
            "ANN@EXAMPLE.COM,3",
            "carl@example.com,4",
            "Bob@Example.com,5",
            "  ann@example.com ,6",
        ),
    )

    assert (report.accepted, report.duplicates, report.invalid) == (3, 3, 0)
    messages = _stored(campaign)
    assert sorted(messages) == ["ann@example.com", "bob@example.com", "carl@example.com"]
    assert messages["ann@example.com"].context == {"n": "1"}
    assert messages["bob@example.com"].context == {"n": "2"}
    _assert_counts_match(campaign)


def test_suppressed_addresses_are_stored_as_suppressed(campaign: Campaign) -> None:
    Suppression.objects.create(address="gone@example.com", reason="hard_bounce")
    Suppression.objects.create(address="Left@example.com".lower(), reason="unsubscribe")

    report = ingest_csv(
        campaign, _csv("email", "gone@example.com", "LEFT@Example.com", "stay@example.com")
    )

    assert (report.accepted, report.suppressed, report.duplicates) == (1, 2, 0)
    messages = _stored(campaign)
    assert messages["gone@example.com"].status == "suppressed"
    assert messages["gone@example.com"].status_reason == "suppressed"
    assert messages["LEFT@example.com"].status == "suppressed"
    assert messages["stay@example.com"].status == "queued"
    _assert_counts_match(campaign)


def test_bad_lines_are_reported_by_line_and_the_good_rows_kept(campaign: Campaign) -> None:
    data = b"\n".join(
        [
            b"email,name,city",  # 1
            b"ann@example.com,Ann,Oslo",  # 2
            b"not-an-address,Bob,Rome",  # 3
            b"carl@example.com,Carl",  # 4
            b'dora@example.com,"Dora\nDoe",Bern',  # 5-6: one record on two lines
            b"eve@example.com,Eve,Bern,extra",  # 7
            b"",  # 8: blank lines are skipped
            b"fay@example.com,F\xe9e,Paris",  # 9: Latin-1, not UTF-8
            b"gil@exampl\xe9.com,Gil,Paris",  # 10
            b"hal@example.com,H\x00al,Rome",  # 11
            b"ivy@example.com,Iv\xc3\xbf,Graz",  # 12: valid UTF-8
        ]
    )

    report = ingest_csv(campaign, io.BytesIO(data))

    assert report.stored
    assert (report.accepted, report.invalid) == (3, 6)
    errors = _errors(report)
    assert [line for line, _ in errors] == [3, 4, 7, 9, 10, 11]
    assert "'not-an-address' is not a valid email address" in errors[0][1]
    assert errors[1][1] == "expected 3 fields, got 2"
    assert errors[2][1] == "expected 3 fields, got 4"
    assert errors[3][1] == "not valid UTF-8 (column 'name')"
    assert errors[4][1] == "not valid UTF-8 (column 'email')"
    assert "NUL" in errors[5][1]
    assert str(report.errors[1]) == "line 4: expected 3 fields, got 2"
    messages = _stored(campaign)
    assert sorted(messages) == ["ann@example.com", "dora@example.com", "ivy@example.com"]
    assert messages["dora@example.com"].context == {"name": "Dora\nDoe", "city": "Bern"}
    assert messages["ivy@example.com"].context == {"name": "Ivÿ", "city": "Graz"}
    _assert_counts_match(campaign)


def test_broken_csv_quoting_is_reported_not_merged(campaign: Campaign) -> None:
    report = ingest_csv(
        campaign,
        _csv(
            "email,name",
            "ann@example.com,Ann",
            'bob@example.com,"Bob"by',
            "carl@example.com,Carl",
            'dora@example.com,"Dora',
            "eve@example.com,Eve",
        ),
    )

    assert sorted(_stored(campaign)) == ["ann@example.com", "carl@example.com"]
    assert _errors(report) == [
        (3, "not valid CSV: ',' expected after '\"'"),
        (5, "not valid CSV: unexpected end of data"),
    ]


def test_strict_mode_keeps_nothing_and_still_reports_every_bad_line(
    campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 2)
    lines = ["email,name"] + [f"u{i}@example.com,U{i}" for i in range(5)]
    lines += ["broken@,X", "u9@example.com"] + [f"v{i}@example.com,V{i}" for i in range(5)]

    report = ingest_csv(campaign, _csv(*lines), strict=True)

    assert not report.stored
    assert (report.accepted, report.duplicates, report.suppressed, report.invalid) == (0, 0, 0, 2)
    assert [e.line for e in report.errors] == [7, 8]
    assert Message.objects.count() == 0
    assert CampaignCount.objects.count() == 0


def test_strict_mode_with_clean_rows_stores_them(campaign: Campaign) -> None:
    report = ingest_csv(campaign, _csv("email", "a@example.com", "b@example.com"), strict=True)

    assert report == ingest.IngestReport(accepted=2, stored=True)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "the file is empty"),
        (b"\xef\xbb\xbf\n\n", "the file is empty"),
        (b"email,name\n", "no recipients"),
        (b"email,name\n\n\n", "no recipients"),
        (b"mail,name\na@example.com,A\n", "no 'email' column in the header; found 'mail', 'name'"),
        (b"e-mail;name\na@example.com;A\n", "found 'e-mail;name'"),
        (b"email,name,email\na,b,c\n", "2 'email' columns"),
        (b"email,name,name\na,b,c\n", "column 'name' appears twice"),
        (b"email,,city\na,b,c\n", "column 2 of the header has no name"),
        ("email,name\na@example.com,Ann\n".encode("utf-16"), "UTF-16"),
        ("email,name\n".encode("utf-16-le"), "NUL bytes"),
        (b"email,n\xe4me\na@example.com,A\n", "line 1 (the header) is not valid UTF-8"),
    ],
)
def test_an_unusable_upload_is_refused_whole(campaign: Campaign, data: bytes, words: str) -> None:
    stream = io.BytesIO(data)

    with pytest.raises(IngestError) as caught:
        ingest_csv(campaign, stream)

    assert caught.value.field == "csv"
    assert words in caught.value.message
    assert isinstance(caught.value, InvalidEmailRequest)
    assert Message.objects.count() == 0
    assert not stream.closed, "the caller's stream is left open"


def test_a_utf8_bom_and_crlf_line_ends_are_fine(campaign: Campaign) -> None:
    data = "\ufeffEMAIL,name\r\nann@example.com,Änn\r\n".encode()

    report = ingest_csv(campaign, io.BytesIO(data))

    assert report.accepted == 1
    assert _stored(campaign)["ann@example.com"].context == {"name": "Änn"}


def test_any_header_name_and_value_arrive_intact(campaign: Campaign) -> None:
    header = 'email,"we""ird, {name}",back\\slash,NULL,\\N, "sp ace" '
    row = 'ann@example.com,"a ""quoted"", value",C:\\dir\\,,\\.,'

    report = ingest_csv(campaign, _csv(header, row))

    assert report.accepted == 1
    assert _stored(campaign)["ann@example.com"].context == {
        'we"ird, {name}': 'a "quoted", value',
        "back\\slash": "C:\\dir\\",
        "NULL": "",
        "\\N": "\\.",
        '"sp ace"': "",
    }


@pytest.mark.parametrize("columns", [ingest.MAX_CONTEXT_COLUMNS + 2, 1_700, 5_000])
def test_a_header_wider_than_the_cap_is_refused_whole(campaign: Campaign, columns: int) -> None:
    # 1,600 columns and more were a staging table PostgreSQL refuses (TooManyColumns).
    header = ",".join(["email", *(f"v{i}" for i in range(columns - 1))])
    stream = _csv(header, "ann@example.com" + ",x" * (columns - 1))

    with pytest.raises(IngestError) as caught:
        ingest_csv(campaign, stream)

    assert caught.value.field == "csv"
    assert f"the header has {columns:,} columns" in caught.value.message
    assert f"at most {ingest.MAX_CONTEXT_COLUMNS} besides 'email'" in caught.value.message
    assert Message.objects.count() == 0
    assert not stream.closed


@pytest.mark.parametrize("size", [1, 40, 3_000])
def test_the_widest_header_allowed_is_stored_whatever_the_values(
    campaign: Campaign, size: int
) -> None:
    # Every value of a row in a staging column of its own: with 200 of them a row still
    # fits in a page, short values inline or long ones as TOAST pointers.
    names = [f"v{i}" for i in range(ingest.MAX_CONTEXT_COLUMNS)]
    header = ",".join([*names[:100], "email", *names[100:]])
    values = [f"{i:03d}" + "x" * size for i in range(ingest.MAX_CONTEXT_COLUMNS)]
    row = ",".join([*values[:100], "ann@example.com", *values[100:]])

    report = ingest_csv(campaign, _csv(header, row))

    assert report.accepted == 1
    assert _stored(campaign)["ann@example.com"].context == dict(zip(names, values, strict=True))


def test_ingesting_the_same_file_twice_adds_nothing(campaign: Campaign) -> None:
    lines = ["email,name"] + [f"u{i}@example.com,U{i}" for i in range(500)]

    first = ingest_csv(campaign, _csv(*lines))
    second = ingest_csv(campaign, _csv(*lines))

    assert (first.accepted, first.duplicates) == (500, 0)
    assert (second.accepted, second.duplicates, second.stored) == (0, 500, True)
    assert Message.objects.filter(campaign=campaign).count() == 500
    _assert_counts_match(campaign)


def test_the_same_address_in_another_campaign_is_not_a_duplicate(campaign: Campaign) -> None:
    other = Campaign.objects.create(name="Autumn", subject="Hi", template="newsletter")

    ingest_csv(campaign, _csv("email", "ann@example.com"))
    report = ingest_csv(other, _csv("email", "ann@example.com"))

    assert (report.accepted, report.duplicates) == (1, 0)


def test_errors_are_capped_but_all_counted(campaign: Campaign, settings: Any) -> None:
    settings.MAILROOM_INGEST_MAX_ERRORS = 5
    lines = ["email"] + [f"bad{i}" for i in range(12)] + ["ok@example.com"]

    report = ingest_csv(campaign, _csv(*lines))

    assert (report.accepted, report.invalid) == (1, 12)
    assert [e.line for e in report.errors] == [2, 3, 4, 5, 6]


def test_a_failure_midway_stores_nothing(
    campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 100)
    real_store = ingest._Writer.store
    calls = []

    def failing_store(self: ingest._Writer, chunk: ingest._Chunk) -> tuple[int, int]:
        calls.append(chunk.count)
        if len(calls) == 3:
            raise RuntimeError("the database went away")
        return real_store(self, chunk)

    monkeypatch.setattr(ingest._Writer, "store", failing_store)
    lines = ["email"] + [f"u{i}@example.com" for i in range(1000)]

    with pytest.raises(RuntimeError, match="went away"):
        ingest_csv(campaign, _csv(*lines))

    assert calls == [100, 100, 100]
    assert Message.objects.count() == 0
    assert CampaignCount.objects.count() == 0


class _BrokenStream(io.RawIOBase):
    """Serves some CSV, then fails like a dropped upload."""

    def __init__(self, head: bytes) -> None:
        self.head = io.BytesIO(head)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.head.read(len(buffer))
        if not data:
            raise OSError("connection reset while reading the upload")
        buffer[: len(data)] = data
        return len(data)


def test_a_stream_that_fails_midway_stores_nothing(
    campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 50)
    head = "\n".join(["email"] + [f"u{i}@example.com" for i in range(400)]).encode()

    with pytest.raises(OSError, match="connection reset"):
        ingest_csv(campaign, io.BufferedReader(_BrokenStream(head)))

    assert Message.objects.count() == 0


def test_a_django_upload_works_and_stays_open(campaign: Campaign) -> None:
    upload = SimpleUploadedFile("list.csv", b"email,name\nann@example.com,Ann\n")

    report = ingest_csv(campaign, upload)  # type: ignore[arg-type]

    assert report.accepted == 1
    assert not upload.closed


def test_message_ids_use_the_configured_domain(campaign: Campaign, settings: Any) -> None:
    settings.MAILROOM_MESSAGE_ID_DOMAIN = "ids.example.org"

    ingest_csv(campaign, _csv("email", "ann@example.com"))

    [message] = Message.objects.filter(campaign=campaign)
    assert message.message_id_header == f"<{message.id.hex}@ids.example.org>"


def test_the_sql_message_id_is_the_python_one(campaign: Campaign) -> None:
    """COPY ingest builds Message-IDs in SQL; every other writer in Python. One form."""
    ingest_csv(campaign, _csv("email", *(f"r{i}@example.com" for i in range(20))))

    for message in Message.objects.filter(campaign=campaign):
        assert message.message_id_header == message_id_header(message.id, campaign.from_email)


def test_a_text_stream_is_a_programming_error(campaign: Campaign) -> None:
    with pytest.raises(TypeError, match="binary mode"):
        ingest_csv(campaign, io.StringIO("email\na@example.com\n"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Lists of {email, context}
# --------------------------------------------------------------------------------------


def test_a_list_of_recipients_with_their_own_context(campaign: Campaign) -> None:
    rows: list[Any] = [
        {"email": "ann@example.com", "context": {"name": "Ann", "n": 1, "tags": ["a"]}},
        {"email": "bob@example.com"},
        {"email": "BOB@example.com", "context": {"name": "dup"}},
        {"email": "nobody"},
        {"email": "carl@example.com", "context": ["not", "a", "dict"]},
        {"email": "dora@example.com", "context": {"when": object()}},
        {"email": "eve@example.com", "context": {"x": float("nan")}},
        {"email": "fay@example.com", "context": {"x": "nul\x00"}},
        {"email": "gil@example.com", "contxt": {}},
        "hal@example.com",
        {"context": {"name": "no address"}},
        {"email": "ivy@example.com", "context": {"quote": 'say "hi", \\o/'}},
    ]

    report = ingest_rows(campaign, rows)

    assert (report.accepted, report.duplicates, report.invalid) == (3, 1, 8)
    reasons = dict(_errors(report))
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert "is not a valid email address" in reasons[4]
    assert "JSON object" in reasons[5]
    assert "JSON-serialisable" in reasons[6]
    assert "JSON-serialisable" in reasons[7]
    assert "NUL" in reasons[8]
    assert "unknown key(s) contxt" in reasons[9]
    assert "object with email and context" in reasons[10]
    assert "an email address is required" in reasons[11]
    messages = _stored(campaign)
    assert messages["ann@example.com"].context == {"name": "Ann", "n": 1, "tags": ["a"]}
    assert messages["bob@example.com"].context == {}
    assert messages["ivy@example.com"].context == {"quote": 'say "hi", \\o/'}
    _assert_counts_match(campaign)


def test_a_list_in_strict_mode_keeps_nothing(campaign: Campaign) -> None:
    report = ingest_rows(campaign, [{"email": "a@example.com"}, {"email": "b@"}], strict=True)

    assert not report.stored
    assert report.errors == [RowError(2, report.errors[0].reason)]
    assert Message.objects.count() == 0


def test_a_generator_of_recipients_is_streamed(
    campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 1000)
    rows = ({"email": f"u{i}@example.com", "context": {"i": i}} for i in range(5000))

    report = ingest_rows(campaign, rows)

    assert report.accepted == 5000
    assert _stored(campaign)["u4999@example.com"].context == {"i": 4999}


@pytest.mark.parametrize("rows", [[], "a@example.com", {"email": "a@example.com"}])
def test_no_list_or_an_empty_one_is_refused(campaign: Campaign, rows: Any) -> None:
    with pytest.raises(IngestError) as caught:
        ingest_rows(campaign, rows)

    assert caught.value.field == "recipients"
    assert Message.objects.count() == 0


# --------------------------------------------------------------------------------------
# The fast path for addresses
# --------------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
SPECIAL_LABELS = ["test", "local", "localhost", "arpa", "onion", "invalid", "xn--bcher-kva"]


def _any_case(word: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in word)).map("".join)


def _address(
    space: st.SearchStrategy[str], local: st.SearchStrategy[str], label: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    return st.builds(
        lambda before, local, labels, after: f"{before}{local}@{'.'.join(labels)}{after}",
        space,
        local,
        st.lists(label, min_size=1, max_size=5),
        space,
    )


# Mostly well-formed: the fast path's own territory, up to and past the length limits.
ATOMS = st.lists(st.text(ATEXT, min_size=1, max_size=24), min_size=1, max_size=4).map(".".join)
LDH = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
WELL_FORMED = _address(
    st.sampled_from(["", " ", "\t"]),
    st.one_of(ATOMS, st.sampled_from(sorted(CASE_INSENSITIVE_MAILBOX_NAMES)).flatmap(_any_case)),
    st.one_of(LDH, st.from_regex(r"[A-Za-z]{2,6}", fullmatch=True)),
)
# Anything near it: odd characters, special-use and Punycode labels, other spaces.
SPACE = st.sampled_from(["", " ", "\t", " \t ", "\n", "\r\n", "\x00", "\xa0", "\x0b", "\u2003"])
LOCAL = st.one_of(
    st.text(ATEXT + ".", min_size=0, max_size=70),
    st.text(ATEXT + '."(),:;<>@[\\] ', max_size=20),
    st.text(max_size=10),
)
LABEL = st.one_of(
    LDH,
    st.text(string.ascii_letters + string.digits + "-", min_size=0, max_size=66),
    st.sampled_from(SPECIAL_LABELS).flatmap(_any_case),
    st.text(string.ascii_lowercase + "--", min_size=2, max_size=8),
    st.text(max_size=5),
)
NEAR = _address(SPACE, st.one_of(ATOMS, LOCAL), LABEL)


@hypothesis_settings(max_examples=3000, deadline=None, database=None)
@given(st.one_of(WELL_FORMED, NEAR, st.text(ATEXT + ".@ ", max_size=40), st.text(max_size=40)))
def test_the_fast_path_agrees_with_email_validator(value: str) -> None:
    """Whatever the fast path accepts, email-validator accepts with the same result."""
    fast = fast_normalize(value)
    if fast is not None:
        assert validator_normalize(value) == fast


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Ann.Smith+tag@Example.COM", "Ann.Smith+tag@example.com"),
        (" ann@example.com\t", "ann@example.com"),
        ("INFO@Example.org", "info@example.org"),
        ("o'brien@sub-1.example.co.uk", "o'brien@sub-1.example.co.uk"),
        ("a@b.test", None),
        ("a@xn--bcher-kva.ch", None),
        ("a@example.123", None),
        ("a@localhost", None),
        ("jörg@example.com", None),
        ("a@example.com\n", None),
        ('"quoted"@example.com', None),
        ("Ann <ann@example.com>", None),
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 58 + ".com", None),
        (
            "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".COM",
            "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com",
        ),
    ],
)
def test_the_fast_path_takes_the_common_case_and_leaves_the_rest(
    value: str, expected: str | None
) -> None:
    assert fast_normalize(value) == expected
