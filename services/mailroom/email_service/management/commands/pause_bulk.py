"""``manage.py pause_bulk``: the global bulk switch off; transactional mail keeps flowing."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from email_service import services


class Command(BaseCommand):
    help = "Pause all bulk sending (campaigns and bulk batches); transactional mail goes on."

    def handle(self, *args: Any, **options: Any) -> None:
        was_paused = services.is_bulk_paused()
        services.pause_bulk()
        already = " (it already was)" if was_paused else ""
        self.stdout.write(
            f"Bulk sending is paused{already}: bulk batches stop before their next message "
            "and nothing is lost. Resume with `manage.py resume_bulk`."
        )
