"""``manage.py send_campaign --csv FILE --template NAME --subject S [--name N] [--from ADDR]
[--strict] [--wait]``: create a campaign from a CSV file, start it, and optionally watch
it to the end.

The CSV has a header row with an ``email`` column; every other column (at most
``ingest.MAX_CONTEXT_COLUMNS``, 200) becomes that recipient's template context. The
campaign is created and the file ingested in one transaction: a missing or unusable file
(a header with too many columns included), an unknown template or (with ``--strict``) any
invalid row stores nothing.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from email_service import services
from email_service.exceptions import InvalidEmailRequest
from email_service.ingest import IngestReport
from email_service.models import Campaign

SHOWN_ERRORS = 20
POLL_SECONDS = 0.5
RATE_WINDOW_SECONDS = 10.0
BAR_WIDTH = 20
ENDED = (Campaign.Status.COMPLETED, Campaign.Status.CANCELLED)


class Command(BaseCommand):
    help = "Create a campaign from a CSV file and start it; --wait shows its progress."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.called_from_command_line = False  # bad arguments: one line, not the usage
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--csv", required=True, help="a CSV file with an 'email' column")
        parser.add_argument("--template", required=True, help="emails/<NAME>.html")
        parser.add_argument("--subject", required=True, help="may use the CSV columns: {{ name }}")
        parser.add_argument("--name", default=None, help="default: the file's name")
        parser.add_argument("--from", dest="from_email", default=None, help="the sender")
        parser.add_argument(
            "--strict", action="store_true", help="any invalid row refuses the whole file"
        )
        parser.add_argument(
            "--wait", action="store_true", help="show progress until the campaign ends"
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=5.0,
            help="seconds between progress lines when stderr is not a terminal (default 5)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["csv"])
        if not path.is_file():
            raise CommandError(f"--csv {path}: no such file")
        if options["interval"] <= 0:
            raise CommandError("--interval must be a positive number of seconds")
        try:
            stream = path.open("rb")
        except OSError as exc:
            raise CommandError(f"--csv {path}: cannot read it: {exc.strerror or exc}") from None
        name = options["name"] or path.name
        try:
            with stream:
                campaign, report = services.launch_campaign(
                    name=name,
                    subject=options["subject"],
                    template=options["template"],
                    from_email=options["from_email"],
                    add=lambda c: services.add_recipients(c, stream, strict=options["strict"]),
                )
        except services.NotLaunched as exc:
            if exc.report is not None:
                self._print_report(name, None, exc.report)
            strict = exc.report is not None and not exc.report.stored
            message = f"--strict: {exc.message}" if strict else f"{exc.message}; nothing stored"
            raise CommandError(message) from None
        except InvalidEmailRequest as exc:
            raise CommandError(str(exc)) from None
        assert report is not None
        self._print_report(name, campaign.id, report)
        self.stdout.write(f"Campaign {campaign.id} is {campaign.status}.")
        if options["wait"]:
            self._wait(campaign, options["interval"])

    def _print_report(self, name: str, campaign_id: object, report: IngestReport) -> None:
        stored = f" ({campaign_id})" if campaign_id else ""
        self.stdout.write(
            f"Campaign {name!r}{stored}: {report.accepted} accepted, "
            f"{report.suppressed} suppressed, {report.duplicates} duplicate(s), "
            f"{report.invalid} rejected."
        )
        for error in report.errors[:SHOWN_ERRORS]:
            self.stdout.write(f"  rejected {error}")
        if report.invalid > SHOWN_ERRORS:
            self.stdout.write(f"  ... and {report.invalid - SHOWN_ERRORS} more rejected row(s)")

    # --- waiting -------------------------------------------------------------------

    def _wait(self, campaign: Campaign, interval: float) -> None:
        tty = self.stderr.isatty()
        started = time.monotonic()
        samples: deque[tuple[float, int]] = deque()
        last_line = float("-inf")
        try:
            while True:
                campaign.refresh_from_db(fields=["status", "status_reason", "started_at"])
                progress = services.campaign_progress(campaign)
                now = time.monotonic()
                rate = _rate(samples, now, progress, campaign)
                if tty:
                    width = shutil.get_terminal_size().columns - 1
                    line = _progress_line(progress, rate, width)
                    self.stderr.write("\r" + line[:width] + "\x1b[K", _plain, ending="")
                    self.stderr.flush()
                elif now - last_line >= interval or campaign.status in ENDED:
                    self.stderr.write(_progress_line(progress, rate), _plain)
                    last_line = now
                if campaign.status in ENDED:
                    break
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            if tty:
                self.stderr.write("", _plain)
            self.stderr.write(
                f"Stopped watching. Campaign {campaign.id} is still {campaign.status} and keeps "
                f"going without this command; `manage.py pause_bulk` pauses all bulk sending.",
                _plain,
            )
            sys.exit(130)
        if tty:
            self.stderr.write("", _plain)
        self._print_final(campaign, progress, time.monotonic() - started)

    def _print_final(self, campaign: Campaign, progress: dict[str, Any], elapsed: float) -> None:
        self.stdout.write(
            f"Campaign {campaign.id} {campaign.status}: {progress['sent']} delivered, "
            f"{progress['failed']} failed, {progress['suppressed']} suppressed, "
            f"{progress['cancelled']} cancelled, of {progress['total']} ({elapsed:.1f} s)."
        )
        if campaign.status == Campaign.Status.CANCELLED:
            raise CommandError(f"campaign {campaign.id} was cancelled ({campaign.status_reason})")
        if progress["failed"]:
            self.stdout.write(f"Retry the failed ones with `manage.py retry_failed {campaign.id}`.")


def _plain(text: str) -> str:
    """Progress is not an error: no red even when stderr is a terminal."""
    return text


def _rate(
    samples: deque[tuple[float, int]], now: float, progress: dict[str, Any], campaign: Campaign
) -> float:
    """Messages finished per second over the last few seconds; until this command has
    watched for a second, the average since the campaign started."""
    finished = int(progress["sent"]) + int(progress["failed"])
    samples.append((now, finished))
    while now - samples[0][0] > RATE_WINDOW_SECONDS:
        samples.popleft()
    first_time, first_finished = samples[0]
    if now - first_time >= 1.0:
        return (finished - first_finished) / (now - first_time)
    if campaign.started_at is None:
        return 0.0
    running = (timezone.now() - campaign.started_at).total_seconds()
    return finished / running if running > 0 else 0.0


def _progress_line(progress: dict[str, Any], rate: float, width: int = 0) -> str:
    """``[#####-----]  50% 10 delivered, 0 failed, 10 remaining, 4.2/s, ETA 2s``; the bar
    shrinks to fit ``width`` (a terminal's) when one is given."""
    total = int(progress["total"]) or 1
    remaining = int(progress["remaining"])
    done = total - remaining
    eta = "0s" if not remaining else _duration(remaining / rate) if rate > 0 else "?"
    text = (
        f"{100 * done // total:3d}% {progress['sent']} delivered, {progress['failed']} failed, "
        f"{remaining} remaining, {rate:.1f}/s, ETA {eta}"
    )
    bar_width = max(5, min(BAR_WIDTH, width - len(text) - 3)) if width else BAR_WIDTH
    filled = bar_width * done // total
    return f"[{'#' * filled}{'-' * (bar_width - filled)}] {text}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
