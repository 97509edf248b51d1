"""``manage.py demo [--transactional N] [--recipients N] [--wait SECONDS]``: show Mailroom
working. Sends a few transactional welcome emails (``high_priority``) and a small newsletter
campaign (``bulk``) to made-up addresses, through the same services the API uses, so they
land in the SMTP sink (Mailpit with ``docker compose``), on the dashboard and in Grafana.

``make demo`` runs it; so does ``docker compose --profile demo up``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Campaign, Message

NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret")
# Statuses after which nothing more happens to a message.
FINAL = {Message.Status.SENT, Message.Status.FAILED, Message.Status.SUPPRESSED, "cancelled"}
POLL_SECONDS = 1.0


def _person(number: int) -> tuple[str, str]:
    name = NAMES[number % len(NAMES)]
    return name, f"{name.lower()}.{number}@demo.example.com"


class Command(BaseCommand):
    help = "Send a few transactional emails and a small campaign, to see Mailroom at work."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--transactional", type=int, default=3, help="welcome emails (default: 3)"
        )
        parser.add_argument(
            "--recipients", type=int, default=25, help="campaign recipients (default: 25)"
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=0,
            metavar="SECONDS",
            help="wait up to this long until every demo email is delivered (default: do not "
            "wait); fails if one is not",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["transactional"] < 0 or options["recipients"] < 0:
            raise CommandError("--transactional and --recipients cannot be negative")
        run = uuid.uuid4().hex[:6]
        try:
            ids = self._send_transactional(options["transactional"], run)
            campaign = self._start_campaign(options["recipients"], run)
        except InvalidEmailRequest as exc:
            raise CommandError(str(exc)) from None
        except OperationalError as exc:
            raise CommandError(
                f"cannot reach the database ({exc}); is the stack running and migrated?"
            ) from None
        self._say_where_to_look(len(ids), campaign)
        if options["wait"] > 0:
            self._wait(ids, campaign, options["wait"])

    def _send_transactional(self, count: int, run: str) -> list[uuid.UUID]:
        ids = []
        for number in range(count):
            name, address = _person(number)
            message = services.send_email(
                to=address,
                subject=f"Welcome to Mailroom, {name} (demo {run})",
                template="welcome",
                context={"name": name, "product": "the Mailroom demo"},
            )
            ids.append(message.id)
        return ids

    def _start_campaign(self, count: int, run: str) -> Campaign | None:
        if count == 0:
            return None
        campaign = services.create_campaign(
            name=f"Demo newsletter {run}",
            subject="{{ name }}, here is what's new (demo " + run + ")",
            template="newsletter",
        )
        rows = []
        for number in range(count):
            name, address = _person(number)
            rows.append(
                {
                    "email": address,
                    "context": {
                        "name": name,
                        "headline": "Mailroom demo newsletter",
                        "intro": "This campaign went through the bulk queue and its own pool.",
                        "items": [{"title": "Transactional mail never waits behind bulk"}],
                    },
                }
            )
        services.add_recipients(campaign, rows, strict=True)
        return services.start_campaign(campaign)

    def _say_where_to_look(self, transactional: int, campaign: Campaign | None) -> None:
        self.stdout.write(f"Queued {transactional} transactional emails (high_priority).")
        if campaign is not None:
            total = services.campaign_progress(campaign)["total"]
            self.stdout.write(
                f"Started campaign {campaign.name!r} ({campaign.id}): {total} recipients (bulk)."
            )
        self.stdout.write(
            "Watch them land: the Mailpit inbox (http://localhost:8025 with docker compose), "
            "the dashboard (/dashboard/) and Grafana's Mailroom dashboard "
            "(http://localhost:3000)."
        )

    def _wait(self, ids: list[uuid.UUID], campaign: Campaign | None, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        while True:
            statuses = list(Message.objects.filter(id__in=ids).values_list("status", flat=True))
            progress = services.campaign_progress(campaign) if campaign else None
            transactional_done = all(status in FINAL for status in statuses)
            campaign_done = progress is None or (progress["remaining"] == 0 < progress["total"])
            if transactional_done and campaign_done:
                break
            if time.monotonic() >= deadline:
                raise CommandError(f"not every demo email was delivered within {timeout:g}s")
            time.sleep(POLL_SECONDS)
        failed = sum(status != Message.Status.SENT for status in statuses)
        if progress is not None:
            failed += progress["total"] - progress["sent"]
        took = time.monotonic() - started
        if failed:
            raise CommandError(f"{failed} demo emails were not delivered; see the dashboard")
        sent = len(statuses) + (progress["sent"] if progress else 0)
        self.stdout.write(f"All {sent} demo emails delivered in {took:.1f}s.")
