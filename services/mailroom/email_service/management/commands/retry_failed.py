"""``manage.py retry_failed CAMPAIGN_ID [--code N] [--class 4xx|5xx|network]``."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Campaign


class Command(BaseCommand):
    help = (
        "Re-queue a campaign's failed recipients (all, or those of one SMTP code or reply "
        "class); suppressed addresses are never retried."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.called_from_command_line = False  # bad arguments: one line, not the usage
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("campaign_id", help="the campaign's id")
        parser.add_argument("--code", type=int, default=None, help="only this SMTP reply code")
        parser.add_argument(
            "--class",
            dest="reply_class",
            choices=["4xx", "5xx", "network"],
            default=None,
            help="only this reply class",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        code = options["code"]
        if code is not None and not 100 <= code <= 599:
            raise CommandError(f"--code {code} is not an SMTP reply code (100-599)")
        try:
            campaign = Campaign.objects.get(id=uuid.UUID(options["campaign_id"]))
        except ValueError:
            raise CommandError(f"{options['campaign_id']!r} is not a campaign id") from None
        except Campaign.DoesNotExist:
            raise CommandError(f"no campaign has id {options['campaign_id']}") from None
        try:
            count = services.retry_failed(
                campaign, smtp_code=code, reply_class=options["reply_class"]
            )
        except InvalidEmailRequest as exc:
            raise CommandError(str(exc)) from None
        if count:
            self.stdout.write(
                f"{count} failed message(s) of campaign {campaign.name!r} re-queued; "
                f"the campaign is {campaign.status}."
            )
        else:
            self.stdout.write(f"No failed message of campaign {campaign.name!r} matched.")
