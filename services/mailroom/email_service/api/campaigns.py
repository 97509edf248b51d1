"""API: campaigns — create one (JSON recipients or a CSV upload), list and inspect them,
add recipients, and start / pause / resume / cancel / retry-failed.

Every operation calls ``email_service.services``; what is here reads the request, names
the bad fields and shapes the answer. Two request bodies are read by hand rather than by
django-ninja, because one operation takes either JSON or ``multipart/form-data``: the
upload must reach the ingest as a stream (Django puts big files on disk), never be read
into memory as ``request.body``. Their schemas are declared in the OpenAPI document.

Errors: bad campaign fields and bad recipient rows in strict mode are 422 naming each one
(``recipients[3].email``, ``file:line 5``); an illegal state change is 409
``invalid_state``; an unknown or malformed id is 404.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal, TypeVar, cast

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.files.uploadedfile import UploadedFile
from django.db.models import Q
from django.http import HttpRequest
from django.http.multipartparser import MultiPartParserError
from ninja import Field, Query, Router, Schema, Status
from pydantic import AwareDatetime, BaseModel, ConfigDict, field_validator
from pydantic import ValidationError as PydanticValidationError

from email_service import ingest, services
from email_service.api.auth import requires
from email_service.api.errors import COMMON_ERRORS, ApiError, ErrorOut
from email_service.exceptions import IllegalState
from email_service.models import Campaign
from email_service.validation import storable_text

router = Router(tags=["campaigns"], auth=requires("campaigns"))

CampaignStatus = Literal["draft", "scheduled", "sending", "paused", "completed", "cancelled"]
MAX_PAGE = 100
MAX_REPORTED_EMAIL = 320


# --------------------------------------------------------------------------------------
# Request bodies (validated by hand: see the module docstring)
# --------------------------------------------------------------------------------------


def _storable(value: str | None) -> str | None:
    return None if value is None else storable_text(value)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("is out of range") from None


class RecipientIn(BaseModel):
    """One recipient: the address, and the template context for this person."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(description="The address; invalid ones are reported by row.")
    context: dict[str, Any] | None = Field(
        None, description="Template variables for this recipient (a JSON object)."
    )


