"""Partial indexes for the dashboard: recent failures and retries in progress.

Built CONCURRENTLY (outside a transaction), so adding them to a busy outbox of millions
of rows never blocks the workers' writes.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("email_service", "0006_api_keys"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="message",
            index=models.Index(
                condition=models.Q(("status", "failed")),
                fields=["-updated_at"],
                name="msg_failed_recent_idx",
            ),
        ),
        AddIndexConcurrently(
            model_name="message",
            index=models.Index(
                condition=models.Q(("status", "deferred")),
                fields=["-attempts", "next_attempt_at"],
                name="msg_deferred_attempts_idx",
            ),
        ),
    ]
