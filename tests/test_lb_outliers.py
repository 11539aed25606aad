"""Outlier detection: ejection rules, the small-cluster cap, ejection times, the bench scenario."""

from __future__ import annotations

import random

import pytest

from agentcluster.balancing.outliers import (
    OutlierConfig,
    OutlierDetector,
    eject_time_scenario,
    max_ejected,
)

EXACT = OutlierConfig(jitter=0.0)


def _detector(n: int, config: OutlierConfig = EXACT, seed: int = 1) -> OutlierDetector:
    d = OutlierDetector(random.Random(seed), config)
    for i in range(n):
        d.add(f"n{i}")
    return d


def _traffic(
    d: OutlierDetector,
    t: float,
    per_node: dict[str, tuple[int, float, float]],
) -> None:
    """Per node: (requests, success rate, latency), interleaved so no streaks form by accident."""
    for node, (count, rate, latency) in per_node.items():
        fails = round(count * (1.0 - rate))
        every = count / fails if fails else 0.0
        for i in range(count):
            failed = fails > 0 and int(i % every) == 0 and i // every < fails
            d.record(node, not failed, latency, t)


@pytest.mark.parametrize(
    ("n", "percent", "expected", "why"),
    [
        (0, 10.0, 0, "nothing to eject"),
        (1, 10.0, 0, "never the last node"),
        (1, 100.0, 0, "never the last node, whatever the percentage"),
        (2, 10.0, 0, "one of two would be 50 %, over the 10 % share"),
        (2, 50.0, 1, "50 % of 2"),
        (2, 100.0, 1, "never the last node"),
        (3, 10.0, 0, "one of three would be 33 %"),
        (3, 34.0, 1, "one of three is within 34 %"),
        (3, 50.0, 1, "floor(1.5)"),
        (3, 100.0, 2, "never the last node"),
        (10, 10.0, 1, "10 % of 10"),
        (10, 50.0, 5, "50 % of 10"),
        (10, 100.0, 9, "never the last node"),
        (25, 10.0, 2, "floor(2.5)"),
        (30, 10.0, 3, "10 % of 30 despite float rounding"),
        (10, 0.0, 0, "0 % turns ejection off"),
    ],
)
def test_max_ejected_table(n: int, percent: float, expected: int, why: str) -> None:
    assert max_ejected(n, percent) == expected, why
    assert expected <= n * percent / 100.0, "the share is never exceeded"


def test_the_default_share_ejects_one_node_of_two_or_three() -> None:
    # Rule: the default (50 %) keeps ejection useful in the smallest clusters.
    assert [max_ejected(n, OutlierConfig().max_ejection_percent) for n in (1, 2, 3, 10)] == [
        0,
        1,
        1,
        5,
    ]


@pytest.mark.parametrize(
    ("n", "percent", "eject", "leave", "after", "returned"),
    [
        # 2 of 20 ejected, 10 leave: the cap of 10 nodes at 10 % is 1; n0 is due back first.
        (20, 10.0, 2, 10, ["n1"], ["n0"]),
        # The peer of an ejected node leaves: never the last node.
        (2, 50.0, 1, 1, [], ["n0"]),
        # 3 -> 2 nodes: the cap stays 1, n0 stays out.
        (3, 50.0, 1, 1, ["n0"], []),
    ],
)
def test_the_cap_holds_when_nodes_leave(
    n: int, percent: float, eject: int, leave: int, after: list[str], returned: list[str]
) -> None:
    # Rule: the cap is a bound at all times; when it shrinks, the nodes due back soonest
    # return at once (reported by the next tick).
    d = _detector(n, OutlierConfig(jitter=0.0, max_ejection_percent=percent))
    for i in range(eject):
        for _ in range(5):
            d.record(f"n{i}", False, 0.01, 1.0 + i)  # later ejections end later
    assert len(d.ejected()) == eject
    for i in range(n - leave, n):
        d.remove(f"n{i}", 5.0)
        assert len(d.ejected()) <= d.max_ejected()
    assert d.ejected() == after
    events = d.tick(5.0)
    assert [(e.node, e.kind, e.reason, e.at) for e in events] == [
        (node, "return", "cap_shrank", 5.0) for node in returned
    ]
    for node in returned:  # back in rotation, its streak forgotten
        assert d.record(node, False, 0.01, 5.0) is None and not d.is_ejected(node)


