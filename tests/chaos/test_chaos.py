"""The chaos scenarios at small scale: each fault against the whole system, as processes.

One stack for the module (private PostgreSQL cluster, private redis-server with AOF,
gunicorn, two bulk workers, a high_priority worker, beat, the recording sink); each test
runs one fault over its own campaign of ``RECIPIENTS`` with short windows, plus the
transactional trickle, and asserts what ``make chaos`` asserts at 20,000: nothing lost,
duplicates only within the fault's bound.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from chaos.scenario import FAULTS, Fault, run, table
from chaos.stack import PG_BIN, Stack

RECIPIENTS = 300
SCALE = 0.1

pytestmark = pytest.mark.skipif(
    not (PG_BIN / "initdb").exists() or not shutil.which("redis-server"),
    reason="needs PostgreSQL 15's initdb and redis-server",
)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack() as running:
        yield running


@pytest.mark.parametrize("fault", FAULTS, ids=[f.key for f in FAULTS])
def test_nothing_is_lost_and_duplicates_stay_within_the_bound(stack: Stack, fault: Fault) -> None:
    [row] = run(stack, RECIPIENTS, SCALE, [fault], settle_timeout=120, log=lambda _: None)

    print(table([row]))
    assert row.expected >= RECIPIENTS
    assert row.lost == 0, table([row])
    assert row.duplicated <= row.bound, table([row])
    assert row.worst_latency != float("inf"), "a transactional email never arrived"
