"""``message.expires_at``: Celery's ``expires`` for a message (unsent by then, it is
cancelled with reason "expired"), and the partial index the sweeper's expiry pass uses."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('email_service', '0009_idempotency_per_key_allowed_senders'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='expires_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name='message',
            index=models.Index(condition=models.Q(('expires_at__isnull', False), ('status__in', ['queued', 'deferred'])), fields=['expires_at'], name='msg_expiring_idx'),
        ),
    ]
