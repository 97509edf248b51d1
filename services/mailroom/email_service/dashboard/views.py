"""The dashboard's pages, its data endpoint and its controls.

Reading: ``index`` renders the whole page on the server (it works with JavaScript off);
``data`` answers the poller with the figures as JSON and the live sections as HTML,
rendered by the same templates. Nothing that answers GET changes anything.

Controls: every one is a POST form with a CSRF token, handled by a view that calls
``email_service.services`` and redirects back to the page (POST-redirect-GET) with a
message. The ones that stop, end or resend mail, or lift a suppression, ask first: the
page's script asks with ``confirm()`` and adds ``confirmed=yes``; without it the view
answers with a confirmation page whose button posts the same form again, confirmed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import get_template
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from email_service import services
from email_service.dashboard import chart, figures
from email_service.dashboard.access import staff_action, staff_page
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Campaign, Suppression

# The parts of the page the poller refreshes, each a template of its own.
LIVE_SECTIONS = ("summary", "queues", "throughput", "campaigns", "retries", "failures")
SUPPRESSIONS_SHOWN = 25


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    kind: str  # sent, failed, suppressed, cancelled, remaining
    label: str
    count: int
    percent: str  # of the campaign's messages, formatted for a CSS width
    always: bool  # listed in the legend even at 0 (the others only when they happen)


def progress_bar(progress: dict[str, Any]) -> list[Segment]:
    """The stacked bar of a campaign: each outcome's share of its messages."""
    total = progress["total"] or 1
    parts = [
        ("sent", progress["sent"], True),
        ("failed", progress["failed"], True),
        ("suppressed", progress["suppressed"], False),
        ("cancelled", progress["cancelled"], False),
        ("remaining", progress["remaining"], True),
    ]
    return [Segment(k, k, n, f"{100 * n / total:.2f}", always) for k, n, always in parts]


def live_context(snap: figures.Snapshot) -> dict[str, Any]:
    failures_by_campaign: dict[uuid.UUID, str] = {}
    for failure in snap.failures:
        if failure.campaign_id and failure.campaign_status != Campaign.Status.CANCELLED:
            failures_by_campaign.setdefault(failure.campaign_id, failure.campaign)
    return {
        "snap": snap,
        "stats": snap.stats,
        "chart": chart.draw(snap.throughput) if snap.throughput is not None else None,
        "cards": [(card, progress_bar(card.progress)) for card in snap.campaigns],
        "retry_campaigns": list(failures_by_campaign.items()),
    }


@never_cache
@staff_page
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    snap = figures.snapshot()
    query = request.GET.get("q", "").strip()[:320]
    after = request.GET.get("after") or None
    suppressions, next_after = services.list_suppressions(
        q=query or None, after=after, limit=SUPPRESSIONS_SHOWN
    )
    context = live_context(snap) | {
        "links": figures.links(),
        "live_sections": LIVE_SECTIONS,
        "poll_ms": int(settings.MAILROOM_DASHBOARD_POLL_SECONDS * 1000),
        "q": query,
        "suppressions": suppressions,
        "next_after": next_after,
        "reasons": Suppression.Reason.choices,
    }
    return render(request, "dashboard/index.html", context)


@never_cache
@staff_action
@require_GET
def data(request: HttpRequest) -> JsonResponse:
    """The poller's feed: ``figures`` (numbers, for anyone) and ``html`` (the live
    sections, rendered as on the page)."""
    snap = figures.snapshot()
    context = live_context(snap)
    html = {
        name: get_template(f"dashboard/_{name}.html").render(context, request)
        for name in LIVE_SECTIONS
    }
    return JsonResponse(
        {
            "generated_at": timezone.now().isoformat(),
            "figures": figures.as_json(snap),
            "html": html,
        }
    )


# --------------------------------------------------------------------------------------
# Controls
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confirm:
    """What the confirmation page (JavaScript off) or ``confirm()`` (on) asks."""

    question: str
    detail: str
    button: str


def _back(anchor: str, request: HttpRequest | None = None) -> HttpResponse:
    """The dashboard, with the suppression search kept when there was one."""
    query = request.POST.get("q", "").strip() if request is not None else ""
    suffix = f"?{urlencode({'q': query})}" if query else ""
    return redirect(f"{reverse('dashboard:index')}{suffix}#{anchor}")


def _act(
    request: HttpRequest,
    act: Callable[[], str],
    *,
    anchor: str,
    confirm: Confirm | None = None,
) -> HttpResponse:
    """Run ``act`` (which calls services and returns the message to show), unless the
    action must be confirmed and was not: then show the confirmation page."""
    if confirm is not None and request.POST.get("confirmed") != "yes":
        fields = [
            (name, value)
            for name, value in request.POST.items()
            if name not in ("csrfmiddlewaretoken", "confirmed")
        ]
        context = {"confirm": confirm, "fields": fields, "action": request.path, "anchor": anchor}
        return render(request, "dashboard/confirm.html", context)
    try:
        messages.success(request, act())
    except InvalidEmailRequest as exc:
        messages.error(request, f"Nothing changed: {exc.message}.")
    return _back(anchor, request)


