from django.apps import AppConfig


class EmailServiceConfig(AppConfig):
    name = "email_service"
    verbose_name = "Mailroom email service"
    default_auto_field = "django.db.models.BigAutoField"
