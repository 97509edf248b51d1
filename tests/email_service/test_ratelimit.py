"""The global rate limit against a real Redis: rates are measured over seconds, not instants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from email_service import ratelimit
from email_service.models import RuntimeSetting
from mailroom_testkit.processes import APP_DIR, REPO, RedisServer

pytestmark = pytest.mark.django_db

BULK = "bulk"
HIGH = "high_priority"

# A bulk worker in its own process: says when Django is up, waits for the common start
# it is sent, then takes tokens as the delivery loop does (sleeping the announced wait
# when refused) and prints the wall-clock time of each grant. Sleeping, not spinning,
# keeps the share each process gets independent of how busy the machine's CPUs are.
CHILD = """
import json, sys, time
import django
django.setup()
from email_service import ratelimit
ratelimit.limits()
print("ready", flush=True)
start, end = map(float, sys.stdin.readline().split())
time.sleep(max(start - time.time(), 0))
grants = []
while (now := time.time()) < end:
    if ratelimit.wait_for_tokens("bulk", max_wait=end - now) == 0.0:
        grants.append(time.time())
print(json.dumps(grants))
"""


def _drain(queue: str = BULK) -> int:
    """Take tokens until refused: the bucket is then empty, whatever came before."""
    taken = 0
    while ratelimit.acquire(queue) == 0.0:
        taken += 1
        assert taken < 100_000, "the limiter grants without limit"
    return taken


def _rate(seconds: float) -> float:
    """Bulk grants per second in a tight loop, starting from an empty bucket."""
    _drain()
    granted = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if ratelimit.acquire(BULK) == 0.0:
            granted += 1
    return granted / seconds


def _child_env() -> dict[str, str]:
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": os.pathsep.join([str(APP_DIR), str(REPO)]),
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "MAILROOM_RATE_LIMIT_PER_SECOND": "50",
            "MAILROOM_RATE_RESERVED_TRANSACTIONAL": "0",
        }
    )
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _run_children(count: int, seconds: float) -> tuple[float, float, list[list[float]]]:
    """Start ``count`` children, let them all loop for the same ``seconds``."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            cwd=APP_DIR,
            env=_child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", "a child did not start"
        start = time.time() + 0.2
        end = start + seconds
        for child in children:  # every child gets the start before any is waited for
            assert child.stdin is not None
            child.stdin.write(f"{start} {end}\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=seconds + 30)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert all(child.returncode == 0 for child in children), "a child process failed"
    return start, end, [json.loads(out) for out in outputs]


def test_two_processes_share_one_limit_of_50_per_second() -> None:
    ratelimit.limits()  # writes the limits mirror, so the children need no database
    start, end, grants = _run_children(2, 5.5)

    # The first half second spends the initial burst; after it, the refill rate shows.
    window = [[t for t in times if t >= start + 0.5] for times in grants]
    total = sum(len(times) for times in window)
    rate = total / (end - start - 0.5)
    assert 45 <= rate <= 55, f"observed {rate:.1f}/s for a limit of 50/s"
    assert min(len(times) for times in window) > 0.2 * total, "one process starved the other"


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=100, MAILROOM_RATE_RESERVED_TRANSACTIONAL=0.2)
def test_bulk_leaves_the_reserve_and_transactional_never_waits() -> None:
    rate = _rate(2.0)
    assert 72 <= rate <= 88, f"bulk got {rate:.1f}/s of 100/s with 20% reserved"
    assert ratelimit.effective_bulk_rate() == pytest.approx(80)

    _drain()  # ends with a refusal: bulk is exhausted
    start = time.monotonic()
    waits = [ratelimit.acquire(HIGH) for _ in range(50)]
    assert waits == [0.0] * 50
    assert time.monotonic() - start < 0.5


