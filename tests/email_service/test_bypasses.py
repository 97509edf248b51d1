"""The two ORM bypasses, held to what the ORM would do (bench/bypasses.py says why they
exist). A Django upgrade that changes what a QuerySet loads, or a new model field the
hand-written statements would miss, fails here first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
import redis
from django.utils import timezone

from email_service import apikeys, services
from email_service.models import ApiKey, Message
from email_service.services import accepting, administration

pytestmark = pytest.mark.django_db


def _loaded(key: ApiKey) -> dict[str, Any]:
    return {name: getattr(key, name) for name in apikeys._LOADED}


def test_the_key_look_up_returns_what_the_queryset_would() -> None:
    key, _ = administration.create_api_key(
        "shop", ["send", "campaigns"], rate_limit_per_minute=30, allowed_senders=["shop.example"]
    )
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())

    ours = apikeys._live_key(key.prefix)
    orm = ApiKey.objects.only(*apikeys._LOADED).filter(prefix=key.prefix, revoked_at=None).first()

    assert ours is not None
    assert orm is not None
    assert _loaded(ours) == _loaded(orm)
    assert ours.get_deferred_fields() == orm.get_deferred_fields()
    assert ours._state.db == orm._state.db
    assert ours._state.adding is orm._state.adding is False
    assert ours.name == "shop"  # a deferred field still loads when read


def test_a_revoked_or_unknown_prefix_is_found_by_neither() -> None:
    key, _ = administration.create_api_key("old", ["send"])
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())

    for prefix in (key.prefix, "nosuchpx"):
        assert apikeys._live_key(prefix) is None
        assert not ApiKey.objects.filter(prefix=prefix, revoked_at=None).exists()


# Columns that differ between any two rows whatever writes them.
_PER_ROW = {"id", "dispatch_token", "message_id_header", "idempotency_key"}


def _row(message: Message) -> dict[str, Any]:
    stored = Message.objects.get(id=message.id)
    return {
        f.attname: getattr(stored, f.attname)
        for f in Message._meta.concrete_fields
        if f.attname not in _PER_ROW
    }


@pytest.mark.parametrize("suppressed", [False, True])
def test_the_one_row_insert_writes_what_the_orm_writer_would(
    redis_server: redis.Redis, suppressed: bool
) -> None:
    if suppressed:
        services.suppress("ann@example.com", "hard_bounce")
    request = accepting.validated_request(
        "Hi {{ name }}", "welcome", {"name": "Ann"}, "Shop <shop@example.com>", "high_priority"
    )

    ours = accepting._accept_one("ann@example.com", request, None, "k-1")
    [orm] = accepting._accept_many(["ann@example.com"], request, None, ["k-2"])

    mine, theirs = _row(ours), _row(orm)
    # The writers run a moment apart: the times differ (set or unset alike), nothing else.
    for name in [n for n, v in mine.items() if isinstance(v, datetime)]:
        assert abs((mine.pop(name) - theirs.pop(name)).total_seconds()) < 5, name
    assert mine == theirs
    assert mine["status"] == ("suppressed" if suppressed else "queued")
    assert bool(ours.dispatch_token) is bool(orm.dispatch_token) is not suppressed
    assert (ours.idempotency_key, orm.idempotency_key) == ("k-1", "k-2")
