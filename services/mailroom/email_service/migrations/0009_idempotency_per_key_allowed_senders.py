"""Idempotency keys scoped per API key; allowed senders per API key.

- ``message.api_key`` records which key sent a message, and ``msg_idempotency_key_unique``
  becomes unique on (api_key, idempotency_key) with NULLS NOT DISTINCT (PostgreSQL 15+):
  two keys may both use "order-1042", while calls without a key still share one scope.
  Rows stored before this migration have no key recorded and stay in that keyless scope:
  an API client retrying, after the upgrade, a request it first made before it gets a
  new message rather than the old one (idempotency windows are short; say so in the
  release notes).
- ``apikey.allowed_senders``: the domains and addresses a key may send from (empty: the
  MAILROOM_ALLOWED_SENDERS setting).
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("email_service", "0008_lean_message_indexes"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="message",
            name="msg_idempotency_key_unique",
        ),
        migrations.AddField(
            model_name="apikey",
            name="allowed_senders",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AddField(
            model_name="message",
            name="api_key",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="messages",
                to="email_service.apikey",
            ),
        ),
        migrations.AddConstraint(
            model_name="message",
            constraint=models.UniqueConstraint(
                condition=models.Q(("idempotency_key__isnull", False)),
                fields=("api_key", "idempotency_key"),
                name="msg_idempotency_key_unique",
                nulls_distinct=False,
            ),
        ),
    ]
