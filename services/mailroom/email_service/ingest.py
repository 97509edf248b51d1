"""Recipients ingestion for campaigns: a CSV stream or a list of ``{email, context}``.

The input is read as a stream and handled in chunks of ``CHUNK_ROWS`` rows, so a file
of a million rows costs the memory of a few chunks. Each chunk is validated in Python,
written with ``COPY`` into a temporary staging table, and moved into the outbox with
one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` that

- collapses duplicates through ``msg_campaign_address_unique`` (campaign, lower(address)):
  addresses already in the campaign, and repeats within the upload (the first one wins);
- marks addresses on the suppression list ``suppressed``, so they are never sent to.

The whole ingest is one transaction: an error stores nothing, and so does strict mode
when any row is invalid (the report then says why, with ``stored=False``). Ingests
into one campaign are serialised by an advisory lock. Nothing is enqueued: the
campaign dispatcher hands the new ``queued`` rows to workers.

Addresses go through ``validation.fast_normalize`` (the common ASCII form) and through
``validation.validator_normalize`` (email-validator) for everything else.

A CSV has at most ``MAX_CONTEXT_COLUMNS`` columns besides ``email``: each one is a column of
the staging table (PostgreSQL allows 1,600 a table, and fewer still once every value of a
row needs its own TOAST pointer) and a variable of every recipient's context. A wider
header refuses the upload before any SQL.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from psycopg import sql

from email_service.exceptions import InvalidEmailRequest
from email_service.models import Campaign, Message, Queue, Suppression
from email_service.rendering import MESSAGE_ID_SQL, message_id_domain
from email_service.validation import check_context, fast_normalize, validator_normalize

CHUNK_ROWS = 10_000
MESSAGE = Message._meta.db_table
SUPPRESSION = Suppression._meta.db_table
EMAIL_COLUMN = "email"
# Template variables a CSV may give each recipient (its columns besides ``email``).
MAX_CONTEXT_COLUMNS = 200
ROW_KEYS = frozenset({"email", "context"})
LOCK_CLASS = 0x6D72_6967  # "mrig": the advisory-lock namespace of ingests (per campaign)

# NUL cannot be stored in a text column; lone surrogates are the bytes of a line that
# is not valid UTF-8 (decoded with "surrogateescape") or broken Python strings.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class IngestError(InvalidEmailRequest):
    """The whole upload is unusable (empty, no ``email`` column, not UTF-8...)."""


class IngestTimeLimit(IngestError):
    """The ingest ran past its ``time_limit``: nothing was stored."""


@dataclass
class RowError:
    """One refused row: ``line`` is the physical line in the file (the header is line 1),
    or the 1-based position in a list of recipients."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class IngestReport:
    """What an ingest did.

    ``accepted`` new messages are queued and ``suppressed`` new ones are stored as
    suppressed; ``duplicates`` rows were already in the campaign (or earlier in the
    upload); ``invalid`` rows were refused, the first MAILROOM_INGEST_MAX_ERRORS of
    them listed in ``errors``. When ``stored`` is False (strict mode with invalid rows)
    nothing was kept and the first three counts are 0.
    """

    accepted: int = 0
    duplicates: int = 0
    suppressed: int = 0
    invalid: int = 0
    errors: list[RowError] = field(default_factory=list)
    stored: bool = False


# --------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------


def _address(value: object, column: str) -> str:
    """The normalised address, or InvalidEmailRequest with a reason for the report."""
    if isinstance(value, str):
        fast = fast_normalize(value)
        if fast is not None:
            return fast
        if _BAD_UTF8.search(value):
            raise InvalidEmailRequest(column, f"not valid UTF-8 (column {column!r})")
    return validator_normalize(value, column)


