"""The product's URLs plus ``POST /bench/floor``: the least work an accept can do.

``floor`` does only what any implementation of ``POST /api/v1/messages`` must do before
it answers 202 without risking a lost message: parse the JSON body, commit one outbox row
(a single autocommitted ``INSERT`` into the real, indexed ``Message`` table, raw SQL, no
ORM) and write one entry to Redis for a worker (one ``LPUSH`` onto a bench-only list that
nothing consumes). No API key, no rate check, no validation, no template, no Celery
message. Its rate against ``/healthz`` is therefore an upper bound for the API's ratio on
the machine that runs the bench.
"""

from __future__ import annotations

import json
import uuid

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from email_service import redisstore
from email_service.models import Message
from messaging_platform.urls import urlpatterns as product_urls

FLOOR_LIST = "bench:floor"

# Every NOT NULL column without a database default; a migration that adds one makes this
# fail loudly (and bench/api.py with it), never measure something smaller by accident.
INSERT = (
    f'INSERT INTO "{Message._meta.db_table}" '  # noqa: S608 - the model's own table name
    "(id, queue, from_email, to_email, subject, template, context, status, status_reason, "
    "attempts, dispatch_token, dispatched_at, last_smtp_reply, message_id_header, "
    "created_at, updated_at) "
    "VALUES (%s, 'high_priority', 'noreply@example.com', %s, %s, %s, %s, 'queued', '', "
    "0, %s, %s, '', %s, %s, %s)"
)


@csrf_exempt
def floor(request: HttpRequest) -> JsonResponse:
    data = json.loads(request.body)
    message_id = uuid.uuid4()
    now = timezone.now()
    params = [
        message_id,
        data["to"],
        data["subject"],
        data["template"],
        json.dumps(data.get("context") or {}),
        uuid.uuid4().hex,
        now,
        f"<{message_id.hex}@example.com>",
        now,
        now,
    ]
    with connection.cursor() as cursor:
        cursor.execute(INSERT, params)
    redisstore.client().lpush(FLOOR_LIST, message_id.hex)
    return JsonResponse({"id": str(message_id), "status": "queued"}, status=202)


urlpatterns = [*product_urls, path("bench/floor", floor)]
