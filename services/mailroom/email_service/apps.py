from django.apps import AppConfig


class EmailServiceConfig(AppConfig):
    name = "email_service"
    verbose_name = "Mailroom email service"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connects the worker heartbeat to Celery's worker signals.
        from email_service import heartbeat  # noqa: F401