class CampaignFields(BaseModel):
    """What a campaign is, with or without its recipients."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, description="A label for people; at most 200 characters are kept."
    )
    subject: str = Field(
        min_length=1,
        max_length=998,
        description="A Django template string, rendered per recipient.",
    )
    template: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="The email template, e.g. `newsletter` (see GET /api/v1/templates).",
    )
    from_email: str | None = Field(
        None, max_length=320, description="Sender, e.g. `Team <team@example.com>`."
    )
    send_at: AwareDatetime | None = Field(
        None, description="When started, wait until then (ISO 8601 with a time zone)."
    )
    expires_at: AwareDatetime | None = Field(
        None, description="Whatever is unsent by then is cancelled with reason `expired`."
    )
    strict: bool = Field(
        False,
        description="Any invalid recipient row refuses the whole request (422) and stores "
        "nothing; otherwise invalid rows are skipped and reported.",
    )
    start: bool = Field(False, description="Start the campaign once it is stored.")

    _check_text = field_validator("name", "subject", "template", "from_email")(_storable)
    _check_times = field_validator("send_at", "expires_at")(_utc)


class CampaignIn(CampaignFields):
    """``application/json``: the campaign and, optionally, its recipients."""

    recipients: list[RecipientIn] | None = Field(
        None,
        description="The recipients. Leave out to create an empty draft and add "
        "recipients later with POST /api/v1/campaigns/{id}/recipients.",
    )


class RecipientsIn(BaseModel):
    """``application/json`` body of POST /{id}/recipients."""

    model_config = ConfigDict(extra="forbid")

    recipients: list[RecipientIn]
    strict: bool = False


class RecipientsForm(BaseModel):
    """``multipart/form-data`` fields of POST /{id}/recipients (besides ``file``)."""

    model_config = ConfigDict(extra="forbid")

    strict: bool = False


class RetryIn(Schema):
    """Which failed recipients to retry: all of them, one SMTP code, or one class."""

    model_config = ConfigDict(extra="forbid")

    smtp_code: int | None = Field(None, ge=200, le=599, description="e.g. 554")
    reply_class: Literal["4xx", "5xx", "network"] | None = None


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (our models are not recursive),
    so it can sit in an operation's OpenAPI ``requestBody``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return cast(dict[str, Any], resolve(schema))


def _form_schema(model: type[BaseModel], description: str) -> dict[str, Any]:
    """A multipart form: the model's fields as form fields (not nullable: leave one out
    instead) plus the CSV ``file``."""
    schema = _inline(model)
    properties = {}
    for name, prop in schema.get("properties", {}).items():
        variants = [v for v in prop.get("anyOf", []) if v.get("type") != "null"]
        if variants:
            prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **variants[0]}
        if "default" in prop and prop["default"] is None:
            del prop["default"]
        properties[name] = prop
    properties["file"] = {"type": "string", "format": "binary", "description": description}
    return {
        "type": "object",
        "properties": properties,
        "required": [*schema.get("required", []), "file"],
    }


_CSV_HELP = (
    "A UTF-8 CSV file: a header row with an `email` column; every other column becomes "
    f"template context for that row's recipient (at most {ingest.MAX_CONTEXT_COLUMNS} "
    "columns besides `email`)."
)


def _request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inline(json_model)},
                "multipart/form-data": {"schema": _form_schema(form_model, _CSV_HELP)},
            },
        }
    }


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------


class ProgressOut(Schema):
    total: int = Field(description="Recipients stored (suppressed ones included).")
    queued: int = Field(description="Waiting for a worker (deferred retries included).")
    sending: int
    sent: int
    failed: int
    suppressed: int = Field(description="On the suppression list: never sent to.")
    cancelled: int
    remaining: int = Field(description="Not yet settled: queued, sending or deferred.")
    rate_per_second: float = Field(description="Sent per second over the last minute.")
    eta_seconds: int | None = Field(description="At the current rate; null when idle.")


class CampaignOut(Schema):
    id: uuid.UUID
    name: str
    subject: str
    template: str
    from_email: str
    status: CampaignStatus
    status_reason: str
    send_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressOut


class RowErrorOut(Schema):
    line: int = Field(
        description="The physical line in the CSV file (the header is line 1), or the "
        "1-based position in `recipients`."
    )
    index: int | None = Field(description="0-based index in `recipients`; null for a CSV.")
    field: str = Field(description="`recipients[3].email`, or `file:line 5` for a CSV.")
    email: str | None = Field(description="The address as given, when there is one.")
    reason: str


class RecipientsReportOut(Schema):
    accepted: int = Field(description="New recipients queued.")
    duplicates: int = Field(description="Rows whose address was already in the campaign.")
    suppressed: int = Field(description="New recipients on the suppression list.")
    invalid: int = Field(description="Rows refused; the first of them are in `errors`.")
    stored: bool
    errors: list[RowErrorOut]
    errors_truncated: bool = Field(description="More rows were invalid than are listed.")


class CampaignWithReportOut(CampaignOut):
    report: RecipientsReportOut | None = Field(
        description="What happened to the recipients given (null when none were)."
    )


class CancelledOut(CampaignOut):
    messages_cancelled: int = Field(description="Unsent messages this call cancelled.")


class RetriedOut(CampaignOut):
    messages_requeued: int = Field(description="Failed messages queued again.")


class CampaignPageOut(Schema):
    items: list[CampaignOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class CampaignFilters(Schema):
    status: CampaignStatus | None = None
    limit: int = Field(20, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(None, description="`next_cursor` of the previous page.")


def _errors(*statuses: int) -> dict[int, type[Schema]]:
    return {**COMMON_ERRORS, **dict.fromkeys(statuses, ErrorOut)}


# --------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------


@router.post(
    "",
    response={201: CampaignWithReportOut, **_errors(400, 415)},
    summary="Create a campaign (JSON recipients or a CSV upload), optionally start it",
    openapi_extra=_request_body(CampaignIn, CampaignFields),
)
def create_campaign(request: HttpRequest) -> Status[dict[str, Any]]:
    """All or nothing: a bad campaign field, an unusable upload or (in strict mode) any bad
    recipient row is a 422 and nothing is stored. Otherwise bad rows are skipped and listed
    in `report`. With `start`, the campaign is started once stored."""
    fields: CampaignFields
    if _is_multipart(request):
        form, upload = _read_form(request)
        fields = _validated(CampaignFields, form, form=True)
        source: _Source | None = _Source.from_upload(upload)
    else:
        body = _validated(CampaignIn, _read_json(request))
        fields = body
        source = _Source.from_rows(body.recipients) if body.recipients is not None else None

    try:
        campaign, report = services.launch_campaign(
            name=fields.name,
            subject=fields.subject,
            template=fields.template,
            from_email=fields.from_email,
            send_at=fields.send_at,
            expires_at=fields.expires_at,
            api_key=request.auth,  # type: ignore[attr-defined]
            add=(lambda c: source.add_to(c, strict=fields.strict)) if source else None,
            start=fields.start,
        )
    except services.NotLaunched as exc:
        errors = [{"field": "start", "message": exc.message}]
        errors += _field_errors(exc.report, source) if exc.report and source else []
        raise ApiError(422, "invalid", f"start: the campaign: {exc.message}", errors) from None
    return Status(201, {**_campaign_out(campaign), "report": _report_out(report, source)})


@router.get(
    "",
    response={200: CampaignPageOut, **_errors()},
    summary="List campaigns, newest first",
)
def list_campaigns(request: HttpRequest, filters: Query[CampaignFilters]) -> dict[str, Any]:
    """Cursor-paginated: follow `next_cursor` until it is null. Filter by `status`."""
    campaigns = Campaign.objects.order_by("-created_at", "-id")
    if filters.status:
        campaigns = campaigns.filter(status=filters.status)
    if filters.cursor:
        created_at, campaign_id = _decode_cursor(filters.cursor)
        campaigns = campaigns.filter(
            Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=campaign_id)
        )
    page = list(campaigns[: filters.limit + 1])
    more = len(page) > filters.limit
    page = page[: filters.limit]
    return {
        "items": [_campaign_out(campaign, fresh=False) for campaign in page],
        "next_cursor": _encode_cursor(page[-1]) if more else None,
    }


@router.get(
    "/{campaign_id}",
    response={200: CampaignOut, **_errors(404)},
    summary="A campaign with its progress: counts by status, rate and ETA",
)
def get_campaign(request: HttpRequest, campaign_id: str) -> dict[str, Any]:
    return _campaign_out(_get(campaign_id))


@router.post(
    "/{campaign_id}/recipients",
    response={200: CampaignWithReportOut, **_errors(400, 404, 409, 415)},
    summary="Add recipients (JSON or a CSV upload) to a campaign not yet finished",
    openapi_extra=_request_body(RecipientsIn, RecipientsForm),
)
def add_recipients(request: HttpRequest, campaign_id: str) -> dict[str, Any]:
    """Addresses already in the campaign are counted as duplicates, not sent twice. In
    strict mode any bad row is a 422 and nothing is stored."""
    campaign = _get(campaign_id)
    if _is_multipart(request):
        form, upload = _read_form(request)
        strict = _validated(RecipientsForm, form, form=True).strict
        source = _Source.from_upload(upload)
    else:
        body = _validated(RecipientsIn, _read_json(request))
        strict = body.strict
        source = _Source.from_rows(body.recipients)
    with _state_conflict("add recipients to"):
        report = source.add_to(campaign, strict=strict)
    return {**_campaign_out(campaign), "report": _report_out(report, source)}


@router.post(
    "/{campaign_id}/start",
    response={200: CampaignOut, **_errors(404, 409)},
    summary="Start a draft (it becomes `sending`, or `scheduled` until `send_at`)",
)
def start_campaign(request: HttpRequest, campaign_id: str) -> dict[str, Any]:
    campaign = _get(campaign_id)
    with _state_conflict("start"):
        services.start_campaign(campaign)
    return _campaign_out(campaign)


@router.post(
    "/{campaign_id}/pause",
    response={200: CampaignOut, **_errors(404, 409)},
    summary="Pause a sending or scheduled campaign; nothing is lost",
)
def pause_campaign(request: HttpRequest, campaign_id: str) -> dict[str, Any]:
    campaign = _get(campaign_id)
    with _state_conflict("pause"):
        services.pause_campaign(campaign)
    return _campaign_out(campaign)


@router.post(
    "/{campaign_id}/resume",
    response={200: CampaignOut, **_errors(404, 409)},
    summary="Resume a paused campaign: every unsent recipient gets one email",
)
def resume_campaign(request: HttpRequest, campaign_id: str) -> dict[str, Any]:
    campaign = _get(campaign_id)
    with _state_conflict("resume"):
        services.resume_campaign(campaign)
    return _campaign_out(campaign)


@router.post(
    "/{campaign_id}/cancel",
    response={200: CancelledOut, **_errors(404, 409)},
    summary="Cancel a campaign: nothing more is sent",
)
def cancel_campaign(request: HttpRequest, campaign_id: str) -> dict[str, Any]:
    campaign = _get(campaign_id)
    with _state_conflict("cancel"):
        cancelled = services.cancel_campaign(campaign)
    return {**_campaign_out(campaign), "messages_cancelled": cancelled}


@router.post(
    "/{campaign_id}/retry-failed",
    response={200: RetriedOut, **_errors(400, 404, 409)},
    summary="Queue the failed recipients again (never suppressed addresses)",
)
def retry_failed(
    request: HttpRequest, campaign_id: str, payload: RetryIn | None = None
) -> dict[str, Any]:
    """The body is optional: without one every failed recipient is retried; a completed
    campaign goes back to `sending`."""
    campaign = _get(campaign_id)
    with _state_conflict("retry"):
        requeued = services.retry_failed(
            campaign,
            smtp_code=payload.smtp_code if payload else None,
            reply_class=payload.reply_class if payload else None,
        )
    return {**_campaign_out(campaign), "messages_requeued": requeued}


# --------------------------------------------------------------------------------------
# Reading requests
# --------------------------------------------------------------------------------------


def _is_multipart(request: HttpRequest) -> bool:
    if request.content_type == "multipart/form-data":
        return True
    content_type = request.content_type or ""
    if content_type == "application/json" or content_type.endswith("+json"):
        return False
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send application/json or multipart/form-data, not {content_type or 'no body type'}",
    )


def _read_json(request: HttpRequest) -> object:
    try:
        return json.loads(request.body)
    except RecursionError:
        raise ApiError(400, "bad_request", "the JSON body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {exc}") from None


def _read_form(request: HttpRequest) -> tuple[dict[str, str], BinaryIO]:
    """The form fields and the ``file`` stream. Django's upload handlers keep a small
    file in memory and spool a big one to disk; either way it is read as a stream."""
    try:
        post, files = request.POST, request.FILES
    except RequestDataTooBig:
        raise
    except (MultiPartParserError, SuspiciousOperation) as exc:
        raise ApiError(400, "bad_request", f"the multipart body cannot be read: {exc}") from None
    form = {key: value for key, value in post.items() if key != "file" and isinstance(value, str)}
    uploads = files.getlist("file")
    if len(uploads) > 1:
        raise _invalid("file", "send one CSV file, not several")
    if uploads:
        upload: UploadedFile = uploads[0]
        return form, cast(BinaryIO, upload.file)
    if post.get("file"):
        # A part without a filename reaches Django as a form field: use its text.
        return form, io.BytesIO(post["file"].encode("utf-8", "surrogatepass"))
    raise _invalid("file", "a CSV file upload is required (multipart field `file`)")


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], data: object, *, form: bool = False) -> M:
    """``data`` checked against ``model``, or a 422 naming each bad field. In a form, an
    empty optional field counts as left out (as HTML forms send them)."""
    if form and isinstance(data, dict):
        fields = model.model_fields
        data = {
            key: value
            for key, value in data.items()
            if value != "" or (key in fields and fields[key].is_required())
        }
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        errors = [
            {"field": _path(error["loc"]), "message": error["msg"].removeprefix("Value error, ")}
            for error in exc.errors(include_url=False)
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise ApiError(422, "invalid", detail or "invalid request", errors) from None


def _path(loc: tuple[int | str, ...]) -> str:
    """``("recipients", 3, "email")`` → ``recipients[3].email``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "body"


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid", f"{field}: {message}", [{"field": field, "message": message}])


