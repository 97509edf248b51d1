"""Counters are exact however many worker processes produce them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.test import Client
from more_itertools import chunked
from prometheus_client.parser import text_string_to_metric_families

from email_service.models import Message
from email_service.tasks import send_bulk_email_batch
from mailroom_testkit.processes import Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _samples(name: str, label: str = "queue") -> dict[str, float]:
    body = Client().get("/metrics").content.decode()
    return {
        sample.labels.get(label, ""): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name
    }


def test_two_worker_processes_with_concurrency_two_count_exactly_1000(
    start_role: Callable[..., Role], smtp_sink: SMTPSink
) -> None:
    start_role("worker", queues="bulk", concurrency=2, name="worker-bulk-a")
    start_role("worker", queues="bulk", concurrency=2, name="worker-bulk-b")
    for chunk in chunked([f"n{i}@example.com" for i in range(1000)], 50):
        send_bulk_email_batch.delay(chunk, "News", {}, "newsletter")

    wait_for(lambda: Message.objects.filter(status="sent").count() == 1000, 120, "1,000 sends")
    assert _samples("mailroom_emails_sent_total")["bulk"] == 1000
    assert _samples("mailroom_delivery_latency_seconds_count")["bulk"] == 1000
    assert _samples("mailroom_emails_failed_total")["bulk"] == 0
    assert _samples("mailroom_workers_online", label="pool")["bulk"] == 2