@override_settings(
    MAILROOM_RATE_LIMIT_PER_SECOND=0,
    MAILROOM_RATE_LIMIT_PER_HOUR=100,
    MAILROOM_RATE_RESERVED_TRANSACTIONAL=0.1,
)
def test_a_per_hour_limit_gives_bulk_its_share_then_a_sensible_wait() -> None:
    assert _drain() == 90
    wait = ratelimit.acquire(BULK)
    # Bulk's share refills at 90/h: one token every 40 s.
    assert 35 <= wait <= 40.5
    assert [ratelimit.acquire(HIGH) for _ in range(10)] == [0.0] * 10
    assert ratelimit.effective_bulk_rate() == pytest.approx(90 / 3600)


@override_settings(
    MAILROOM_RATE_LIMIT_PER_SECOND=0,
    MAILROOM_RATE_LIMIT_PER_HOUR=100,
    MAILROOM_RATE_RESERVED_TRANSACTIONAL=0.1,
)
def test_transactional_sends_count_against_the_hour_so_bulk_leaves_room() -> None:
    for _ in range(20):
        assert ratelimit.acquire(HIGH) == 0.0
    assert _drain() == 70, "bulk stops where 10 of the 100 are left for transactional"
    hour = _bucket("hour", "all")
    assert hour["available"] == pytest.approx(10, abs=0.1)
    assert hour["reserve"] == pytest.approx(10)


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=10, MAILROOM_RATE_RESERVED_TRANSACTIONAL=0)
def test_a_refused_acquire_returns_a_wait_and_takes_nothing() -> None:
    assert ratelimit.acquire(BULK, 7) == 0.0
    wait = ratelimit.acquire(BULK, 5)
    assert 0.1 < wait <= 0.2, "2 tokens short at 10/s"
    assert ratelimit.acquire(BULK, 3) == 0.0, "the refused request took nothing"
    assert ratelimit.acquire(BULK) > 0
    assert ratelimit.status()["waits_total"] == 2


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=10, MAILROOM_RATE_RESERVED_TRANSACTIONAL=0)
def test_a_request_bigger_than_the_burst_is_granted_once_and_paid_back() -> None:
    assert ratelimit.acquire(BULK, 25) == 0.0, "a full bucket grants even a big batch"
    wait = ratelimit.acquire(BULK)
    assert 1.5 < wait <= 1.6, "the debt of 15 tokens is paid back at 10/s first"


@override_settings(
    MAILROOM_RATE_LIMIT_PER_SECOND=100,
    MAILROOM_RATE_RESERVED_TRANSACTIONAL=0,
    MAILROOM_THROTTLE_COOLDOWN_SECONDS=2.5,
)
def test_a_throttling_reply_slows_bulk_for_the_cooldown_then_it_recovers() -> None:
    assert ratelimit.effective_bulk_rate() == pytest.approx(100)
    ratelimit.note_throttle()
    ratelimit.note_throttle()  # the same burst of replies: one cut only
    throttled_at = time.monotonic()

    assert ratelimit.throttle_factor() == 0.5
    assert ratelimit.effective_bulk_rate() == pytest.approx(50)
    rate = _rate(1.5)
    assert 42 <= rate <= 58, f"throttled bulk got {rate:.1f}/s, expected 50/s"

    time.sleep(max(2.6 - (time.monotonic() - throttled_at), 0))
    assert ratelimit.throttle_factor() == 1.0
    rate = _rate(1.0)
    assert 90 <= rate <= 110, f"recovered bulk got {rate:.1f}/s, expected 100/s"


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=100, MAILROOM_THROTTLE_COOLDOWN_SECONDS=0.4)
def test_the_factor_has_a_floor_and_doubles_per_quiet_cooldown(
    monkeypatch: pytest.MonkeyPatch, redis_server: redis.Redis
) -> None:
    monkeypatch.setattr(ratelimit, "THROTTLE_SETTLE_SECONDS", 0)
    for _ in range(5):
        ratelimit.note_throttle()
    seen = [ratelimit.throttle_factor()]
    deadline = time.monotonic() + 5
    while seen[-1] < 1 and time.monotonic() < deadline:
        time.sleep(0.03)
        if (factor := ratelimit.throttle_factor()) != seen[-1]:
            seen.append(factor)

    assert seen == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert ratelimit.status()["throttles_total"] == 5
    assert 0 < redis_server.pttl(ratelimit.THROTTLE_KEY) <= 1000, "the state expires soon"


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=100, MAILROOM_RATE_RESERVED_TRANSACTIONAL=0)
def test_set_limits_changes_the_rate_at_once_and_survives_a_flush(
    redis_server: redis.Redis,
) -> None:
    assert 90 <= _rate(0.5) <= 110

    assert ratelimit.set_limits(per_second=20).per_second == 20
    assert 17 <= _rate(1.0) <= 23
    assert RuntimeSetting.objects.get(name="rate_limits").value == {"per_second": 20}

    redis_server.flushall()
    assert 17 <= _rate(1.0) <= 23, "restored from Postgres by the token script"
    redis_server.flushall()
    assert ratelimit.limits().per_second == 20
    assert redis_server.exists(ratelimit.LIMITS_KEY)

    updated = ratelimit.set_limits(per_hour=5000)
    assert (updated.per_second, updated.per_hour, updated.per_day) == (20, 5000, 0)
    assert ratelimit.reset_limits().per_second == 100
    assert ratelimit.limits() == ratelimit.Limits(100, 0, 0, 0)