# --------------------------------------------------------------------------------------
# Recipients: a CSV upload or a JSON list, and the report on them
# --------------------------------------------------------------------------------------


class _Source:
    """Recipients as given, kept so the report can name each refused row."""

    def __init__(
        self, stream: BinaryIO | None = None, rows: list[RecipientIn] | None = None
    ) -> None:
        self.stream = stream
        self.rows = rows

    @classmethod
    def from_upload(cls, stream: BinaryIO) -> _Source:
        return cls(stream=stream)

    @classmethod
    def from_rows(cls, rows: list[RecipientIn]) -> _Source:
        return cls(rows=rows)

    def add_to(self, campaign: Campaign, *, strict: bool) -> ingest.IngestReport:
        """``services.add_recipients``; refused rows in strict mode raise a 422 naming each."""
        field = "file" if self.stream is not None else "recipients"
        # Below the web server's own timeout (MAILROOM_WEB_TIMEOUT): a list too long for
        # one request gets a 413 naming the field, not a worker killed mid-transaction.
        limit = settings.MAILROOM_API_INGEST_SECONDS
        try:
            if self.stream is not None:
                report = services.add_recipients(
                    campaign, self.stream, strict=strict, time_limit=limit
                )
            else:
                rows = [row.model_dump() for row in self.rows or []]
                report = services.add_recipients(campaign, rows, strict=strict, time_limit=limit)
        except ingest.IngestTimeLimit as exc:
            errors = [{"field": field, "message": exc.message}]
            raise ApiError(413, "too_large", f"{field}: {exc.message}", errors) from None
        except ingest.IngestError as exc:
            raise _invalid(field, exc.message) from None
        if not report.stored:
            listed = (
                f"; the first {len(report.errors)} are listed"
                if report.invalid > len(report.errors)
                else ""
            )
            raise ApiError(
                422,
                "invalid",
                f"{report.invalid} recipient row(s) are invalid{listed}; nothing was stored "
                "(strict mode)",
                _field_errors(report, self),
            )
        return report

    def field(self, line: int, reason: str) -> tuple[int | None, str]:
        """(index, field name) of a refused row."""
        if self.stream is not None:
            return None, f"file:line {line}"
        part = "context" if reason.startswith("context") else "email"
        return line - 1, f"recipients[{line - 1}].{part}"

    def emails(self, report: ingest.IngestReport) -> dict[int, str]:
        """The address given on each refused row, by line."""
        lines = {error.line for error in report.errors}
        if not lines:
            return {}
        if self.rows is not None:
            return {line: self.rows[line - 1].email for line in lines if line <= len(self.rows)}
        assert self.stream is not None
        return _csv_values(self.stream, lines)