@pytest.mark.parametrize("n", [1, 2, 3, 10])
@pytest.mark.parametrize("percent", [10.0, 50.0, 100.0])
def test_cap_never_exceeded_when_every_node_fails(n: int, percent: float) -> None:
    # Rule: with every node failing in a row, exactly max_ejected(n) are ejected, never all.
    d = _detector(n, OutlierConfig(jitter=0.0, max_ejection_percent=percent))
    ejected = 0
    for round_ in range(10):
        for i in range(n):
            event = d.record(f"n{i}", False, 0.01, round_ * 0.01)
            ejected += event is not None
            assert len(d.ejected()) <= max_ejected(n, percent)
    assert ejected == len(d.ejected()) == max_ejected(n, percent)
    assert len(d.ejected()) < n or n == 0
    if n >= 2:
        assert d.skipped_cap > 0


@pytest.mark.parametrize(
    ("rule", "outcomes", "ejected"),
    [
        ("4 consecutive errors: still in rotation", "xxxx", False),
        ("the 5th consecutive error ejects at once", "xxxxx", True),
        ("a success resets the streak", "xxxxoxxxx", False),
    ],
)
def test_consecutive_errors(rule: str, outcomes: str, ejected: bool) -> None:
    d = _detector(3)
    events = [d.record("n0", c == "o", 0.01, 0.001 * i) for i, c in enumerate(outcomes)]
    assert d.is_ejected("n0") is ejected, rule
    if ejected:
        assert events[-1] is not None and events[-1].reason == "consecutive_errors"
        assert events[-1].until == pytest.approx(events[-1].at + 30.0)


@pytest.mark.parametrize(
    ("rule", "hosts", "requests", "bad_rate", "ejected"),
    [
        ("an outlier among 5 hosts with volume is ejected", 5, 100, 0.70, True),
        ("fewer than min_hosts with volume: no verdict", 4, 100, 0.70, False),
        ("below min_requests: no verdict", 6, 40, 0.70, False),
        ("a 96 % success rate is above the 95 % floor: kept", 5, 100, 0.96, False),
        ("one failure in 50 against perfect peers: kept", 5, 50, 0.98, False),
    ],
)
def test_success_rate_outliers(
    rule: str, hosts: int, requests: int, bad_rate: float, ejected: bool
) -> None:
    d = _detector(hosts + 3)  # three idle nodes: known, but without volume
    traffic = {f"n{i}": (requests, 1.0, 0.01) for i in range(hosts)}
    traffic["n0"] = (requests, bad_rate, 0.01)
    _traffic(d, 1.0, traffic)
    events = d.tick(10.0)
    assert d.is_ejected("n0") is ejected, rule
    assert [e.reason for e in events] == (["success_rate"] if ejected else []), rule


@pytest.mark.parametrize(
    ("rule", "hosts", "slow", "base", "ejected"),
    [
        ("4x the median latency is ejected", 3, 0.040, 0.010, True),
        ("2x the median latency is kept", 5, 0.020, 0.010, False),
        ("under latency_floor nothing is ejected", 5, 0.004, 0.001, False),
        ("fewer than latency_min_hosts: no verdict", 2, 0.100, 0.010, False),
    ],
)
def test_latency_outliers(rule: str, hosts: int, slow: float, base: float, ejected: bool) -> None:
    d = _detector(hosts)
    traffic = {f"n{i}": (60, 1.0, base) for i in range(hosts)}
    traffic["n0"] = (60, 1.0, slow)
    _traffic(d, 1.0, traffic)
    events = d.tick(10.0)
    assert d.is_ejected("n0") is ejected, rule
    assert [e.reason for e in events] == (["latency"] if ejected else []), rule


