"""Number and time formats of the dashboard: ``{% load dashboard %}``."""

from __future__ import annotations

from django import template

register = template.Library()

MISSING = "\u2013"  # an en dash: unknown
POOL_LABELS = {
    "high_priority": "high_priority",
    "bulk": "bulk",
    "bulk+high_priority": "both queues",
}


@register.filter
def count(value: object) -> str:
    """1234567 → "1,234,567"; unknown → MISSING."""
    if value is None or value == "":
        return MISSING
    try:
        return f"{int(str(value)):,}"
    except ValueError:
        return MISSING


@register.filter
def percent(fraction: object) -> str:
    """0.9876 → "98.8 %"; unknown → MISSING."""
    if not isinstance(fraction, int | float):
        return MISSING
    return f"{fraction * 100:.1f} %"


@register.filter
def rate(value: object) -> str:
    """Emails per second: 12.345 → "12.3/s"."""
    if not isinstance(value, int | float):
        return MISSING
    return f"{value:.1f}/s" if value < 100 else f"{value:,.0f}/s"


@register.filter
def duration(seconds: object) -> str:
    """An ETA: 59 → "59 s", 3725 → "1 h 2 min"; unknown → MISSING."""
    if not isinstance(seconds, int | float) or seconds < 0:
        return MISSING
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} d {hours % 24} h"


@register.filter
def pool_label(pool: str) -> str:
    return POOL_LABELS.get(pool, pool)