# --------------------------------------------------------------------------------------
# Chunks: what the readers hand to the writer
# --------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Rows on their way to COPY: values in staging column order, the line number last.

    ``prepare`` turns them into CSV text and drops the row objects, keeping the count.
    """

    rows: list[list[Any]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    text: str = ""
    count: int = 0

    def refuse(self, line: int, reason: str) -> None:
        self.errors.append(RowError(line, reason))

    def prepare(self, names: list[str]) -> _Chunk:
        """Rows holding what Postgres cannot store (NUL, bytes that were not UTF-8)
        become errors; the rest becomes ``text``. Errors end up in line order."""
        text = _csv_text(self.rows)
        if _UNSTORABLE.search(text) is not None:
            kept = []
            for row in self.rows:
                reason = _unstorable(row, names)
                if reason:
                    self.refuse(row[-1], reason)
                else:
                    kept.append(row)
            self.rows = kept
            self.errors.sort(key=lambda error: error.line)
            text = _csv_text(kept)
        self.text, self.count, self.rows = text, len(self.rows), []
        return self


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _unstorable(row: list[Any], names: list[str]) -> str:
    for name, value in zip(names, row, strict=False):
        if not isinstance(value, str) or _UNSTORABLE.search(value) is None:
            continue
        if _BAD_UTF8.search(value):
            return f"not valid UTF-8 (column {name!r})"
        return f"contains a NUL or unpaired surrogate character (column {name!r})"
    return ""


@dataclass(frozen=True)
class _Layout:
    """The staging table's value columns and how a message's context is built from them."""

    names: list[str]  # one per staging column, for error messages
    email: int  # index of the address column
    context: sql.Composable  # SQL over the staging alias ``s``
    context_params: list[Any]


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


class _Reader:
    """A source of recipients: its staging layout, and chunks of rows."""

    layout: _Layout
    rows = 0  # data rows seen, valid or not

    def chunks(self) -> Iterator[_Chunk]:
        raise NotImplementedError

    def prepared(self) -> Iterator[_Chunk]:
        """Chunks ready for COPY."""
        names = self.layout.names
        return (chunk.prepare(names) for chunk in self.chunks())


class _CsvReader(_Reader):
    """Header checks first (whole-upload errors), then data rows chunk by chunk.

    The bytes are decoded incrementally as UTF-8 (a BOM is skipped) with
    ``surrogateescape``: a line that is not valid UTF-8 keeps its place and becomes a
    row error naming its line; a header that is not UTF-8 refuses the upload.
    """

    def __init__(self, stream: BinaryIO) -> None:
        if isinstance(stream, io.TextIOBase):
            raise TypeError("ingest_csv reads bytes: open the file in binary mode")
        self.text = io.TextIOWrapper(
            stream,
            encoding="utf-8-sig",
            errors="surrogateescape",
            newline="",
        )
        # strict: a quote left open or a stray one is an error, not a silently merged row
        self.reader = csv.reader(self.text, strict=True)
        try:
            self.layout = self._header()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give the caller's stream back open."""
        self.text.detach()

    def _header(self) -> _Layout:
        try:
            names = next(row for row in self.reader if row)
        except StopIteration:
            raise IngestError("csv", "the file is empty") from None
        except csv.Error as exc:
            raise IngestError("csv", f"line {self.reader.line_num}: not valid CSV: {exc}") from None
        _check_header_encoding(self.reader.line_num, names)
        return _csv_layout(names)

    def chunks(self) -> Iterator[_Chunk]:
        """Data rows in chunks of CHUNK_ROWS; a chunk's errors are in line order."""
        reader, width, email = self.reader, len(self.layout.names), self.layout.email
        column = self.layout.names[email]
        chunk = _Chunk()
        previous = reader.line_num
        while True:
            try:
                for fields in reader:
                    line, previous = previous + 1, reader.line_num
                    if len(fields) != width:
                        if fields:  # blank lines are skipped
                            self.rows += 1
                            chunk.refuse(line, f"expected {width} fields, got {len(fields)}")
                        continue
                    self.rows += 1
                    try:
                        fields[email] = _address(fields[email], column)
                    except InvalidEmailRequest as exc:
                        chunk.refuse(line, exc.message)
                        continue
                    row: list[Any] = fields
                    row.append(line)
                    chunk.rows.append(row)
                    if len(chunk.rows) >= CHUNK_ROWS:
                        yield chunk
                        chunk = _Chunk()
                break
            except csv.Error as exc:  # a quote left open, a field over the size limit...
                self.rows += 1
                chunk.refuse(previous + 1, f"not valid CSV: {exc}")
                previous = reader.line_num
        yield chunk


