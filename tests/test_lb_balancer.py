"""The Balancer core: eligibility (quarantine, health, breakers, ejection), panic mode, slow
start, strategy switches, the decision log."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agentcluster.balancing.balancer import Balancer
from agentcluster.balancing.base import EMPTY_REQUEST, Endpoint, NoEndpoint
from agentcluster.balancing.outliers import OutlierConfig
from agentcluster.balancing.strategies import UnknownStrategy


def _balancer(strategy: str = "round_robin", **kw: object) -> Balancer:
    return Balancer(rng=random.Random(1), strategy=strategy, **kw)  # type: ignore[arg-type]


def _eps(*names: str) -> list[Endpoint]:
    return [Endpoint(n) for n in names]


def _picks(b: Balancer, n: int, now: float = 0.0, cap: str = "echo") -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        node = b.pick(cap, EMPTY_REQUEST, now)
        b.started(cap, node, now)
        b.finished(cap, node, 0.001, True, now)
        out[node] += 1
    return out


def _assert_ramps_up(b: Balancer, node: str, *, early: float, late: float) -> None:
    """Of three equal nodes, ``node`` gets a small share at ``early`` (slow start) and its
    full third at ``late`` (the ramp over)."""
    b.tick(early)
    first = _picks(b, 2100, now=early)
    assert first[node] < first["a"] / 5
    b.tick(late)
    assert abs(_picks(b, 3000, now=late)[node] - 1000) <= 2


def test_unknown_capability_and_unknown_strategy() -> None:
    b = _balancer()
    with pytest.raises(NoEndpoint):
        b.pick("nothing", EMPTY_REQUEST, 0.0)
    assert b.decisions[-1].node == "" and not b.decisions[-1].ok
    with pytest.raises(UnknownStrategy, match="known"):
        _balancer("fastest")


def test_quarantined_and_unhealthy_nodes_get_nothing_degraded_less() -> None:
    b = _balancer("weighted_round_robin")
    b.set_endpoints("echo", _eps("a", "b", "c", "d"), 0.0)
    b.set_quarantined(["a"], 0.0)
    b.set_health({"b": "unhealthy", "c": "degraded", "d": "healthy"}, 0.0)
    picks = _picks(b, 1100)
    assert picks["a"] == picks["b"] == 0
    assert picks["d"] == 1000 and picks["c"] == 100  # degraded: a tenth of the weight
    b.set_quarantined([], 0.0)
    b.set_health({}, 0.0)
    assert set(_picks(b, 40)) == {"a", "b", "c", "d"}


def test_five_consecutive_failures_eject_a_node_and_it_returns_later() -> None:
    b = _balancer()
    b.set_endpoints("echo", _eps("a", "b", "c"), 0.0)
    events = []
    for _ in range(5):
        events += b.finished("echo", "c", 0.001, False, 0.0)
    assert any(e["kind"] == "eject" for e in events)
    assert b.outliers.is_ejected("c")
    assert "c" not in _picks(b, 30)
    # Ejection is temporary (30 s base, jittered): a tick later on brings it back.
    returned = b.tick(60.0)
    assert any(e["kind"] == "return" for e in returned)
    assert "c" in _picks(b, 30, now=60.0)


def test_breaker_opens_then_half_open_probes_close_it() -> None:
    # Outlier ejection out of the way (it would take the node out first).
    b = _balancer(outliers=OutlierConfig(consecutive_errors=1000))
    b.set_endpoints("echo", _eps("a", "b", "c"), 0.0)
    changes = []
    for _ in range(5):
        changes += [e for e in b.finished("echo", "a", 0.001, False, 0.0) if e["kind"] == "breaker"]
    assert changes and changes[0]["new"] == "open"
    assert "a" not in _picks(b, 30, now=0.1)
    # After the open period (1 s +- 20 %) the breaker admits probes; their successes close it.
    b.tick(2.0)
    assert str(b.breakers.state("a", 2.0)) == "half_open"
    for _ in range(3):
        assert b.breakers.allow("a", 2.0)
        b.finished("echo", "a", 0.001, True, 2.0)
    assert str(b.breakers.state("a", 2.0)) == "closed"
    assert "a" in _picks(b, 30, now=2.1)


def test_panic_routes_to_everyone_when_too_few_are_eligible() -> None:
    b = _balancer()
    b.set_endpoints("echo", _eps("a", "b", "c"), 0.0)
    for node in ("a", "b"):
        for _ in range(5):
            b.finished("echo", node, 0.001, False, 0.0)
    # At most one of three may be ejected; breakers opened on both: 1 of 3 eligible < 50 %.
    snap = b.snapshot(0.1)
    assert snap["capabilities"]["echo"]["panic"] is True
    assert set(_picks(b, 60, now=0.1)) >= {"c"}


@pytest.mark.parametrize(("nodes", "opened"), [(3, 3), (10, 6), (10, 10)])
def test_panic_routes_through_open_breakers(nodes: int, opened: int) -> None:
    # Rule: in panic health is ignored, breakers included: every pick succeeds and spreads
    # over all known nodes (a pick refusing open breakers would route nowhere, or run out of
    # re-picks, when most are open).
    b = _balancer(outliers=OutlierConfig(consecutive_errors=1000))
    names = [f"n{i}" for i in range(nodes)]
    b.set_endpoints("echo", _eps(*names), 0.0)
    for node in names[:opened]:
        for _ in range(5):
            b.finished("echo", node, 0.001, False, 0.0)
    assert b.breakers.open_nodes(0.1) == sorted(names[:opened])
    assert b.snapshot(0.1)["capabilities"]["echo"]["panic"] is True
    assert set(_picks(b, 20 * nodes, now=0.1)) == set(names)


def test_nodes_coming_back_ramp_up_through_slow_start() -> None:
    # Rule: a node whose ejection ends, or whose breaker closes after its probes, ramps up
    # like a node that joins.
    b = _balancer(
        "weighted_round_robin",
        slow_start=30.0,
        outliers=OutlierConfig(jitter=0.0, base_ejection=10.0),
    )
    b.set_endpoints("echo", _eps("a", "b", "c"), 0.0)
    _picks(b, 30)
    for _ in range(5):
        b.finished("echo", "c", 0.001, False, 0.0)  # ejects c (until 10 s), opens its breaker
    assert b.outliers.is_ejected("c")
    b.tick(2.0)  # open -> half-open; still ejected
    events = b.tick(10.0)
    assert [e["node"] for e in events if e["kind"] == "return"] == ["c"]
    assert b.slow_start.factor("c", 10.0) == pytest.approx(0.1)  # min_weight at first
    for _ in range(3):  # its probes succeed: the breaker closes, the ramp starts again
        assert b.breakers.allow("c", 15.0)
        b.finished("echo", "c", 0.001, True, 15.0)
    assert str(b.breakers.state("c", 15.0)) == "closed"
    assert b.slow_start.factor("c", 15.0) == pytest.approx(0.1)
    _assert_ramps_up(b, "c", early=18.0, late=50.0)


def test_an_abandoned_attempt_frees_its_probe_and_leaves_no_outcome() -> None:
    b = _balancer("least_connections", outliers=OutlierConfig(consecutive_errors=1000))
    b.set_endpoints("echo", _eps("a"), 0.0)
    for _ in range(5):
        b.finished("echo", "a", 0.001, False, 0.0)
    b.tick(2.0)
    breaker = b.breakers.get("a")
    probes = breaker.config.half_open_probes
    for _ in range(probes):
        assert b.pick("echo", EMPTY_REQUEST, 2.0) == "a"
        b.started("echo", "a", 2.0)
    with pytest.raises(NoEndpoint):  # every probe is out
        b.pick("echo", EMPTY_REQUEST, 2.0)
    decisions = len(b.decisions)
    b.abandoned("echo", "a", 0.5, 2.5)
    assert b._routes["echo"].strategy.inflight("a") == probes - 1  # type: ignore[attr-defined]
    assert breaker.snapshot(2.5)["probes_left"] == 1
    assert str(breaker.state(2.5)) == "half_open" and len(b.decisions) == decisions
    assert b.pick("echo", EMPTY_REQUEST, 2.5) == "a"


def test_slow_start_ramps_a_node_that_joins_later() -> None:
    b = _balancer("weighted_round_robin", slow_start=30.0)
    b.set_endpoints("echo", _eps("a", "b"), 0.0)
    _picks(b, 10)  # traffic flows: later joiners ramp
    b.set_endpoints("echo", _eps("a", "b", "c"), 0.0)
    _assert_ramps_up(b, "c", early=3.0, late=40.0)


def test_strategy_switch_and_decision_log() -> None:
    b = _balancer(decisions=10)
    b.set_endpoints("echo", _eps("a", "b"), 0.0)
    _picks(b, 25)
    assert len(b.decisions) == 10
    b.set_strategy("least_connections", now=0.0)
    assert b.snapshot(0.0)["capabilities"]["echo"]["strategy"] == "least_connections"
    b.set_strategy("maglev", capability="echo", now=0.0)
    assert b.snapshot(0.0)["overrides"] == {"echo": "maglev"}
    snap = b.snapshot(0.0, decisions=3)
    assert len(snap["decisions"]) == 3
    assert {n["node"] for n in snap["nodes"]} == {"a", "b"}
