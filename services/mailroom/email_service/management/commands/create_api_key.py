"""``manage.py create_api_key NAME [--scopes send campaigns admin] [--rate N]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key. The key is printed once; only its hash is stored."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="who or what uses the key, e.g. billing-service")
        parser.add_argument(
            "--scopes",
            nargs="+",
            default=[ApiKey.Scope.SEND],
            choices=ApiKey.Scope.values,
            help="send (default), campaigns, admin (implies the others)",
        )
        parser.add_argument(
            "--rate", type=int, default=None, help="requests per minute (default: the setting)"
        )
        parser.add_argument(
            "--senders",
            nargs="+",
            default=[],
            metavar="DOMAIN_OR_ADDRESS",
            help="domains or addresses the key may send from (default: the setting"
            " MAILROOM_ALLOWED_SENDERS, else DEFAULT_FROM_EMAIL's domain)",
        )
        parser.add_argument("--quiet", action="store_true", help="print only the key (for scripts)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            api_key, key = services.create_api_key(
                options["name"], options["scopes"], options["rate"], options["senders"]
            )
        except InvalidEmailRequest as exc:
            raise CommandError(str(exc)) from None
        if options["quiet"]:
            self.stdout.write(key)
            return
        self.stdout.write(
            f"Created API key {api_key.name!r} (prefix {api_key.prefix}, scopes "
            f"{', '.join(api_key.scopes)}; senders "
            f"{', '.join(api_key.allowed_senders) or 'the default'}). "
            f"It is shown only now; store it safely:\n{key}"
        )
