"""Circuit breaker state machine: each test names the rule it checks."""

from __future__ import annotations

import random

import pytest

from agentcluster.balancing.breaker import (
    BreakerConfig,
    Breakers,
    BreakerState,
    CircuitBreaker,
    StateChange,
)

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
EXACT = BreakerConfig(jitter=0.0)  # open times are exact: base_open * 2**(k-1)


def _breaker(config: BreakerConfig = EXACT, seed: int = 1) -> CircuitBreaker:
    return CircuitBreaker("n1", random.Random(seed), config)


def _feed(
    b: CircuitBreaker, outcomes: str, t: float, dt: float = 0.01
) -> tuple[float, list[StateChange]]:
    """Record 'o' (ok) / 'x' (failure) outcomes dt apart; the changes they caused."""
    changes: list[StateChange] = []
    for c in outcomes:
        change = b.record(c == "o", t)
        if change is not None:
            changes.append(change)
        t += dt
    return t, changes


@pytest.mark.parametrize(
    ("rule", "outcomes", "state", "reason"),
    [
        ("4 consecutive failures keep it closed", "xxxx", CLOSED, None),
        ("the 5th consecutive failure opens", "xxxxx", OPEN, "consecutive_failures"),
        ("a success resets the streak", "xxxxoxxxx", CLOSED, None),
        ("a streak after a success still opens", "oxxxxx", OPEN, "consecutive_failures"),
        # Alternating: never 5 in a row; the 21st outcome is a failure with 11/21 failed.
        ("failure rate >= 50% over >= 20 opens", "xo" * 10 + "x", OPEN, "failure_rate"),
        ("failure rate under min_requests stays closed", "xo" * 9 + "x", CLOSED, None),
        ("failure rate below 50% stays closed", "xoo" * 10, CLOSED, None),
    ],
)
def test_opening_rules(rule: str, outcomes: str, state: BreakerState, reason: str | None) -> None:
    b = _breaker()
    _, changes = _feed(b, outcomes, 0.0)
    assert b.state(0.5) is state, rule
    assert [c.reason for c in changes] == ([reason] if reason else []), rule


def test_failure_rate_window_slides() -> None:
    # Rule: only the last `window` seconds count: 15 failures spread over 30 s never make 20
    # outcomes inside one 10 s window.
    b = _breaker(BreakerConfig(jitter=0.0, consecutive_failures=100))
    t = 0.0
    for _ in range(30):
        assert b.record(False, t) is None
        assert b.record(True, t + 0.5) is None
        t += 2.0
    assert b.state(t) is CLOSED
    requests, failures = b.window_counts(t)
    assert requests <= 12 and failures <= 6


@pytest.mark.parametrize(
    ("opening", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (12, 60.0)],
)
def test_open_time_doubles_and_caps(opening: int, expected: float) -> None:
    # Rule: the k-th consecutive opening lasts base_open * 2**(k-1), capped at max_open.
    b = _breaker()
    t = 0.0
    duration = 0.0
    for _ in range(opening):
        _, changes = _feed(b, "xxxxx" if b.state(t) is CLOSED else "", t)
        if not changes:  # half-open: one probe fails
            assert b.allow(t)
            change = b.record(False, t)
            assert change is not None
            changes = [change]
        duration = changes[-1].until - changes[-1].at
        t = changes[-1].until
    assert duration == pytest.approx(expected)
    assert b.openings == opening


def test_jittered_open_time_stays_within_bounds_and_varies() -> None:
    # Rule: +/-20 % jitter around the nominal time; the cap is a hard bound.
    cfg = BreakerConfig()
    first: list[float] = []
    capped: list[float] = []
    for seed in range(200):
        b = _breaker(cfg, seed)
        _, changes = _feed(b, "xxxxx", 0.0)
        first.append(changes[-1].until - changes[-1].at)
        t = changes[-1].until
        for k in range(10):  # push the exponent past the cap (the 7th opening reaches it)
            assert b.allow(t)
            change = b.record(False, t)
            assert change is not None
            if k >= 6:
                capped.append(change.until - change.at)
            t = change.until
    assert all(0.8 <= d <= 1.2 for d in first)
    assert max(first) - min(first) > 0.3  # spread, not a constant
    # At the cap: nominal max_open / 1.2 = 50 s, jittered to [40, 60], never above 60.
    assert all(40.0 - 1e-9 <= d <= cfg.max_open + 1e-9 for d in capped)
    assert max(capped) > 58.0 and min(capped) < 42.0


def test_same_seed_same_schedule() -> None:
    # Rule: jitter comes only from the caller's rng, so a seed replays exactly.
    def run() -> float:
        b = _breaker(BreakerConfig(), seed=42)
        _, changes = _feed(b, "xxxxx", 3.0)
        return changes[-1].until

    assert run() == run()


def test_half_open_admits_exactly_the_probes_then_closes() -> None:
    # Rule: half-open lets half_open_probes requests through; all succeeding closes the
    # breaker and resets the backoff.
    b = _breaker()
    _feed(b, "xxxxx", 0.0)
    assert not b.allow(0.5)
    assert b.state(1.1) is HALF
    assert [b.allow(1.1) for _ in range(4)] == [True, True, True, False]
    assert b.record(True, 1.2) is None
    assert b.record(True, 1.2) is None
    change = b.record(True, 1.3)
    assert change is not None and (change.old, change.new, change.reason) == (
        HALF,
        CLOSED,
        "probes_ok",
    )
    assert b.state(1.3) is CLOSED and b.openings == 0 and b.allow(1.3)
    _, changes = _feed(b, "xxxxx", 2.0)
    assert changes[-1].until - changes[-1].at == pytest.approx(1.0)  # backoff was reset


