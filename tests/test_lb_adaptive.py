"""The adaptive strategy: what it learns, how it picks, and the slow-node scenario."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from agentcluster.balancing.adaptive import Adaptive
from agentcluster.balancing.base import EMPTY_REQUEST, Endpoint, NoEndpoint, Strategy
from agentcluster.balancing.latency_aware import PeakEwma
from agentcluster.balancing.least_connections import LeastConnections
from agentcluster.balancing.round_robin import RoundRobin
from agentcluster.balancing.sim import simulate


def eps(*names: str, weights: dict[str, float] | None = None) -> list[Endpoint]:
    w = weights or {}
    return [Endpoint(node=n, weight=w.get(n, 1.0)) for n in names]


def feed(a: Adaptive, node: str, latency: float, now: float, ok: bool = True) -> None:
    a.on_start(node, now)
    a.on_finish(node, latency, ok, now + latency)


def picks(a: Adaptive, count: int, now: float, seed: int = 0) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(a.pick(EMPTY_REQUEST, rng, now) for _ in range(count))


def test_learns_to_avoid_a_slow_node() -> None:
    a = Adaptive()
    a.update(eps("fast", "slow"))
    for k in range(5):
        feed(a, "fast", 0.010, k * 0.1)
        feed(a, "slow", 0.100, k * 0.1)
    assert picks(a, 50, 1.0) == Counter({"fast": 50})


def test_in_flight_spreads_load_between_equal_nodes() -> None:
    a = Adaptive()
    a.update(eps("a", "b", "c"))
    for node in "abc":
        feed(a, node, 0.010, 0.0)
    rng = random.Random(0)
    chosen = []
    for _ in range(9):  # nothing finishes: each pick raises that node's cost
        node = a.pick(EMPTY_REQUEST, rng, 0.1)
        a.on_start(node, 0.1)
        chosen.append(node)
    assert Counter(chosen) == Counter({"a": 3, "b": 3, "c": 3})


@pytest.mark.parametrize(
    ("ok", "latency", "expected_estimate"),
    [
        (True, 0.002, 0.002),
        (False, 0.002, 1.0),  # a fast failure counts as the error penalty
        (False, 3.0, 3.0),  # a slow failure counts as itself
        (True, math.nan, 1.0),  # a garbled latency is an error
        (True, -1.0, 1.0),
    ],
)
def test_samples_and_errors(ok: bool, latency: float, expected_estimate: float) -> None:
    a = Adaptive()
    a.update(eps("x"))
    a.on_start("x", 0.0)
    a.on_finish("x", latency, ok, 1.0)
    assert a.estimate("x") == pytest.approx(expected_estimate)
    errors = a.error_rate("x")
    assert errors is not None
    assert (errors > 0.0) == (not ok or not 0.0 <= latency < math.inf)


def test_a_node_failing_fast_does_not_attract_traffic() -> None:
    a = Adaptive()
    a.update(eps("good", "blackhole"))
    for k in range(20):
        feed(a, "good", 0.020, k * 0.05)
        feed(a, "blackhole", 0.0005, k * 0.05, ok=False)
    assert picks(a, 40, 1.1)["blackhole"] == 0
    assert a.cost("blackhole", 1.1) > a.cost("good", 1.1)


def test_peak_then_slow_recovery() -> None:
    a = Adaptive(decay=10.0)
    a.update(eps("x"))
    feed(a, "x", 0.010, 0.0)
    feed(a, "x", 0.200, 1.0)
    assert a.estimate("x") == pytest.approx(0.200)  # the peak is taken at once
    feed(a, "x", 0.010, 2.0)  # ~1 s of evidence out of 10: still mostly the peak
    est = a.estimate("x")
    assert est is not None and 0.15 < est < 0.2


def test_idle_decay_probes_a_shunned_node_again() -> None:
    a = Adaptive(decay=1.0)
    a.update(eps("fast", "slow"))
    feed(a, "fast", 0.010, 0.0)
    feed(a, "slow", 0.100, 0.0)
    assert picks(a, 10, 0.2)["slow"] == 0
    # The slow node's estimate read after a few seconds of silence; the fast one keeps busy.
    a.on_start("fast", 5.0)
    a.on_finish("fast", 0.010, True, 5.0)
    assert a.cost("slow", 5.0) < a.cost("fast", 5.0)
    assert a.pick(EMPTY_REQUEST, random.Random(0), 5.0) == "slow"
    # A node with requests in flight never decays.
    a.on_start("slow", 5.0)
    assert a.cost("slow", 50.0) == pytest.approx(0.100 * 2)


def test_new_node_starts_at_the_mean_estimate() -> None:
    a = Adaptive()
    a.update(eps("a", "b"))
    feed(a, "a", 0.010, 0.0)
    feed(a, "b", 0.030, 0.0)
    a.update(eps("a", "b", "c"))
    assert a.estimate("c") == pytest.approx(0.020)
    fresh = Adaptive(initial_latency=0.07)
    fresh.update(eps("z"))
    assert fresh.estimate("z") == pytest.approx(0.07)


def test_weights_scale_the_cost() -> None:
    a = Adaptive()
    a.update(eps("big", "small", weights={"big": 4.0, "small": 1.0}))
    feed(a, "big", 0.010, 0.0)
    feed(a, "small", 0.010, 0.0)
    rng = random.Random(0)
    chosen = []
    for _ in range(10):
        node = a.pick(EMPTY_REQUEST, rng, 0.1)
        a.on_start(node, 0.1)
        chosen.append(node)
    counts = Counter(chosen)
    assert counts["big"] >= 3 * counts["small"] > 0


def test_exclude_empty_and_validation() -> None:
    a = Adaptive()
    with pytest.raises(NoEndpoint):
        a.pick(EMPTY_REQUEST, random.Random(0), 0.0)
    a.update(eps("a", "b"))
    assert a.pick(EMPTY_REQUEST, random.Random(0), 0.0, frozenset({"a"})) == "b"
    with pytest.raises(NoEndpoint):
        a.pick(EMPTY_REQUEST, random.Random(0), 0.0, frozenset({"a", "b"}))
    assert a.cost("unknown", 0.0) == math.inf and a.estimate("unknown") is None
    for bad in ({"decay": 0.0}, {"error_penalty": -1.0}, {"scan_limit": 1}, {"error_weight": -1}):
        with pytest.raises(ValueError):
            Adaptive(**bad)


def test_p2c_above_the_scan_limit() -> None:
    names = [f"n{i:03d}" for i in range(100)]
    a = Adaptive(scan_limit=16)
    a.update(eps(*names))
    for k, name in enumerate(names):
        feed(a, name, 0.5 if k < 10 else 0.01, 0.0)
    counts = picks(a, 2000, 0.1, seed=3)
    slow = sum(counts[name] for name in names[:10])
    # A slow node is chosen only when both draws are slow: about (10/100) * (9/99) = 0.9%.
    assert slow <= 40
    assert len(counts) > 80
    excluded = frozenset(names[10:95])
    rng = random.Random(1)
    for _ in range(50):
        assert a.pick(EMPTY_REQUEST, rng, 0.1, excluded) not in excluded


def test_picks_replay_from_the_seed_and_leavers_are_forgotten() -> None:
    def run() -> list[str]:
        a = Adaptive()
        a.update(eps("a", "b", "c", "d"))
        rng = random.Random(5)
        out = []
        for k in range(200):
            node = a.pick(EMPTY_REQUEST, rng, k * 0.01)
            a.on_start(node, k * 0.01)
            a.on_finish(node, 0.005 + 0.001 * (ord(node) - 97), True, k * 0.01 + 0.005)
            out.append(node)
        return out

    assert run() == run()
    a = Adaptive()
    a.update(eps("a", "b"))
    a.on_start("b", 0.0)
    a.update(eps("a"))
    assert a.estimate("b") is not None  # still in flight: kept until it finishes
    a.on_finish("b", 0.01, True, 0.01)
    a.update(eps("a"))
    assert a.estimate("b") is None


# --- the slow-node scenario -----------------------------------------------------------------


def test_adaptive_beats_every_fixed_strategy_on_a_slow_node() -> None:
    factories: dict[str, type[Strategy]] = {
        "round_robin": RoundRobin,
        "least_connections": LeastConnections,
        "latency_aware": PeakEwma,
    }
    adaptive = simulate(Adaptive(), requests=30_000, seed=7)
    baseline = simulate(Adaptive(), slow_node=False, requests=30_000, seed=7)
    assert adaptive.p99 / baseline.p99 <= 1.5
    assert adaptive.slow_share <= 0.02
    for name, factory in factories.items():
        fixed = simulate(factory(), requests=30_000, seed=7)
        assert adaptive.p99 <= fixed.p99, name
        assert adaptive.slow_share <= fixed.slow_share, name
