"""``manage.py revoke_api_key PREFIX_OR_NAME``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from email_service import services
from email_service.exceptions import InvalidEmailRequest


class Command(BaseCommand):
    help = "Revoke an API key by its prefix (or every live key with that name)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="the key's prefix (shown at creation) or its name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            revoked = services.revoke_api_key(options["key"])
        except InvalidEmailRequest as exc:
            raise CommandError(str(exc)) from None
        for api_key in revoked:
            self.stdout.write(f"Revoked {api_key.name!r} (prefix {api_key.prefix})")