def _field_errors(report: ingest.IngestReport, source: _Source) -> list[dict[str, str]]:
    return [
        {"field": source.field(error.line, error.reason)[1], "message": error.reason}
        for error in report.errors
    ]


def _report_out(
    report: ingest.IngestReport | None, source: _Source | None
) -> dict[str, Any] | None:
    if report is None or source is None:
        return None
    emails = source.emails(report)
    errors = []
    for error in report.errors:
        index, field = source.field(error.line, error.reason)
        email = emails.get(error.line)
        errors.append(
            {
                "line": error.line,
                "index": index,
                "field": field,
                "email": _printable(email)[:MAX_REPORTED_EMAIL] if email is not None else None,
                "reason": _printable(error.reason),
            }
        )
    return {
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "suppressed": report.suppressed,
        "invalid": report.invalid,
        "stored": report.stored,
        "errors": errors,
        "errors_truncated": report.invalid > len(report.errors),
    }


def _printable(text: str) -> str:
    """Bytes that were not UTF-8 (kept as lone surrogates) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _csv_values(stream: BinaryIO, lines: set[int]) -> dict[int, str]:
    """The ``email`` value of the records starting on ``lines`` of an uploaded CSV,
    counted as the ingest counts them. Read again as a stream after the ingest."""
    found: dict[int, str] = {}
    try:
        stream.seek(0)
    except (AttributeError, OSError, ValueError):
        return found
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        reader = csv.reader(text, strict=True)
        header = next(row for row in reader if row)
        names = [name.strip().lower() for name in header]
        column = names.index(ingest.EMAIL_COLUMN)
        previous, last = reader.line_num, max(lines)
        while previous < last:
            try:
                for fields in reader:
                    line, previous = previous + 1, reader.line_num
                    if line in lines and column < len(fields):
                        found[line] = fields[column]
                    if previous >= last:
                        break
                break
            except csv.Error:
                previous = reader.line_num
    except (StopIteration, ValueError, csv.Error, UnicodeError):
        pass
    finally:
        text.detach()
    return found


# --------------------------------------------------------------------------------------
# Campaigns: look-up, state conflicts, output
# --------------------------------------------------------------------------------------


def _get(campaign_id: str) -> Campaign:
    try:
        key = uuid.UUID(campaign_id)
    except ValueError:
        key = None
    campaign = Campaign.objects.filter(id=key).first() if key else None
    if campaign is None:
        raise ApiError(404, "not_found", f"no campaign with id {campaign_id[:64]!r}")
    return campaign


@contextmanager
def _state_conflict(action: str) -> Iterator[None]:
    """Services refuse an illegal transition with ``IllegalState``: that is a 409
    ``invalid_state``; other bad fields stay 422."""
    try:
        yield
    except IllegalState as exc:
        message = f"the campaign {exc.message}" if exc.field == "campaign" else exc.message
        raise ApiError(
            409,
            "invalid_state",
            f"cannot {action} the campaign: {message}",
            [{"field": exc.field, "message": message}],
        ) from None


def _campaign_out(campaign: Campaign, *, fresh: bool = True) -> dict[str, Any]:
    """The campaign as stored (``fresh``: read again after a change) and its progress."""
    if fresh:
        campaign.refresh_from_db()
    return {
        "id": campaign.id,
        "name": campaign.name,
        "subject": campaign.subject,
        "template": campaign.template,
        "from_email": campaign.from_email,
        "status": campaign.status,
        "status_reason": campaign.status_reason,
        "send_at": campaign.send_at,
        "expires_at": campaign.expires_at,
        "created_at": campaign.created_at,
        "updated_at": campaign.updated_at,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "progress": services.campaign_progress(campaign),
    }


def _encode_cursor(campaign: Campaign) -> str:
    raw = f"{campaign.created_at.isoformat()}|{campaign.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, campaign_id = raw.split("|")
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError("naive")
        return created_at, uuid.UUID(campaign_id)
    except (binascii.Error, UnicodeError, ValueError):
        raise _invalid("cursor", "is not a cursor this API gave out") from None
