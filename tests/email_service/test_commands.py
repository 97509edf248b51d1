"""Management commands, run as an operator runs them: real workers, beat, an SMTP socket."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from email_service import redisstore, services
from email_service.models import Campaign, Message
from mailroom_testkit.processes import APP_DIR, Role
from mailroom_testkit.smtp_sink import SMTPSink
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _manage(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=APP_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _call(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def bulk_pool(start_role: Callable[..., Role]) -> list[Role]:
    return [
        start_role("worker", queues="high_priority,bulk", concurrency=2),
        start_role("beat"),
    ]


def test_send_campaign_wait_delivers_every_row_and_prints_the_final_counts(
    bulk_pool: list[Role], smtp_sink: SMTPSink, role_env: dict[str, str], tmp_path: Path
) -> None:
    rows = [f"reader{i}@example.com,Reader {i}" for i in range(30)]
    rows.insert(2, "not-an-address,Nobody")  # line 4 of the file
    rows.insert(10, "reader3@example.com,Again")  # a duplicate
    rows.append("also@bad@example.com,Nobody")
    csv = tmp_path / "readers.csv"
    csv.write_text("email,name\n" + "\n".join(rows) + "\n")

    run = _manage(
        role_env,
        "send_campaign",
        "--csv",
        str(csv),
        "--template",
        "newsletter",
        "--subject",
        "Hello {{ name }}",
        "--wait",
        "--interval",
        "1",
        timeout=180,
    )

    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "30 accepted, 0 suppressed, 1 duplicate(s), 2 rejected" in out
    assert "rejected line 4: " in out
    assert "rejected line 34: " in out
    assert ": 30 delivered, 0 failed, 0 suppressed, 0 cancelled, of 30" in out
    [campaign] = Campaign.objects.all()
    assert campaign.status == "completed"
    assert f"Campaign {campaign.id} completed" in out
    # Not a terminal: plain progress lines, the last one at 100%.
    progress = [line for line in run.stderr.splitlines() if line.startswith("[")]
    assert progress, run.stderr
    assert "100% 30 delivered, 0 failed, 0 remaining" in progress[-1]
    assert "\r" not in run.stderr
    copies = smtp_sink.copies()
    assert copies == {f"reader{i}@example.com": 1 for i in range(30)}
    by_address = {m.rcpt_to: m.parsed() for m in smtp_sink.received}
    assert by_address["reader7@example.com"]["Subject"] == "Hello Reader 7"


def test_ctrl_c_while_waiting_leaves_the_campaign_running(
    role_env: dict[str, str], tmp_path: Path
) -> None:
    csv = tmp_path / "few.csv"
    csv.write_text("email\nx1@example.com\nx2@example.com\n")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "send_campaign", "--csv", str(csv), "--template",
         "newsletter", "--subject", "Hi", "--wait"],
        cwd=APP_DIR, env=role_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # no worker runs: the campaign cannot finish
        assert first.startswith("["), first
        assert "2 remaining" in first, first
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    [campaign] = Campaign.objects.all()
    assert f"Campaign {campaign.id} is still sending" in err
    assert "keeps going" in err
    assert campaign.status == "sending"
    assert Message.objects.filter(campaign=campaign, status="queued").count() == 2
    assert "Traceback" not in err


def test_bad_arguments_exit_non_zero_with_one_line_and_store_nothing(
    role_env: dict[str, str], tmp_path: Path
) -> None:
    good = tmp_path / "good.csv"
    good.write_text("email\nann@example.com\n")
    no_email = tmp_path / "no-email.csv"
    no_email.write_text("name,address\nAnn,ann@example.com\n")
    strict = tmp_path / "strict.csv"
    strict.write_text("email\nann@example.com\nnope\n")
    base = ["--template", "newsletter", "--subject", "Hi"]
    cases = [
        (["send_campaign", "--csv", str(tmp_path / "missing.csv"), *base], "no such file"),
        (["send_campaign", "--csv", str(good), "--template", "nope", "--subject", "Hi"],
         "template: unknown template 'nope'"),
        (["send_campaign", "--csv", str(no_email), *base], "no 'email' column"),
        (["send_campaign", "--csv", str(tmp_path), *base], "no such file"),
        (["send_campaign", "--csv", str(good), "--template", "newsletter"],
         "the following arguments are required: --subject"),
        (["send_email", "--to", "ann@example.com", "--subject", "Hi", "--template", "welcome",
          "--context", "{nope"], "--context is not valid JSON"),
        (["send_email", "--to", "nobody", "--subject", "Hi", "--template", "welcome"],
         "to: 'nobody' is not a valid email address"),
        (["retry_failed", "not-a-uuid"], "'not-a-uuid' is not a campaign id"),
        (["retry_failed", "00000000-0000-0000-0000-000000000000"], "no campaign has id"),
    ]  # fmt: skip
    for args, reason in cases[:3]:
        run = _manage(role_env, *args)
        assert run.returncode != 0, args
        assert run.stdout == ""
        assert run.stderr.count("\n") == 1, run.stderr
        assert reason in run.stderr
    for args, reason in cases[3:]:
        with pytest.raises(CommandError, match=reason):
            _call(*args)
    # Strict mode prints the report (which lines are bad), then refuses the whole file.
    out = io.StringIO()
    with pytest.raises(CommandError, match="--strict: 1 invalid row"):
        call_command("send_campaign", "--csv", str(strict), *base, "--strict", stdout=out)
    assert "rejected line 3: " in out.getvalue()
    assert Campaign.objects.count() == 0
    assert Message.objects.count() == 0


def test_send_campaign_refuses_a_csv_of_1700_columns_in_one_line_and_stores_nothing(
    role_env: dict[str, str], tmp_path: Path
) -> None:
    # It was a traceback (psycopg TooManyColumns from the staging table).
    wide = tmp_path / "wide.csv"
    header = ",".join(["email", *(f"var{i}" for i in range(1_699))])
    wide.write_text(f"{header}\nann@example.com{',x' * 1_699}\n")
    run = _manage(
        role_env, "send_campaign", "--csv", str(wide), "--template", "newsletter", "--subject", "Hi"
    )
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1, run.stderr
    assert "the header has 1,700 columns: at most 200 besides 'email'" in run.stderr
    assert "Traceback" not in run.stderr
    assert Campaign.objects.count() == 0
    assert Message.objects.count() == 0


def test_send_email_prints_the_message_id_and_a_worker_delivers_it(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    context = json.dumps({"name": "Ann", "action_url": "https://app.example.com/start"})
    message_id = _call(
        "send_email", "--to", "ann@example.com", "--subject", "Welcome", "--template", "welcome",
        "--context", context, "--from", "Team <team@example.com>",
    ).strip()  # fmt: skip
    bulk_id = _call(
        "send_email", "--to", "bob@example.com", "--subject", "News", "--template", "newsletter",
        "--queue", "bulk",
    ).strip()  # fmt: skip

    wait_for(lambda: smtp_sink.count() == 2, 60, "two deliveries")
    message = Message.objects.get(id=message_id)
    assert (message.to_email, message.queue, message.status) == (
        "ann@example.com",
        "high_priority",
        "sent",
    )
    assert Message.objects.get(id=bulk_id).queue == "bulk"
    mail = {m.rcpt_to: m.parsed() for m in smtp_sink.received}["ann@example.com"]
    assert mail["From"] == "Team <team@example.com>"
    assert "Welcome, Ann" in mail.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def test_pause_bulk_holds_bulk_mail_and_resume_bulk_redispatches_it(
    running_worker: Role, smtp_sink: SMTPSink
) -> None:
    out = _call("pause_bulk")
    assert "Bulk sending is paused" in out
    assert "already" in _call("pause_bulk")
    assert services.is_bulk_paused()
    services.send_bulk_batch([f"p{i}@example.com" for i in range(3)], "News", {}, "newsletter")
    services.send_email(to="urgent@example.com", subject="Reset", template="welcome")

    wait_for(lambda: smtp_sink.count() == 1, 30, "the transactional email")
    # The worker took the bulk batch, saw the pause and left its rows queued.
    wait_for(lambda: not redisstore.client().keys("mailroom:dispatch:*"), 30, "the bulk task")
    assert smtp_sink.copies() == {"urgent@example.com": 1}
    assert Message.objects.filter(queue="bulk", status="queued").count() == 3

    out = _call("resume_bulk")
    assert "Bulk sending is running; 3 message(s) re-dispatched." in out
    wait_for(lambda: smtp_sink.count() == 4, 30, "the bulk mail")
    assert not services.is_bulk_paused()
    assert "(it was not paused); 0 message(s) re-dispatched" in _call("resume_bulk")


def test_retry_failed_requeues_the_failed_recipients_of_a_campaign(
    bulk_pool: list[Role], smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_address("picky@example.com", "554 5.7.1 Policy rejection")
    campaign = services.create_campaign(name="retry", subject="Hi", template="newsletter")
    services.add_recipients(
        campaign,
        [{"email": "picky@example.com"}] + [{"email": f"ok{i}@example.com"} for i in range(4)],
    )
    services.start_campaign(campaign)
    wait_for(lambda: Campaign.objects.get(id=campaign.id).status == "completed", 60, "completion")
    assert services.campaign_progress(campaign)["failed"] == 1

    assert "No failed message" in _call("retry_failed", str(campaign.id), "--class", "4xx")
    with smtp_sink.lock:
        smtp_sink.state.rules.clear()
    out = _call("retry_failed", str(campaign.id), "--code", "554")
    assert "1 failed message(s) of campaign 'retry' re-queued; the campaign is sending." in out

    wait_for(lambda: smtp_sink.copies().get("picky@example.com") == 1, 60, "the retried send")
    wait_for(
        lambda: Campaign.objects.get(id=campaign.id).status == "completed", 30, "completion again"
    )
    assert services.campaign_progress(campaign)["sent"] == 5
    with pytest.raises(CommandError, match="--code 42 is not an SMTP reply code"):
        _call("retry_failed", str(campaign.id), "--code", "42")
