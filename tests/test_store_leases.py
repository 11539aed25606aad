"""LeaseTimers: the driver-side TTL countdown, as timelines of calls and expected answers."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from agentcluster.store._leases import LeaseTimers

# Each step: (method, args, expected return). ``now`` is always the last argument.
Step = tuple[str, tuple[Any, ...], Any]

SCENARIOS: dict[str, list[Step]] = {
    "a lease expires at exactly now + ttl": [
        ("grant", (1, 5.0, 0.0), None),
        ("next_deadline", (), 5.0),
        ("expired", (4.999,), []),
        ("expired", (5.0,), [1]),
    ],
    "a keep-alive restarts the full ttl": [
        ("grant", (1, 5.0, 0.0), None),
        ("keepalive", (1, 4.0), True),
        ("next_deadline", (), 9.0),
        ("expired", (8.9,), []),
        ("expired", (9.0,), [1]),
    ],
    "a keep-alive at or after the deadline is refused": [
        ("grant", (1, 5.0, 0.0), None),
        ("keepalive", (1, 5.0), False),
        ("expired", (5.0,), [1]),
        ("keepalive", (1, 6.0), False),
    ],
    "an unknown or forgotten lease cannot be kept alive": [
        ("keepalive", (7, 0.0), False),
        ("grant", (7, 1.0, 0.0), None),
        ("forget", (7,), None),
        ("keepalive", (7, 0.5), False),
        ("expired", (10.0,), []),
        ("next_deadline", (), math.inf),
    ],
    "expired leases come out sorted, whatever the deadline order": [
        ("grant", (3, 1.0, 0.0), None),
        ("grant", (1, 3.0, 0.0), None),
        ("grant", (2, 2.0, 0.0), None),
        ("grant", (4, 9.0, 0.0), None),
        ("expired", (3.5,), [1, 2, 3]),
    ],
    "a reported lease is reported again after the retry interval until forgotten": [
        ("grant", (1, 2.0, 0.0), None),
        ("expired", (2.0,), [1]),
        ("next_deadline", (), 3.0),  # retry_interval = 1.0
        ("expired", (2.9,), []),
        ("expired", (3.0,), [1]),
        ("forget", (1,), None),
        ("expired", (100.0,), []),
        ("next_deadline", (), math.inf),
    ],
    "a re-grant replaces the old deadline": [
        ("grant", (1, 5.0, 0.0), None),
        ("grant", (1, 2.0, 1.0), None),
        ("expired", (2.9,), []),
        ("expired", (3.0,), [1]),
        ("forget", (1,), None),
        ("expired", (5.0,), []),  # the old deadline left nothing behind
    ],
    "reset_all restarts every lease from now and drops the rest": [
        ("grant", (1, 5.0, 0.0), None),
        ("grant", (2, 5.0, 0.0), None),
        ("expired", (5.0,), [1, 2]),
        ("reset_all", ({2: 5.0, 3: 1.0}, 10.0), None),
        ("keepalive", (1, 10.0), False),
        ("next_deadline", (), 11.0),
        ("expired", (11.0,), [3]),
        ("forget", (3,), None),
        ("expired", (14.9,), []),
        ("expired", (15.0,), [2]),
    ],
}


@pytest.mark.parametrize("steps", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_scenario(steps: list[Step]) -> None:
    timers = LeaseTimers(retry_interval=1.0)
    for i, (method, args, expected) in enumerate(steps):
        assert getattr(timers, method)(*args) == expected, f"step {i}: {method}{args}"


def test_bookkeeping_accessors() -> None:
    timers = LeaseTimers()
    timers.grant(4, 2.0, 1.0)
    assert 4 in timers and len(timers) == 1
    assert timers.ttl(4) == 2.0 and timers.deadline(4) == 3.0
    assert timers.ttl(5) is None and timers.deadline(5) is None


@pytest.mark.parametrize("ttl", [0.0, -1.0, math.nan])
def test_grant_rejects_nonpositive_ttl(ttl: float) -> None:
    with pytest.raises(ValueError):
        LeaseTimers().grant(1, ttl, 0.0)


def test_many_keepalives_keep_the_heap_small_and_answers_exact() -> None:
    rng = random.Random(7)
    timers = LeaseTimers()
    now = 0.0
    for lease_id in range(10):
        timers.grant(lease_id, 10.0, now)
    for _ in range(10_000):
        now += 0.01
        assert timers.keepalive(rng.randrange(10), now)
        assert timers.expired(now) == []
    assert len(timers._heap) <= 4 * 10 + 64
    last = max(d for i in range(10) if (d := timers.deadline(i)) is not None)
    assert timers.next_deadline() == min(timers.deadline(i) or math.inf for i in range(10))
    assert timers.expired(last) == list(range(10))


def test_same_calls_same_answers() -> None:
    def trace(seed: int) -> list[object]:
        rng = random.Random(seed)
        timers = LeaseTimers(retry_interval=0.5)
        out: list[object] = []
        now = 0.0
        for _ in range(500):
            now += rng.random()
            roll = rng.random()
            lease_id = rng.randrange(20)
            if roll < 0.3:
                timers.grant(lease_id, rng.choice([1.0, 2.0, 5.0]), now)
            elif roll < 0.6:
                out.append(timers.keepalive(lease_id, now))
            elif roll < 0.7:
                timers.forget(lease_id)
            else:
                out.append(timers.expired(now))
            out.append(timers.next_deadline())
        return out

    assert trace(3) == trace(3)
