"""Administration: API keys and the suppression list (including unsubscribes)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.utils import timezone

from email_service import (
    apikeys,
)
from email_service import unsubscribe as unsubscribe_links
from email_service.exceptions import InvalidEmailRequest
from email_service.models import (
    ApiKey,
    Message,
    Queue,
    Suppression,
)
from email_service.services.dispatch import suppress
from email_service.services.queries import get_suppression
from email_service.validation import (
    normalize_address,
)

logger = logging.getLogger(__name__)


def unsubscribe(address: str, source: str) -> None:
    """One-click or page unsubscribe: suppressed at once; queued bulk mail to the address
    is cancelled. Idempotent."""
    suppress(address, Suppression.Reason.UNSUBSCRIBE, detail=source)
    logger.info("unsubscribed %s via %s", unsubscribe_links.mask_address(address), source)
    Message.objects.filter(
        to_email__iexact=address, queue=Queue.BULK, status__in=["queued", "deferred"]
    ).update(
        status=Message.Status.CANCELLED, status_reason="unsubscribed", updated_at=timezone.now()
    )


def create_api_key(
    name: str,
    scopes: Sequence[str],
    rate_limit_per_minute: int | None = None,
    allowed_senders: Sequence[str] = (),
) -> tuple[ApiKey, str]:
    """A new key; the clear key is returned once and never stored. ``allowed_senders``
    are domains or addresses (empty: MAILROOM_ALLOWED_SENDERS applies)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidEmailRequest("name", "must not be empty")
    unknown = sorted(set(scopes) - set(ApiKey.Scope.values))
    if unknown or not scopes:
        raise InvalidEmailRequest(
            "scopes", f"must be one or more of {', '.join(ApiKey.Scope.values)}"
        )
    if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
        raise InvalidEmailRequest("rate_limit_per_minute", "must be 1 or more")
    senders = sorted({sender_entry(entry) for entry in allowed_senders})
    key, prefix = apikeys.generate()
    api_key = ApiKey.objects.create(
        name=name.strip()[:100],
        prefix=prefix,
        key_hash=apikeys.digest(key),
        scopes=sorted(set(scopes)),
        rate_limit_per_minute=rate_limit_per_minute,
        allowed_senders=senders,
    )
    return api_key, key


def sender_entry(entry: object) -> str:
    """One allowed-sender entry, normalised: an address, or a domain (an address on it
    must validate, which checks the domain by the same rule as every send)."""
    if not isinstance(entry, str) or not entry.strip():
        raise InvalidEmailRequest("allowed_senders", "entries must be domains or addresses")
    value = entry.strip()
    if "@" in value:
        return normalize_address(value, "allowed_senders").lower()
    return normalize_address(f"postmaster@{value}", "allowed_senders").rpartition("@")[2]


def revoke_api_key(prefix_or_name: str) -> list[ApiKey]:
    """Revoke the live key with this prefix, or every live key with this name."""
    live = ApiKey.objects.filter(revoked_at__isnull=True)
    found = list(live.filter(prefix=prefix_or_name)) or list(live.filter(name=prefix_or_name))
    if not found:
        raise InvalidEmailRequest("key", f"no live API key has prefix or name {prefix_or_name!r}")
    ApiKey.objects.filter(pk__in=[k.pk for k in found]).update(revoked_at=timezone.now())
    return found


def add_suppression(
    address: str, reason: str = Suppression.Reason.MANUAL, detail: str = ""
) -> Suppression:
    """Validate and suppress ``address``; an address already suppressed keeps its first
    reason. Returns the stored suppression."""
    normalized = normalize_address(address, "address")
    if reason not in Suppression.Reason.values:
        raise InvalidEmailRequest(
            "reason", f"must be one of {', '.join(Suppression.Reason.values)}"
        )
    suppress(normalized, reason, detail)
    return get_suppression(normalized)


def unsuppress(address: str) -> bool:
    """Lift the suppression of ``address`` (any reason); False when there was none.

    Mail already cancelled or suppressed stays so; only new mail reaches the address.
    """
    deleted, _ = Suppression.objects.filter(address=address.strip().lower()).delete()
    return deleted > 0