def _csv_layout(header: list[str]) -> _Layout:
    """Staging columns c0..cN follow the CSV's; the context is built from all but email."""
    names = [name.strip() for name in header]
    if len(names) > MAX_CONTEXT_COLUMNS + 1:
        raise IngestError(
            "csv",
            f"the header has {len(names):,} columns: at most {MAX_CONTEXT_COLUMNS} besides "
            f"{EMAIL_COLUMN!r} are allowed (each one becomes a template variable)",
        )
    email = _email_column(names)
    columns = [sql.SQL("s.{}").format(sql.Identifier(f"c{i}")) for i in range(len(names))]
    values = [column for i, column in enumerate(columns) if i != email]
    if not values:
        return _Layout(names, email, sql.SQL("'{}'::jsonb"), [])
    keys = [name for i, name in enumerate(names) if i != email]
    context = sql.SQL("jsonb_object(%s::text[], ARRAY[{}]::text[])")
    return _Layout(names, email, context.format(sql.SQL(", ").join(values)), [keys])


def _check_header_encoding(line: int, names: list[str]) -> None:
    header = ",".join(names)
    if header.startswith(("\udcff\udcfe", "\udcfe\udcff")):
        raise IngestError("csv", "the file is UTF-16: save it as UTF-8 (CSV UTF-8)")
    if _BAD_UTF8.search(header):
        raise IngestError("csv", f"line {line} (the header) is not valid UTF-8: save as UTF-8")
    if "\x00" in header:
        raise IngestError("csv", f"line {line} (the header) has NUL bytes: is it UTF-16?")


def _email_column(names: list[str]) -> int:
    """Index of the ``email`` column; every other column must have a unique name."""
    emails = [i for i, name in enumerate(names) if name.lower() == EMAIL_COLUMN]
    if not emails:
        found = ", ".join(repr(name[:40]) for name in names[:20])
        more = f" and {len(names) - 20} more" if len(names) > 20 else ""
        raise IngestError("csv", f"no {EMAIL_COLUMN!r} column in the header; found {found}{more}")
    if len(emails) > 1:
        raise IngestError("csv", f"the header has {len(emails)} {EMAIL_COLUMN!r} columns")
    seen: set[str] = set()
    for position, name in enumerate(names, 1):
        if not name:
            raise IngestError("csv", f"column {position} of the header has no name")
        if name in seen:
            raise IngestError("csv", f"column {name!r} appears twice in the header")
        seen.add(name)
    return emails[0]


# --------------------------------------------------------------------------------------
# Lists of {email, context}
# --------------------------------------------------------------------------------------

_ROWS_LAYOUT = _Layout(["email", "context"], 0, sql.SQL("s.c1::jsonb"), [])


class _RowsReader(_Reader):
    """``{"email": ..., "context": {...}}`` mappings; ``context`` is optional."""

    layout = _ROWS_LAYOUT

    def __init__(self, rows: Iterable[Mapping[str, object]]) -> None:
        if isinstance(rows, str | bytes | Mapping):
            raise IngestError("recipients", "must be a list of {email, context} objects")
        self.source = rows

    def chunks(self) -> Iterator[_Chunk]:
        """Recipients in chunks of CHUNK_ROWS."""
        chunk = _Chunk()
        for line, row in enumerate(self.source, 1):
            self.rows += 1
            try:
                chunk.rows.append([*_recipient(row), line])
            except InvalidEmailRequest as exc:
                chunk.refuse(line, exc.message)
            if len(chunk.rows) >= CHUNK_ROWS:
                yield chunk
                chunk = _Chunk()
        yield chunk