def test_worst_outliers_go_first_under_the_cap() -> None:
    # Rule: when more nodes qualify than the cap allows, the lowest success rates go first.
    d = _detector(20, OutlierConfig(jitter=0.0, max_ejection_percent=5.0))
    traffic = {f"n{i}": (100, 1.0, 0.01) for i in range(20)}
    traffic["n3"] = (100, 0.5, 0.01)
    traffic["n7"] = (100, 0.4, 0.01)
    _traffic(d, 1.0, traffic)
    d.tick(10.0)
    assert d.ejected() == ["n7"]
    assert d.skipped_cap == 1


def test_ejection_time_grows_caps_and_decays() -> None:
    # Rule: base * k for the k-th ejection, capped at max_ejection; one interval in rotation
    # forgives one ejection.
    cfg = OutlierConfig(jitter=0.0, base_ejection=30.0, max_ejection=100.0, interval=10.0)
    d = _detector(3, cfg)
    t = 0.0
    durations = []
    for _ in range(5):
        events = [d.record("n0", False, 0.01, t) for _ in range(5)]
        eject = events[-1]
        assert eject is not None
        durations.append(eject.until - eject.at)
        t = eject.until
        returned = d.tick(t)
        assert [(e.node, e.kind) for e in returned] == [("n0", "return")]
    assert durations == pytest.approx([30.0, 60.0, 90.0, 100.0, 100.0])
    times = d.snapshot()[0]["times"]
    assert times == 5
    # Three analysis passes in rotation: the multiplier decays from 5 to 2.
    for _ in range(3):
        t += 10.0
        d.tick(t)
    assert d.snapshot()[0]["times"] == 2


def test_return_is_jittered_and_bounded() -> None:
    # Rule: returns are spread by +/-20 % from the caller's rng, never beyond max_ejection.
    durations = []
    for seed in range(100):
        d = _detector(3, OutlierConfig(), seed)
        for _ in range(5):
            event = d.record("n0", False, 0.01, 0.0)
        assert event is not None
        durations.append(event.until)
    assert all(24.0 <= x <= 36.0 for x in durations)
    assert max(durations) - min(durations) > 6.0


def test_ejected_node_is_ignored_then_returns_with_fresh_counters() -> None:
    d = _detector(3)
    for _ in range(5):
        d.record("n0", False, 0.01, 0.0)
    assert d.is_ejected("n0") and d.next_deadline() == pytest.approx(10.0)  # analysis first
    assert d.record("n0", False, 0.01, 1.0) is None  # in-flight replies: ignored
    assert d.snapshot()[0]["interval_requests"] == 5
    assert d.tick(29.9) == []
    # A record at the return time applies the return; the next tick reports it.
    assert d.record("n1", True, 0.01, 30.0) is None
    assert not d.is_ejected("n0")
    events = d.tick(30.0)
    assert [(e.node, e.kind) for e in events] == [("n0", "return")]
    for _ in range(4):
        assert d.record("n0", False, 0.01, 31.0) is None  # streak restarted from zero


def test_remove_clears_ejection() -> None:
    d = _detector(3)
    for _ in range(5):
        d.record("n0", False, 0.01, 0.0)
    d.remove("n0", 0.0)
    assert d.ejected() == [] and "n0" not in d and len(d) == 2


@pytest.mark.parametrize("seed", range(20))
def test_eject_time_scenario_meets_target(seed: int) -> None:
    # Target: a node failing every call at 100 rps is out after <= 5 failures and <= 100 ms.
    result = eject_time_scenario(rps=100.0, seed=seed)
    assert result["eject_failures"] <= 5
    assert 0.0 < result["eject_time_ms"] <= 100.0
