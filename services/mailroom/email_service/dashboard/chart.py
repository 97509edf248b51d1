"""The throughput chart: sent and failed emails per second as an inline SVG.

Drawn on the server from :class:`figures.Throughput`, so the page needs no charting
library and shows the chart with JavaScript off; the poller swaps in a fresh one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from email_service.dashboard.figures import Throughput

WIDTH = 720
HEIGHT = 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 30


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    label_x: int  # right edge of the y labels
    label_y: int  # baseline of the x labels
    sent_area: str  # an SVG path
    sent_line: str  # polyline points
    failed_line: str
    y_ticks: list[tuple[str, str]]  # (y, label), y formatted for the SVG
    x_ticks: list[tuple[str, str]]  # (x, label)
    description: str
    sent_total: int
    failed_total: int
    sent_rate: float
    failed_rate: float


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^n at or above ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if value <= m * scale * (1 + 1e-9))


def _points(rates: list[float], top: float) -> list[tuple[float, float]]:
    span = max(len(rates) - 1, 1)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    return [
        (LEFT + plot_w * i / span, HEIGHT - BOTTOM - plot_h * min(r / top, 1.0))
        for i, r in enumerate(rates)
    ]


def _polyline(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in points)


def _rate_label(value: float) -> str:
    return f"{value:.3g}/s"


def draw(series: Throughput) -> Chart:
    sent = series.rates(series.sent)
    failed = series.rates(series.failed)
    top = nice_ceiling(max(sent + failed, default=0.0))
    sent_points = _points(sent, top)
    failed_points = _points(failed, top)
    baseline = HEIGHT - BOTTOM
    area = (
        f"M{sent_points[0][0]:.1f},{baseline} "
        + " ".join(f"L{x:.1f},{y:.1f}" for x, y in sent_points)
        + f" L{sent_points[-1][0]:.1f},{baseline} Z"
    )
    plot_h = HEIGHT - TOP - BOTTOM
    y_ticks = [(f"{baseline - plot_h * f:.1f}", _rate_label(top * f)) for f in (0.0, 0.5, 1.0)]
    minutes = len(series.sent) * series.bucket_seconds // 60
    plot_w = WIDTH - LEFT - RIGHT
    x_ticks = [
        (f"{LEFT + plot_w * (1 - m / minutes):.1f}", f"-{m} min" if m else "now")
        for m in range(minutes, -1, -5)
    ]
    sent_rate = series.recent_rate(series.sent)
    failed_rate = series.recent_rate(series.failed)
    description = (
        f"Last {minutes} minutes: {sum(series.sent):,} sent, {sum(series.failed):,} failed. "
        f"Last minute: {_rate_label(sent_rate)} sent, {_rate_label(failed_rate)} failed. "
        f"Peak: {_rate_label(max(sent, default=0.0))} sent."
    )
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        right=WIDTH - RIGHT,
        top=TOP,
        bottom=baseline,
        label_x=LEFT - 6,
        label_y=HEIGHT - 8,
        sent_area=area,
        sent_line=_polyline(sent_points),
        failed_line=_polyline(failed_points),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        description=description,
        sent_total=sum(series.sent),
        failed_total=sum(series.failed),
        sent_rate=sent_rate,
        failed_rate=failed_rate,
    )
