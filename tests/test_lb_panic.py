"""Panic routing and slow start."""

from __future__ import annotations

import pytest

from agentcluster.balancing.panic import PanicGate, SlowStart


@pytest.mark.parametrize(
    ("rule", "healthy", "total", "threshold", "panic"),
    [
        ("no known nodes: nothing to panic about", 0, 0, 0.5, False),
        ("all healthy", 10, 10, 0.5, False),
        ("exactly at the threshold is not below it", 5, 10, 0.5, False),
        ("below the threshold panics", 4, 10, 0.5, True),
        ("none eligible of some known panics", 0, 3, 0.5, True),
        ("1 of 2 is 50 %: no panic at the default", 1, 2, 0.5, False),
        ("1 of 3 is under 50 %: panic", 1, 3, 0.5, True),
        ("threshold 0 disables panic mode", 0, 5, 0.0, False),
        ("threshold 1 panics on any unhealthy node", 9, 10, 1.0, True),
    ],
)
def test_panic_threshold(
    rule: str, healthy: int, total: int, threshold: float, panic: bool
) -> None:
    assert PanicGate(threshold).check(healthy, total) is panic, rule


def test_route_set_switches_to_all_known_and_counts_transitions() -> None:
    gate = PanicGate()
    known = ["a", "b", "c", "d"]
    assert gate.route_set(["a", "b", "c"], known) == ["a", "b", "c"]
    assert not gate.active and gate.transitions == 0
    assert gate.route_set(["a"], known) == known  # 25 % healthy: route to all
    assert gate.active and gate.transitions == 1
    assert gate.route_set(["a"], known) == known  # still in panic: no new transition
    assert gate.route_set(["a", "b"], known) == ["a", "b"]
    assert not gate.active and gate.transitions == 2


def test_panic_gate_validation() -> None:
    with pytest.raises(ValueError):
        PanicGate(1.5)


@pytest.mark.parametrize(
    ("rule", "aggression", "elapsed", "factor"),
    [
        ("at join the floor applies", 1.0, 0.0, 0.1),
        ("linear ramp: a third of the way", 1.0, 10.0, 1.0 / 3.0),
        ("linear ramp: half way", 1.0, 15.0, 0.5),
        ("aggression 2 ramps faster early (sqrt)", 2.0, 7.5, 0.5),
        ("aggression 0.5 holds low longer (square)", 0.5, 15.0, 0.25),
        ("floor wins while the curve is below it", 0.5, 3.0, 0.1),
        ("full weight once the window has passed", 1.0, 30.0, 1.0),
    ],
)
def test_slow_start_factor(rule: str, aggression: float, elapsed: float, factor: float) -> None:
    ss = SlowStart(window=30.0, aggression=aggression, min_weight=0.1)
    ss.mark_new("a", 100.0)
    assert ss.factor("a", 100.0 + elapsed) == pytest.approx(factor), rule
    assert ss.weight("a", 4.0, 100.0 + elapsed) == pytest.approx(4.0 * factor), rule


def test_slow_start_lifecycle() -> None:
    ss = SlowStart(window=30.0, refresh=1.0)
    assert ss.factor("never-marked", 0.0) == 1.0
    assert ss.next_deadline(0.0) is None
    ss.mark_new("b", 10.0)
    ss.mark_new("a", 0.0)
    assert ss.ramping(5.0) == ["a", "b"]
    assert ss.next_deadline(5.0) == pytest.approx(6.0)
    assert ss.next_deadline(29.5) == pytest.approx(30.0)  # a's ramp ends before the refresh
    assert ss.ramping(30.0) == ["b"]  # a finished and is forgotten
    ss.mark_new("b", 35.0)  # b returns again: its ramp restarts
    assert ss.factor("b", 40.0) == pytest.approx(5.0 / 30.0)
    ss.forget("b")
    assert ss.ramping(40.0) == [] and ss.factor("b", 40.0) == 1.0


def test_slow_start_weights_are_monotonic_over_the_window() -> None:
    ss = SlowStart(window=30.0, aggression=1.5)
    ss.mark_new("a", 0.0)
    factors = [ss.factor("a", t / 10.0) for t in range(0, 301)]
    assert factors == sorted(factors)
    assert factors[0] == pytest.approx(0.1) and factors[-1] == 1.0


def test_slow_start_disabled_and_validation() -> None:
    ss = SlowStart(window=0.0)
    ss.mark_new("a", 0.0)
    assert ss.factor("a", 0.0) == 1.0 and ss.ramping(0.0) == []
    with pytest.raises(ValueError):
        SlowStart(min_weight=0.0)
    with pytest.raises(ValueError):
        SlowStart(aggression=0.0)