def _recipient(row: object) -> tuple[str, str]:
    """(address, context as JSON text), or InvalidEmailRequest."""
    if not isinstance(row, Mapping):
        raise InvalidEmailRequest("recipients", "must be an object with email and context")
    unknown = sorted(str(key) for key in row if key not in ROW_KEYS)
    if unknown:
        raise InvalidEmailRequest("recipients", f"unknown key(s) {', '.join(unknown)}")
    address = _address(row.get("email"), "email")
    try:
        context = json.dumps(check_context(row.get("context")), allow_nan=False, ensure_ascii=False)
    except InvalidEmailRequest as exc:
        raise InvalidEmailRequest("context", f"context {exc.message}") from None
    if _JSON_NUL.search(context) or _UNSTORABLE.search(context):
        raise InvalidEmailRequest("context", "context contains a NUL or unpaired surrogate")
    return address, context


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _Writer:
    """Staging table + INSERT ... SELECT, on Django's connection inside its transaction."""

    def __init__(self, campaign: Campaign, layout: _Layout) -> None:
        self.layout = layout
        self.cursor = connection.connection.cursor()
        self.staging = sql.Identifier(f"mailroom_ingest_{uuid.uuid4().hex}")
        columns = [sql.Identifier(f"c{i}") for i in range(len(layout.names))]
        # Concurrent ingests into one campaign could deadlock on each other's addresses.
        self.cursor.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [LOCK_CLASS, str(campaign.id)]
        )
        self.cursor.execute(
            sql.SQL("CREATE TEMP TABLE {} ({}, line bigint) ON COMMIT DROP").format(
                self.staging, sql.SQL(", ").join(sql.SQL("{} text").format(c) for c in columns)
            )
        )
        self.copy_sql = sql.SQL("COPY {} FROM STDIN (FORMAT csv, FORCE_NOT_NULL ({}))").format(
            self.staging, sql.SQL(", ").join(columns)
        )
        self.insert_sql = _insert_sql(self.staging, layout)
        self.params = [
            *_constants(campaign, timezone.now()),
            *layout.context_params,
            Suppression.reasons_blocking(Queue.BULK),  # the one suppression rule
        ]
        self.used = False

    def store(self, chunk: _Chunk) -> tuple[int, int]:
        """Write a prepared chunk; return (new messages, new suppressed ones)."""
        if self.used:
            self.cursor.execute(sql.SQL("TRUNCATE {}").format(self.staging))
        self.used = True
        with self.cursor.copy(self.copy_sql) as copy:
            copy.write(chunk.text)
        self.cursor.execute(self.insert_sql, self.params)
        inserted, suppressed = self.cursor.fetchone()
        return int(inserted), int(suppressed)

    def close(self) -> None:
        self.cursor.execute(sql.SQL("DROP TABLE {}").format(self.staging))
        self.cursor.close()


# The new row, column by column, for the columns the COPY path sets itself: SQL over the
# staging row ``s``, where ``%s`` is that column's parameter (``_constants``). Every other
# column of Message gets the model's own default, so the column list is the model's (as
# for the ORM writer in services.accepting) and a new field cannot be left out.
_ROW_SQL: dict[str, str] = {
    "id": "s.id",
    "queue": "{queue}",
    "campaign_id": "%s",
    "from_email": "%s",
    "to_email": "s.email",
    "subject": "%s",
    "template": "%s",
    "context": "s.context",
    "status": "CASE WHEN s.blocked THEN {suppressed} ELSE {queued} END",
    "status_reason": "CASE WHEN s.blocked THEN {suppressed} ELSE '' END",
    "message_id_header": MESSAGE_ID_SQL.replace("{id}", "s.id"),
    "created_at": "%s",
    "updated_at": "%s",
}