def test_an_abandoned_probe_frees_its_slot_and_decides_nothing() -> None:
    # Rule: a probe abandoned without an outcome (its caller was cancelled) is handed back:
    # the next request may probe instead; released twice, or outside half-open, it is a no-op.
    b = _breaker()
    b.release()  # closed: nothing to hand back
    assert b.state(0.0) is CLOSED
    _feed(b, "xxxxx", 0.0)
    assert [b.allow(1.1) for _ in range(4)] == [True, True, True, False]
    b.release()
    assert b.snapshot(1.1)["probes_left"] == 1 and b.state(1.1) is HALF
    assert b.allow(1.1) and not b.allow(1.1)
    for _ in range(3):
        b.record(True, 1.2)
    assert b.state(1.2) is CLOSED
    b.release()
    assert b.state(1.2) is CLOSED and b.allow(1.2)


def test_only_this_periods_probes_count_with_tickets() -> None:
    # Rule: with tickets, a request let through while closed is no probe -- its outcome or
    # cancellation in half-open neither frees a probe slot nor counts as a probe's result --
    # and a probe of an earlier half-open period counts for nothing in the next one.
    b = _breaker()
    assert b.allow(0.0) and b.last_ticket == 0  # A: sent while closed
    closed_ticket = b.last_ticket
    _feed(b, "xxxxx", 0.0)
    tickets = []
    for _ in range(3):
        assert b.allow(1.1)
        tickets.append(b.last_ticket)
    assert not b.allow(1.1) and b.last_ticket == 0
    assert len(set(tickets)) == 1 and tickets[0] > 0
    b.release(closed_ticket)  # A's caller gives up: no probe slot comes free
    assert b.snapshot(1.1)["probes_left"] == 0
    assert b.record(False, 1.15, closed_ticket) is None  # A's late failure: not a probe's
    assert b.state(1.15) is HALF
    b.release(tickets[0])  # a real probe abandoned: its slot is free again
    assert b.snapshot(1.15)["probes_left"] == 1
    change = b.record(False, 1.2, tickets[1])  # a real probe fails: open again
    assert change is not None and change.new is OPEN
    assert b.allow(3.3) and b.last_ticket > tickets[0]  # the next half-open period
    assert b.record(False, 3.35, tickets[2]) is None  # the old period's probe: ignored
    assert b.state(3.35) is HALF


def test_half_open_failure_reopens_for_longer() -> None:
    # Rule: any failed probe re-opens the breaker with the next (doubled) open time.
    b = _breaker()
    _feed(b, "xxxxx", 0.0)
    assert b.allow(1.1) and b.allow(1.1)
    assert b.record(True, 1.15) is None
    change = b.record(False, 1.2)
    assert change is not None and (change.old, change.new, change.reason) == (
        HALF,
        OPEN,
        "probe_failed",
    )
    assert change.until == pytest.approx(1.2 + 2.0)
    assert not b.allow(3.0) and b.allow(3.2)


@pytest.mark.parametrize(
    ("rule", "setup"),
    [
        ("a late reply while open is ignored", "open"),
        ("a reply in half-open without a probe out is ignored", "half_open_no_probe"),
    ],
)
def test_late_replies_are_ignored(rule: str, setup: str) -> None:
    b = _breaker()
    _feed(b, "xxxxx", 0.0)
    if setup == "open":
        assert b.record(True, 0.5) is None and b.record(False, 0.5) is None, rule
        assert b.state(0.5) is OPEN and b.open_until == pytest.approx(0.04 + 1.0)
    else:
        assert b.tick(1.5) is not None
        assert b.record(True, 1.5) is None and b.record(False, 1.5) is None, rule
        assert b.state(1.5) is HALF


def test_breakers_collection_tick_deadline_eligibility_snapshot() -> None:
    breakers = Breakers(random.Random(3), EXACT)
    assert breakers.allow("a", 0.0) and breakers.eligible("a", 0.0)
    assert breakers.next_deadline() is None
    for i in range(5):
        breakers.record("a", False, 0.1 * i)
    breakers.record("b", True, 0.0)
    assert breakers.open_nodes(0.5) == ["a"]
    assert not breakers.eligible("a", 0.5) and breakers.eligible("b", 0.5)
    deadline = breakers.next_deadline()
    assert deadline == pytest.approx(1.4)
    assert breakers.tick(1.3) == []
    [change] = breakers.tick(1.4)
    assert (change.node, change.old, change.new) == ("a", OPEN, HALF)
    assert breakers.eligible("a", 1.4) and breakers.next_deadline() is None
    snap = breakers.snapshot(1.4)
    assert [s["node"] for s in snap] == ["a", "b"]
    assert snap[0]["state"] == "half_open" and snap[0]["probes_left"] == 3
    assert snap[1]["state"] == "closed" and snap[1]["window_requests"] == 1
    breakers.remove("a")
    assert "a" not in breakers and len(breakers) == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        BreakerConfig(consecutive_failures=0)
    with pytest.raises(ValueError):
        BreakerConfig(base_open=10.0, max_open=5.0)
    with pytest.raises(ValueError):
        BreakerConfig(failure_rate=0.0)
