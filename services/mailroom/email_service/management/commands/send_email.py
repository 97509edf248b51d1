"""``manage.py send_email --to ADDR --subject S --template NAME [--context JSON]
[--from ADDR] [--queue high_priority|bulk]``: queue one email, print its message id."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.models import Queue


class Command(BaseCommand):
    help = "Queue one email rendered from a template; prints the message id."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.called_from_command_line = False  # bad arguments: one line, not the usage
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True, help="the recipient's address")
        parser.add_argument("--subject", required=True)
        parser.add_argument("--template", required=True, help="emails/<NAME>.html")
        parser.add_argument("--context", default="{}", help="the template context, a JSON object")
        parser.add_argument("--from", dest="from_email", default=None, help="the sender")
        parser.add_argument(
            "--queue",
            choices=Queue.values,
            default=Queue.HIGH_PRIORITY,
            help="default: %(default)s",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            context = json.loads(options["context"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--context is not valid JSON: {exc}") from None
        try:
            message = services.send_email(
                to=options["to"],
                subject=options["subject"],
                template=options["template"],
                context=context,
                from_email=options["from_email"],
                queue=options["queue"],
            )
        except InvalidEmailRequest as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(str(message.id))