def test_set_limits_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="per_second"):
        ratelimit.set_limits(per_second=-1)
    with pytest.raises(ValueError, match="per_hour"):
        ratelimit.set_limits(per_hour=float("inf"))  # type: ignore[arg-type]
    assert not RuntimeSetting.objects.exists()


def test_no_limit_means_no_wait() -> None:
    assert ratelimit.limits() == ratelimit.Limits(0, 0, 0, 0.1)
    assert all(ratelimit.acquire(BULK) == 0.0 for _ in range(1000))
    assert ratelimit.effective_bulk_rate() == 0
    assert ratelimit.status()["buckets"] == []


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=10, MAILROOM_RATE_LIMIT_PER_DAY=1000)
def test_status_shows_every_bucket_and_idle_keys_expire(redis_server: redis.Redis) -> None:
    assert ratelimit.acquire(BULK, 5) == 0.0
    status = ratelimit.status()
    assert status["limits"] == {
        "per_second": 10,
        "per_hour": 0,
        "per_day": 1000,
        "reserved_transactional": 0.1,
    }
    assert _bucket("second", "bulk")["available"] == pytest.approx(4, abs=0.1)
    assert _bucket("day", "bulk")["capacity"] == pytest.approx(900)
    assert _bucket("day", "all")["available"] == pytest.approx(995, abs=0.1)
    # Each key lives until its bucket would be full again.
    assert 0 < redis_server.pttl(f"{ratelimit.PREFIX}bulk:second") <= 1600
    assert 0 < redis_server.pttl(f"{ratelimit.PREFIX}all:day") <= 433_000 + 1000


@override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=10)
def test_without_redis_bulk_waits_and_transactional_goes(redis_process: RedisServer) -> None:
    redis_process.stop()
    try:
        assert ratelimit.acquire(BULK) == ratelimit.REDIS_DOWN_WAIT_SECONDS
        assert ratelimit.acquire(HIGH) == 0.0
        ratelimit.note_throttle()  # must not raise
        assert ratelimit.throttle_factor() == 1.0
        assert ratelimit.status()["redis"] == "unreachable"
        with override_settings(MAILROOM_RATE_LIMIT_PER_SECOND=0):
            assert ratelimit.acquire(BULK) == 0.0, "no limit configured: nothing to protect"
    finally:
        redis_process.start()
    assert ratelimit.acquire(BULK) == 0.0, "the script is loaded again after the restart"


def _bucket(period: str, kind: str) -> dict[str, float]:
    buckets = ratelimit.status()["buckets"]
    assert isinstance(buckets, list)
    [found] = [b for b in buckets if b["period"] == period and b["kind"] == kind]
    return dict(found)
