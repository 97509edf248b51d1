"""Every business operation of Mailroom lives here, by role.

The API, the dashboard, the admin, management commands and Celery tasks all call these
functions; none of them decides on its own what should happen to a message. This
package re-exports the public API of its modules, so callers write
``services.send_email(...)``.

Layers (bottom up; enforced by the import contract in ``make lint``):

- ``dispatch``: handing rows to the worker pools; the suppression rule; the bulk switch
  and campaign states as workers read them.
- ``accepting`` (requests become rows), ``delivery`` (workers and the sweeper),
  ``queries`` (read-only look-ups and figures).
- ``raw`` (the email backend's messages), ``campaigns``, ``controls`` (the bulk switch,
  rate limits), ``administration`` (API keys, suppressions, unsubscribes).
"""

from __future__ import annotations

from email_service.services.accepting import (
    allowed_sender,
    send_bulk_batch,
    send_email,
)
from email_service.services.administration import (
    add_suppression,
    create_api_key,
    revoke_api_key,
    sender_entry,
    unsubscribe,
    unsuppress,
)
from email_service.services.campaigns import (
    NotLaunched,
    add_recipients,
    campaign_progress,
    cancel_campaign,
    create_campaign,
    dispatch_campaigns,
    kick_dispatcher,
    launch_campaign,
    pause_campaign,
    resume_campaign,
    retry_failed,
    start_campaign,
)
from email_service.services.controls import (
    pause_bulk,
    resume_bulk,
    set_rate_limits,
)
from email_service.services.delivery import (
    RELAY_DOWN_AFTER,
    UNSUBSCRIBE_PLACEHOLDER,
    BatchReport,
    SweepReport,
    deliver,
    redispatch_orphans,
    retry_delay,
    sweep,
)
from email_service.services.dispatch import (
    DELIVER_TASKS,
    enqueue,
    suppress,
    suppressed_addresses,
)
from email_service.services.queries import (
    LAYOUT_TEMPLATES,
    MessageKey,
    delivery_stats,
    get_message,
    get_suppression,
    list_messages,
    list_suppressions,
    preview_template,
    template_names,
)
from email_service.services.raw import (
    DEFAULT_MAX_ATTACHMENT_BYTES,
    MAX_RAW_HEADERS,
    RAW_HEADER_NAMES,
    RawAttachment,
    RawEmail,
    max_attachment_bytes,
    prepare_raw_email,
    send_raw_emails,
)
from email_service.switches import campaign_state, is_bulk_paused

__all__ = [
    "DEFAULT_MAX_ATTACHMENT_BYTES",
    "DELIVER_TASKS",
    "LAYOUT_TEMPLATES",
    "MAX_RAW_HEADERS",
    "RAW_HEADER_NAMES",
    "RELAY_DOWN_AFTER",
    "UNSUBSCRIBE_PLACEHOLDER",
    "BatchReport",
    "MessageKey",
    "NotLaunched",
    "RawAttachment",
    "RawEmail",
    "SweepReport",
    "add_recipients",
    "add_suppression",
    "allowed_sender",
    "campaign_progress",
    "campaign_state",
    "cancel_campaign",
    "create_api_key",
    "create_campaign",
    "deliver",
    "delivery_stats",
    "dispatch_campaigns",
    "enqueue",
    "get_message",
    "get_suppression",
    "is_bulk_paused",
    "kick_dispatcher",
    "launch_campaign",
    "list_messages",
    "list_suppressions",
    "max_attachment_bytes",
    "pause_bulk",
    "pause_campaign",
    "prepare_raw_email",
    "preview_template",
    "redispatch_orphans",
    "resume_bulk",
    "resume_campaign",
    "retry_delay",
    "retry_failed",
    "revoke_api_key",
    "send_bulk_batch",
    "send_email",
    "send_raw_emails",
    "sender_entry",
    "set_rate_limits",
    "start_campaign",
    "suppress",
    "suppressed_addresses",
    "sweep",
    "template_names",
    "unsubscribe",
    "unsuppress",
]
