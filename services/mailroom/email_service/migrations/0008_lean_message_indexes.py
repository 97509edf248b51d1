"""Two indexes fewer on every message row written.

- ``campaign_id`` had an index of its own besides ``msg_campaign_status_idx`` (campaign,
  status), which leads with it. Only the index is dropped: the foreign key stays as it
  is (Django's AlterField would drop it and validate it again over the whole table).
- ``idempotency_key`` was ``unique=True``: a unique constraint plus a ``varchar_pattern_ops``
  index for LIKE queries nobody runs, both holding a NULL entry for every campaign row.
  It becomes a partial unique index on the rows that have a key; the new index is built
  before the old constraint goes, so uniqueness holds throughout.
"""

import django.db.models.deletion
from django.db import migrations, models

CAMPAIGN_INDEX = "email_service_message_campaign_id_36e29b63"


class Migration(migrations.Migration):
    dependencies = [
        ("email_service", "0007_dashboard_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{CAMPAIGN_INDEX}"',
                    reverse_sql=(
                        f'CREATE INDEX IF NOT EXISTS "{CAMPAIGN_INDEX}" '
                        'ON "email_service_message" ("campaign_id")'
                    ),
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="message",
                    name="campaign",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="messages",
                        to="email_service.campaign",
                    ),
                )
            ],
        ),
        migrations.AddConstraint(
            model_name="message",
            constraint=models.UniqueConstraint(
                condition=models.Q(("idempotency_key__isnull", False)),
                fields=("idempotency_key",),
                name="msg_idempotency_key_unique",
            ),
        ),
        migrations.AlterField(
            model_name="message",
            name="idempotency_key",
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
    ]