def _fields() -> list[Any]:
    return list(Message._meta.local_concrete_fields)


def _constants(campaign: Campaign, now: datetime | None = None) -> list[Any]:
    """The INSERT's parameters other than the context's, in their order in the SQL."""
    now = now or timezone.now()
    values = {
        "campaign_id": campaign.id,
        "from_email": campaign.from_email,
        "subject": campaign.subject,
        "template": campaign.template,
        "message_id_header": message_id_domain(campaign.from_email),
        "created_at": now,
        "updated_at": now,
    }
    return [values[f.attname] for f in _fields() if "%s" in _ROW_SQL.get(f.attname, "")]


def _column_values() -> tuple[sql.Composed, sql.Composed]:
    """(the column list, the values) of the INSERT: every concrete field of Message."""
    fields = _fields()
    constants = {
        "queue": sql.Literal(str(Queue.BULK)),
        "suppressed": sql.Literal(str(Message.Status.SUPPRESSED)),
        "queued": sql.Literal(str(Message.Status.QUEUED)),
    }
    columns = sql.SQL(", ").join(sql.Identifier(f.column) for f in fields)
    values = sql.SQL(", ").join(
        sql.SQL(_ROW_SQL[f.attname]).format(**constants)
        if f.attname in _ROW_SQL
        else sql.Literal(f.get_default())
        for f in fields
    )
    return columns, values


def _insert_sql(staging: sql.Identifier, layout: _Layout) -> sql.Composed:
    """Move the staging rows into the outbox; count what was new and what suppressed.

    The first occurrence of an address wins (ORDER BY line); later ones, and addresses
    already in the campaign, conflict on msg_campaign_address_unique and are skipped.
    """
    columns, values = _column_values()
    return sql.SQL(
        """
        WITH new AS (
            INSERT INTO {message} ({columns})
            SELECT {values}
              FROM (SELECT gen_random_uuid() AS id, s.line, {email} AS email,
                           {context} AS context,
                           EXISTS (SELECT 1 FROM {suppression} x
                                    WHERE x.address = lower({email})
                                      AND x.reason = ANY(%s)) AS blocked
                      FROM {staging} s OFFSET 0) s
             ORDER BY s.line
            ON CONFLICT (campaign_id, lower(to_email)) WHERE campaign_id IS NOT NULL
            DO NOTHING
            RETURNING status)
        SELECT count(*), count(*) FILTER (WHERE status = {suppressed}) FROM new
        """
    ).format(
        message=sql.Identifier(MESSAGE),
        columns=columns,
        values=values,
        suppressed=sql.Literal(str(Message.Status.SUPPRESSED)),
        email=sql.SQL("s.{}").format(sql.Identifier(f"c{layout.email}")),
        context=layout.context,
        suppression=sql.Identifier(SUPPRESSION),
        staging=staging,
    )


# --------------------------------------------------------------------------------------
# The entry points
# --------------------------------------------------------------------------------------


def ingest_csv(
    campaign: Campaign,
    stream: BinaryIO,
    *,
    strict: bool = False,
    time_limit: float | None = None,
) -> IngestReport:
    """Add the recipients of a CSV file (a header row with an ``email`` column; every
    other column, ``MAX_CONTEXT_COLUMNS`` at most, becomes that recipient's template
    context, as strings).

    Raises IngestError (field ``csv``) when the upload as a whole is unusable; bad rows
    are listed in the report and skipped, or, with ``strict``, nothing is stored. With
    ``time_limit`` (seconds), an ingest still running after it raises IngestTimeLimit
    and stores nothing (checked between chunks, so it may overrun by one chunk).
    """
    source = _CsvReader(stream)
    try:
        chunks = _Prefetch(source.prepared())
        return _ingest(campaign, source, chunks, strict, "csv", time_limit)
    finally:
        source.close()