def _campaign(campaign_id: uuid.UUID) -> Campaign:
    return get_object_or_404(Campaign, id=campaign_id)


@staff_action
@require_POST
def bulk_pause(request: HttpRequest) -> HttpResponse:
    def act() -> str:
        services.pause_bulk()
        return "Bulk sending is paused. Transactional mail keeps flowing."

    confirm = Confirm(
        "Pause all bulk sending?",
        "Every campaign stops before its next message; transactional mail keeps flowing. "
        "Nothing is lost: resume sends exactly what is left.",
        "Pause bulk sending",
    )
    return _act(request, act, anchor="queues", confirm=confirm)


@staff_action
@require_POST
def bulk_resume(request: HttpRequest) -> HttpResponse:
    def act() -> str:
        services.resume_bulk()
        return "Bulk sending resumed."

    return _act(request, act, anchor="queues")


@staff_action
@require_POST
def campaign_start(request: HttpRequest, campaign_id: uuid.UUID) -> HttpResponse:
    campaign = _campaign(campaign_id)

    def act() -> str:
        services.start_campaign(campaign)
        if campaign.status == Campaign.Status.SCHEDULED:
            at = f"{campaign.send_at:%Y-%m-%d %H:%M} UTC"
            return f"Campaign “{campaign.name}” is scheduled for {at}."
        return f"Campaign “{campaign.name}” started."

    total = services.campaign_progress(campaign)["total"]
    confirm = Confirm(
        f"Start campaign “{campaign.name}”?",
        f"It sends to {total:,} recipient(s).",
        "Start sending",
    )
    return _act(request, act, anchor="campaigns", confirm=confirm)


@staff_action
@require_POST
def campaign_pause(request: HttpRequest, campaign_id: uuid.UUID) -> HttpResponse:
    campaign = _campaign(campaign_id)

    def act() -> str:
        services.pause_campaign(campaign)
        return f"Campaign “{campaign.name}” paused: nothing more is sent until you resume it."

    confirm = Confirm(
        f"Pause campaign “{campaign.name}”?",
        "It stops before its next message. Nothing is lost: resume sends exactly what is left.",
        "Pause campaign",
    )
    return _act(request, act, anchor=f"campaign-{campaign.id}", confirm=confirm)


@staff_action
@require_POST
def campaign_resume(request: HttpRequest, campaign_id: uuid.UUID) -> HttpResponse:
    campaign = _campaign(campaign_id)

    def act() -> str:
        services.resume_campaign(campaign)
        return f"Campaign “{campaign.name}” resumed."

    return _act(request, act, anchor=f"campaign-{campaign.id}")


@staff_action
@require_POST
def campaign_cancel(request: HttpRequest, campaign_id: uuid.UUID) -> HttpResponse:
    campaign = _campaign(campaign_id)

    def act() -> str:
        cancelled = services.cancel_campaign(campaign)
        return f"Campaign “{campaign.name}” cancelled; {cancelled:,} unsent message(s) dropped."

    confirm = Confirm(
        f"Cancel campaign “{campaign.name}”?",
        "Every message not yet sent is dropped. This cannot be undone.",
        "Cancel campaign",
    )
    return _act(request, act, anchor="campaigns", confirm=confirm)


@staff_action
@require_POST
def campaign_retry(request: HttpRequest, campaign_id: uuid.UUID) -> HttpResponse:
    campaign = _campaign(campaign_id)

    def act() -> str:
        count = services.retry_failed(campaign)
        return f"{count:,} failed message(s) of “{campaign.name}” queued again."

    failed = services.campaign_progress(campaign)["failed"]
    confirm = Confirm(
        f"Retry the failed messages of “{campaign.name}”?",
        f"{failed:,} recipient(s) whose delivery failed are sent the email again "
        "(suppressed addresses are skipped).",
        "Retry failed",
    )
    return _act(request, act, anchor="failures", confirm=confirm)


@staff_action
@require_POST
def suppression_add(request: HttpRequest) -> HttpResponse:
    address = request.POST.get("address", "")
    reason = request.POST.get("reason", Suppression.Reason.MANUAL)
    detail = request.POST.get("detail", "").strip()

    def act() -> str:
        stored = services.add_suppression(address, reason, detail or "added on the dashboard")
        return f"{stored.address} is suppressed ({stored.get_reason_display()})."

    return _act(request, act, anchor="suppressions")


@staff_action
@require_POST
def suppression_remove(request: HttpRequest) -> HttpResponse:
    address = request.POST.get("address", "").strip()

    def act() -> str:
        if services.unsuppress(address):
            return f"{address} may receive email again."
        return f"{address} was not suppressed."

    confirm = Confirm(
        f"Remove {address} from the suppression list?",
        "New email to this address is sent again, including bulk mail if it had "
        "unsubscribed or bounced.",
        "Remove suppression",
    )
    return _act(request, act, anchor="suppressions", confirm=confirm)
