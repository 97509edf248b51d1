"""API: the operator's switches and lists, templates and the delivery figures.

Mounted at ``/api/v1``. The bulk switch and the suppression list need the ``admin``
scope; templates (list, preview) and the figures need ``send``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import redis
from django.http import Http404, HttpRequest
from ninja import Field, Query, Router, Schema, Status

from email_service import services
from email_service.api.auth import requires
from email_service.api.errors import COMMON_ERRORS, ApiError, ErrorOut
from email_service.api.messages import (
    JsonObject,
    Text,
    decode_cursor,
    encode_cursor,
)
from email_service.models import Suppression

router = Router(tags=["admin"])

ADMIN = requires("admin")
SEND = requires("send")
SuppressionReason = Literal["hard_bounce", "unsubscribe", "complaint", "manual"]


# --------------------------------------------------------------------------------------
# The global bulk switch
# --------------------------------------------------------------------------------------


class BulkOut(Schema):
    paused: bool


@router.post(
    "/bulk/pause",
    auth=ADMIN,
    response={200: BulkOut, **COMMON_ERRORS},
    summary="Pause all bulk sending",
    description="Every bulk batch stops before its next message; transactional mail "
    "keeps flowing. Idempotent.",
)
def pause_bulk(request: HttpRequest) -> dict[str, bool]:
    services.pause_bulk()
    return {"paused": services.is_bulk_paused()}


@router.post(
    "/bulk/resume",
    auth=ADMIN,
    response={200: BulkOut, **COMMON_ERRORS},
    summary="Resume bulk sending",
    description="Bulk mail not yet sent is dispatched again, each message once. Idempotent.",
)
def resume_bulk(request: HttpRequest) -> dict[str, bool]:
    services.resume_bulk()
    return {"paused": services.is_bulk_paused()}


# --------------------------------------------------------------------------------------
# Suppressions
# --------------------------------------------------------------------------------------


class SuppressionOut(Schema):
    address: str
    reason: SuppressionReason
    detail: str
    created_at: datetime


class SuppressionPage(Schema):
    items: list[SuppressionOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class SuppressionFilters(Schema):
    q: Text | None = Field(None, max_length=320, description="Part of the address, any case.")
    limit: int = Field(50, ge=1, le=200)
    cursor: Text | None = Field(None, max_length=500, description="`next_cursor` of a page.")


class SuppressionIn(Schema):
    address: Text = Field(..., max_length=320)
    reason: SuppressionReason = "manual"
    detail: Text = Field("", max_length=2000)


def _suppression(row: Suppression) -> dict[str, Any]:
    return {
        "address": row.address,
        "reason": row.reason,
        "detail": row.detail,
        "created_at": row.created_at,
    }


@router.get(
    "/suppressions",
    auth=ADMIN,
    response={200: SuppressionPage, **COMMON_ERRORS},
    tags=["suppressions"],
    summary="List suppressed addresses",
)
def list_suppressions(request: HttpRequest, filters: Query[SuppressionFilters]) -> dict[str, Any]:
    after = decode_cursor(filters.cursor, 1)[0] if filters.cursor else None
    rows, last = services.list_suppressions(q=filters.q, after=after, limit=filters.limit)
    return {
        "items": [_suppression(r) for r in rows],
        "next_cursor": encode_cursor(last) if last is not None else None,
    }


@router.post(
    "/suppressions",
    auth=ADMIN,
    response={201: SuppressionOut, 400: ErrorOut, **COMMON_ERRORS},
    tags=["suppressions"],
    summary="Suppress an address",
    description="No mail is sent to the address any more (an `unsubscribe` stops bulk "
    "mail only). Idempotent: an address already suppressed keeps its first reason, and "
    "the answer shows the stored suppression.",
)
def add_suppression(request: HttpRequest, payload: SuppressionIn) -> Status[dict[str, Any]]:
    row = services.add_suppression(payload.address, payload.reason, payload.detail)
    return Status(201, _suppression(row))


@router.delete(
    "/suppressions/{anytext:address}",
    auth=ADMIN,
    response={204: None, 404: ErrorOut, **COMMON_ERRORS},
    tags=["suppressions"],
    summary="Lift the suppression of an address",
)
def delete_suppression(request: HttpRequest, address: Text) -> Status[None]:
    if not services.unsuppress(address):
        raise ApiError(404, "not_found", "this address is not suppressed")
    return Status(204, None)


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


class TemplatesOut(Schema):
    templates: list[str]


class PreviewIn(Schema):
    subject: Text = Field(..., max_length=998)
    context: JsonObject | None = None


class PreviewOut(Schema):
    subject: str
    html: str
    text: str


@router.get(
    "/templates",
    auth=SEND,
    response={200: TemplatesOut, **COMMON_ERRORS},
    tags=["templates"],
    summary="The email templates that can be sent",
)
def list_templates(request: HttpRequest) -> dict[str, list[str]]:
    return {"templates": services.template_names()}


@router.post(
    "/templates/{anytext:name}/preview",
    auth=SEND,
    response={200: PreviewOut, 400: ErrorOut, 404: ErrorOut, **COMMON_ERRORS},
    tags=["templates"],
    summary="Render a template for a context, sending nothing",
    description="The subject is rendered as a template too, as a campaign's is.",
)
def preview_template(request: HttpRequest, name: str, payload: PreviewIn) -> dict[str, str]:
    if name not in services.template_names():
        raise Http404(name)
    rendered = services.preview_template(name, payload.subject, payload.context)
    return {"subject": rendered.subject, "html": rendered.html, "text": rendered.text}


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


class QueueStats(Schema):
    sent: int
    failed: int
    suppressed: int
    depth: int = Field(description="Tasks waiting in the queue.")


class StatsOut(Schema):
    sent: int
    failed: int
    suppressed: int
    success_rate: float | None = Field(description="sent / (sent + failed); null before any.")
    queues: dict[str, QueueStats]
    bulk_paused: bool
    workers: dict[str, int] = Field(description="Live workers per pool (queues joined by +).")


@router.get(
    "/stats",
    auth=SEND,
    response={200: StatsOut, 503: ErrorOut, **COMMON_ERRORS},
    tags=["stats"],
    summary="Delivery figures: sent, failed, success rate, queue depths, pause, workers",
)
def stats(request: HttpRequest) -> dict[str, Any]:
    try:
        return services.delivery_stats()
    except redis.RedisError as exc:
        raise ApiError(
            503, "unavailable", "the figures are in Redis, which does not answer"
        ) from exc
