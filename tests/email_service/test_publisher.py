"""The one-round-trip publisher writes what Celery's ``send_task`` writes.

Both paths run against the tests' private Redis; the task message on the queue and the
``task-sent`` event on its PUB/SUB channel are compared field by field, ids, tags,
timestamps and clocks aside. (That a worker consumes it is shown by every delivery test
that accepts mail through ``services.send_email``.)
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, cast

import pytest
import redis
from celery import current_app

import email_service.tasks  # noqa: F401  registered, as in a worker: time limits in headers
from email_service import keys, publisher, redisstore, services

TASK = "email_service.deliver_high_priority"
VARYING_HEADERS = {"id", "root_id", "argsrepr", "origin"}
VARYING_PROPERTIES = {"correlation_id", "delivery_tag"}
VARYING_EVENT = {"uuid", "root_id", "args", "timestamp", "clock", "hostname", "pid"}


def _decoded(raw: bytes) -> tuple[dict[str, Any], Any]:
    envelope = json.loads(raw)
    return envelope, json.loads(base64.b64decode(envelope["body"]))


def _published(r: redis.Redis, send: Any) -> tuple[bytes, bytes]:
    """What ``send()`` puts on the high_priority list and on the task-sent channel."""
    listener = r.pubsub()
    listener.psubscribe("*celeryev*")
    assert listener.get_message(timeout=2)["type"] == "psubscribe"
    send()
    event = None
    deadline = time.monotonic() + 5
    while event is None and time.monotonic() < deadline:
        message = listener.get_message(timeout=1)
        if message and message["type"] == "pmessage":
            event = message
    listener.close()
    assert event is not None, "no task-sent event"
    [task] = r.lrange("high_priority", 0, -1)
    r.delete("high_priority")
    return cast(bytes, task), cast(bytes, event["channel"] + b" " + event["data"])


def _without(mapping: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


@pytest.mark.django_db
def test_the_task_and_its_event_are_the_ones_send_task_writes(redis_server: redis.Redis) -> None:
    args = [[str(uuid.uuid4())], "token-1"]
    current_app.finalize()  # as in a worker: the registered tasks carry their time limits

    theirs = _published(redis_server, lambda: current_app.send_task(TASK, args=args))
    covered: list[bool] = []
    ours = _published(
        redis_server,
        lambda: covered.append(publisher.publish(TASK, args, "mailroom:dispatch:t", 1, 60)),
    )
    assert covered == [True], "the test setup is one the publisher covers"

    (their_task, their_body), (our_task, our_body) = _decoded(theirs[0]), _decoded(ours[0])
    assert our_body == their_body == [args, {}, {"callbacks": None, "errbacks": None,
                                                "chain": None, "chord": None}]  # fmt: skip
    assert our_task.keys() == their_task.keys()
    assert _without(our_task["headers"], VARYING_HEADERS) == _without(
        their_task["headers"], VARYING_HEADERS
    )
    assert our_task["headers"]["root_id"] == our_task["headers"]["id"]
    assert our_task["headers"]["timelimit"] == [40, 30]  # tests/settings.py
    assert _without(our_task["properties"], VARYING_PROPERTIES) == _without(
        their_task["properties"], VARYING_PROPERTIES
    )
    assert our_task["properties"]["correlation_id"] == our_task["headers"]["id"]
    assert _without(our_task, {"body", "headers", "properties"}) == _without(
        their_task, {"body", "headers", "properties"}
    )

    their_channel, _, their_event_raw = theirs[1].partition(b" ")
    our_channel, _, our_event_raw = ours[1].partition(b" ")
    assert our_channel == their_channel
    (their_event, their_fields), (our_event, our_fields) = (
        _decoded(their_event_raw),
        _decoded(our_event_raw),
    )
    assert _without(our_fields, VARYING_EVENT) == _without(their_fields, VARYING_EVENT)
    assert our_fields["uuid"] == our_task["headers"]["id"]
    assert our_event.keys() == their_event.keys()
    assert _without(our_event["properties"], {"delivery_tag"}) == _without(
        their_event["properties"], {"delivery_tag"}
    )
    assert our_event["headers"].keys() == their_event["headers"].keys()
    assert redis_server.get("mailroom:dispatch:t") == b"1"


@pytest.mark.django_db(transaction=True)  # the task is enqueued after a real commit
def test_accepting_mail_writes_the_token_and_the_task_together(redis_server: redis.Redis) -> None:
    message = services.send_email(to="ann@example.com", subject="Hi", template="welcome")

    [raw] = redis_server.lrange("high_priority", 0, -1)
    _, body = _decoded(cast(bytes, raw))
    assert body[0] == [[str(message.id)], message.dispatch_token]
    key = keys.dispatch_key(message.dispatch_token)
    assert redis_server.get(key) == b"1"
    assert 0 < redis_server.ttl(key) <= redisstore.DISPATCH_TOKEN_TTL


def _normalised(raw: bytes, envelope: dict[str, Any]) -> bytes:
    """The raw bytes with the values that differ per call (ids, tags, origin) replaced
    by their names, so the rest can be compared byte for byte."""
    headers, properties = envelope["headers"], envelope["properties"]
    varying = {
        **{f"header:{name}": headers[name] for name in VARYING_HEADERS if name in headers},
        **{f"property:{name}": properties[name] for name in VARYING_PROPERTIES},
    }
    for name, value in sorted(varying.items(), key=lambda item: -len(json.dumps(item[1]))):
        raw = raw.replace(json.dumps(value).encode(), f'"<{name}>"'.encode())
    return raw


@pytest.mark.django_db
def test_the_task_message_is_byte_for_byte_what_send_task_writes(
    redis_server: redis.Redis,
) -> None:
    """The contract with Celery and kombu: an upgrade that changes the message format
    (a header added or renamed, the envelope's field order, the body's encoding) fails
    here, and the publisher must be brought in line or dropped for send_task."""
    args = [[str(uuid.uuid4())], "token-2"]
    current_app.finalize()

    theirs = _published(redis_server, lambda: current_app.send_task(TASK, args=args))[0]
    ours = _published(
        redis_server, lambda: publisher.publish(TASK, args, "mailroom:dispatch:u", 1, 60)
    )[0]

    their_bytes = _normalised(theirs, json.loads(theirs))
    our_bytes = _normalised(ours, json.loads(ours))
    assert our_bytes == their_bytes
