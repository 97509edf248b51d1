"""The project as a Django app, so that its system checks are registered (checks.py)."""

from django.apps import AppConfig


class MessagingPlatformConfig(AppConfig):
    name = "messaging_platform"
    verbose_name = "Mailroom settings"

    def ready(self) -> None:
        from messaging_platform import checks  # noqa: F401 (registers the checks)
