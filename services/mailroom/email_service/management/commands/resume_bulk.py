"""``manage.py resume_bulk``: the global bulk switch on again; unsent bulk mail goes out."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from email_service import services


class Command(BaseCommand):
    help = "Resume bulk sending and re-dispatch every bulk message not yet sent."

    def handle(self, *args: Any, **options: Any) -> None:
        was_paused = services.is_bulk_paused()
        redispatched = services.resume_bulk()
        already = " (it was not paused)" if not was_paused else ""
        self.stdout.write(
            f"Bulk sending is running{already}; {redispatched} message(s) re-dispatched."
        )
