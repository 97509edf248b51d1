"""Delivery tasks written to Redis in one round trip, together with their dispatch token.

Why not ``send_task``: on the API's hot path, Celery's ``send_task`` cost about 1 ms of
CPU per message (routing, a new event dispatcher per call, two kombu publishes each
building a new Redis client, the ``task-sent`` event as a second round trip), plus the
dispatch token's own ``SET``: in a profile of ``POST /api/v1/messages`` on a 2-CPU machine,
about 20 % of the request's 4.5-5.6 ms of server CPU (docs/performance.md), well over the
10 % that would justify going back to the framework's way. Here the token ``SET``, the
task's ``LPUSH`` and the
``task-sent`` event's ``PUBLISH`` go out in one pipeline, in that order (Redis runs a
pipeline's commands in order on one connection, so the token is still written before a
worker can see the task).

The message is Celery's own: headers, properties and body come from
``app.amqp.create_task_message`` (task protocol 2), and the envelope is the one kombu's
Redis transport writes (JSON, base64 body, ``delivery_info``, ``delivery_tag``), so any
Celery worker consumes it as if ``send_task`` had sent it. tests/email_service/
test_publisher.py is the contract: it compares the two field by field and byte for byte
(ids aside) against the Celery and kombu of the lock, so an upgrade that changes the
format fails there.

It covers only the plain setup Mailroom ships: the broker is ``REDIS_URL`` itself (so one
pipeline reaches both), no kombu transport option besides ``visibility_timeout``, JSON,
no compression, a task routed to a queue on a direct exchange with no per-task publish
option but time limits, no countdown, not called from inside a task (Celery would record
it as the parent). Anything else returns False and the caller uses ``send_task``.
"""

from __future__ import annotations

import base64
import functools
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from celery import current_app
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from django.conf import settings
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as envelope_json

from email_service import redisstore

_TRANSPORT_OPTIONS_COVERED = {"visibility_timeout"}


@dataclass(frozen=True)
class _Route:
    queue: str  # the Redis list (priority 0: kombu adds no suffix)
    event_topic: str | None  # the task-sent event's PUB/SUB channel, None when off


@functools.cache
def _route(app: Any, task_name: str) -> _Route | None:
    """Where ``send_task`` on ``app`` would put ``task_name``, or None when this module
    does not cover the configuration (computed once per app and task).

    ``app`` is a key, not only an argument: in another Django project the email backend
    makes its own app current while it publishes (email_service.backends)."""
    conf = app.conf
    redis_url = getattr(settings, "REDIS_URL", None)
    if (
        not redis_url
        or conf.broker_write_url != redis_url  # the broker_url unless set apart
        or not redis_url.startswith(("redis://", "rediss://", "unix://"))
        or set(conf.broker_transport_options or {}) - _TRANSPORT_OPTIONS_COVERED
        or int(conf.task_protocol) != 2
        or conf.task_serializer != "json"
        or conf.task_compression
        or conf.event_serializer != "json"
    ):
        return None
    options = app.amqp.router.route({}, task_name, (), {})
    queue = options.get("queue")
    if queue is None or "exchange" in options or "routing_key" in options:
        return None
    if queue.exchange.type != "direct" or options.get("priority"):
        return None
    topic = None
    if conf.task_send_sent_event:
        db = redisstore.client().connection_pool.connection_kwargs.get("db", 0)
        # kombu's Redis fanout: prefix "/{db}." and the routing key as a pattern.
        topic = f"/{db}.{conf.event_exchange}/task.sent"
    return _Route(queue=queue.name, event_topic=topic)


def _envelope(
    body: object,
    headers: dict[str, object],
    properties: dict[str, object],
    delivery_mode: int,
    exchange: str,
    routing_key: str,
) -> str:
    """The JSON kombu's Redis transport stores for one message (Producer.publish, then
    the virtual channel's prepare_message and basic_publish)."""
    content_type, content_encoding, data = serialize(body, serializer="json")
    raw = data.encode(content_encoding) if isinstance(data, str) else data
    return envelope_json(
        {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": delivery_mode,
                "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def publish(
    task_name: str, args: Sequence[object], token_key: str, token_value: int, token_ttl: int
) -> bool:
    """SET the dispatch token, then enqueue ``task_name(*args)``, in one round trip.

    False (nothing written) when the setup is not covered: call ``send_task`` instead.
    Redis errors propagate (the caller leaves the rows to the sweeper).
    """
    # The app itself (current_app is a proxy); Any: celery-types lacks some attributes.
    app: Any = cast(Any, current_app)._get_current_object()
    route = _route(app, task_name)
    if route is None or app.current_worker_task is not None:
        return False
    # As send_task: the registered task's options, looked up as send_task does (in the
    # registry as it is, without finalizing the app). Time limits go into the headers;
    # any other option (queue, priority, expires...) is send_task's business.
    task = app._tasks.get(task_name)
    options = {k: v for k, v in (task._get_exec_options() if task else {}).items() if v is not None}
    time_limit, soft_time_limit = (
        options.pop("time_limit", None),
        options.pop("soft_time_limit", None),
    )
    if options.pop("serializer", "json") != "json" or options:
        return False
    task_id = str(uuid.uuid4())
    headers, properties, body, sent_event = app.amqp.create_task_message(
        task_id,
        task_name,
        list(args),
        None,
        reply_to=app.thread_oid,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        create_sent_event=route.event_topic is not None,
        ignore_result=None,
    )
    pipe = redisstore.client().pipeline(transaction=False)
    pipe.set(token_key, token_value, ex=token_ttl)
    # A direct exchange: Celery publishes to the anonymous exchange, routing key = queue.
    pipe.lpush(route.queue, _envelope(body, headers, properties, 2, "", route.queue))
    if route.event_topic is not None and sent_event is not None:
        hostname = anon_nodename()
        event = Event(
            "task-sent",
            hostname=hostname,
            utcoffset=utcoffset(),
            pid=os.getpid(),
            clock=app.clock.forward(),
            **sent_event,
            queue=route.queue,
            exchange="",
            routing_key=route.queue,
        )
        # As celery.events.EventDispatcher publishes it: transient, the hostname header.
        payload = _envelope(
            event, {"hostname": hostname}, {}, 1, app.conf.event_exchange, "task.sent"
        )
        pipe.publish(route.event_topic, payload)
    pipe.execute()
    return True