def ingest_rows(
    campaign: Campaign,
    rows: Iterable[Mapping[str, object]],
    *,
    strict: bool = False,
    time_limit: float | None = None,
) -> IngestReport:
    """Add recipients from ``{"email": ..., "context": {...}}`` mappings (``line`` in
    the report is the 1-based position). See ``ingest_csv``."""
    source = _RowsReader(rows)
    # No thread here: the caller's iterable may read the database, which must happen on
    # this thread's connection and inside its transaction.
    chunks = _Inline(source.prepared())
    return _ingest(campaign, source, chunks, strict, "recipients", time_limit)


def _ingest(
    campaign: Campaign,
    source: _Reader,
    chunks: _Prefetch | _Inline,
    strict: bool,
    field_name: str,
    time_limit: float | None,
) -> IngestReport:
    """One transaction: every chunk stored, or (error, strict with bad rows) none."""
    report = IngestReport()
    started = time.monotonic()
    try:
        with transaction.atomic():
            writer = _Writer(campaign, source.layout)
            for number, chunk in enumerate(chunks):
                if number and time_limit is not None:
                    _check_time(field_name, started, time_limit, source.rows)
                _add_errors(report, chunk.errors)
                if chunk.count and not (strict and report.invalid):
                    _add_stored(report, chunk.count, *writer.store(chunk))
            if not source.rows:
                raise IngestError(field_name, "no recipients")
            writer.close()
            report.stored = not (strict and report.invalid)
            if not report.stored:
                transaction.set_rollback(True)
                report.accepted = report.duplicates = report.suppressed = 0
    finally:
        chunks.close()
    return report


def _check_time(field_name: str, started: float, time_limit: float, rows: int) -> None:
    elapsed = time.monotonic() - started
    if elapsed > time_limit:
        raise IngestTimeLimit(
            field_name,
            f"too many recipients for one request: {rows:,} rows read, not finished within "
            f"the {time_limit:g} s limit; nothing was stored. Send the list in parts (each "
            "adds to the campaign), or use the send_campaign command",
        )


def _add_errors(report: IngestReport, errors: list[RowError]) -> None:
    report.invalid += len(errors)
    room = settings.MAILROOM_INGEST_MAX_ERRORS - len(report.errors)
    report.errors.extend(errors[: max(room, 0)])


def _add_stored(report: IngestReport, rows: int, inserted: int, suppressed: int) -> None:
    report.accepted += inserted - suppressed
    report.suppressed += suppressed
    report.duplicates += rows - inserted


class _Inline:
    """Chunks prepared on demand, on the ingesting thread."""

    def __init__(self, chunks: Iterator[_Chunk]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[_Chunk]:
        return self.chunks

    def close(self) -> None:
        """Nothing runs in the background."""


class _Prefetch:
    """Prepares the next chunk in a thread while the database writes this one.

    Reading, validating and formatting a chunk is Python work; moving a chunk into the
    outbox is Postgres work: overlapped, both stay busy. At most three chunks exist at
    a time (being prepared, waiting, being written), so memory stays flat. The thread
    touches no database connection, and it stops when the ingest ends, also on error.
    """

    def __init__(self, chunks: Iterator[_Chunk]) -> None:
        self.chunks = chunks
        self.queue: queue.Queue[_Chunk | BaseException | None] = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="mailroom-ingest", daemon=True)
        self.thread.start()

    def __iter__(self) -> Iterator[_Chunk]:
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (it finishes the chunk in hand) and wait for it."""
        self.stopped.set()
        self.thread.join()

    def _produce(self) -> None:
        try:
            for chunk in self.chunks:
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the ingesting thread, raised there
            self._put(exc)

    def _put(self, item: _Chunk | BaseException | None) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False
