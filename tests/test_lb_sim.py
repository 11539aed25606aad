"""The slow-node simulator: queueing theory checks, determinism, the issue's figures."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from agentcluster.balancing.adaptive import Adaptive
from agentcluster.balancing.base import Strategy
from agentcluster.balancing.bounded_load import BoundedLoad
from agentcluster.balancing.latency_aware import PeakEwma
from agentcluster.balancing.least_connections import LeastConnections
from agentcluster.balancing.round_robin import RoundRobin
from agentcluster.balancing.sim import node_names, simulate, slow_node_scenario

FACTORIES: dict[str, Callable[[], Strategy]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "latency_aware": PeakEwma,
    "bounded_load": BoundedLoad,
    "adaptive": Adaptive,
}


def test_round_robin_matches_mm1_theory() -> None:
    # 10 nodes at 70% load under round robin: arrivals to each node are not Poisson (they are
    # Erlang-10 spaced), so the queue is E10/M/1, whose sojourn time is exponential with rate
    # mu * (1 - sigma), sigma the root of sigma = (1 + mu * (1 - sigma) / (10 * lambda))^-10.
    mu, lam = 100.0, 70.0
    sigma = 0.5
    for _ in range(200):
        sigma = (1 + mu * (1 - sigma) / (10 * lam)) ** -10
    rate = mu * (1 - sigma)
    r = simulate(RoundRobin(), slow_node=False, requests=60_000, seed=3)
    assert r.mean == pytest.approx(1 / rate, rel=0.1)
    assert r.p99 == pytest.approx(math.log(100) / rate, rel=0.15)
    assert all(share == pytest.approx(0.1) for share in r.share_by_node.values())


def test_single_node_is_mm1_and_load_means_capacity_share() -> None:
    # One node, Poisson arrivals at 70% of its capacity: M/M/1, sojourn ~ Exp(mu - lambda).
    r = simulate(RoundRobin(), nodes=1, slow_node=False, requests=60_000, seed=5)
    assert r.mean == pytest.approx(1 / 30.0, rel=0.1)
    assert r.p50 == pytest.approx(math.log(2) / 30.0, rel=0.1)


def test_multi_server_nodes_follow_erlang_c() -> None:
    # One node with 2 servers at 70%: M/M/2. W = 1/mu + C(2, a) / (2 mu - lambda).
    mu, lam = 100.0, 140.0
    a = lam / mu
    top = a**2 / 2 / (1 - a / 2)
    erlang_c = top / (1 + a + top)
    expected = 1 / mu + erlang_c / (2 * mu - lam)
    r = simulate(
        RoundRobin(), nodes=1, slow_node=False, concurrency_per_node=2, requests=60_000, seed=2
    )
    assert r.mean == pytest.approx(expected, rel=0.1)


def test_runs_replay_from_the_seed() -> None:
    one = simulate(Adaptive(), requests=5_000, seed=11)
    two = simulate(Adaptive(), requests=5_000, seed=11)
    other = simulate(Adaptive(), requests=5_000, seed=12)
    assert one == two
    assert one != other


def test_without_a_slow_node_every_strategy_is_sane() -> None:
    # Service alone has p99 = 10 ms * ln(100) = 46 ms; round robin (E10/M/1) is about 93 ms;
    # queue-aware strategies sit between the two.
    p99 = {
        name: simulate(f(), slow_node=False, requests=20_000, seed=4).p99
        for name, f in FACTORIES.items()
    }
    for name, value in p99.items():
        assert 0.040 <= value <= 0.130, (name, value)
    best = min(p99.values())
    for name in ("least_connections", "latency_aware", "adaptive"):
        assert p99[name] <= 1.5 * best, name


def test_round_robin_never_drains_the_slow_node() -> None:
    r = simulate(RoundRobin(), requests=20_000, seed=4)
    assert r.slow_node == node_names(10)[0]
    assert r.slow_share == pytest.approx(0.1)
    # The slow node serves 10/s and receives 70/s: its queue only grows.
    assert r.p99 > 20 * 0.093
    figures = slow_node_scenario(RoundRobin, requests=20_000, seed=4)
    assert figures["slow_node_p99_ratio"] > 20
    assert figures["slow_node_share"] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["latency_aware", "adaptive"])
def test_latency_aware_strategies_meet_the_targets(name: str) -> None:
    figures = slow_node_scenario(FACTORIES[name], requests=30_000, seed=1)
    assert set(figures) == {"slow_node_p99_ratio", "slow_node_share"}
    assert figures["slow_node_p99_ratio"] <= 1.5
    assert figures["slow_node_share"] <= 0.02


def test_in_flight_alone_is_not_enough() -> None:
    # P2C on in-flight keeps sending the slow node its share of short queues.
    figures = slow_node_scenario(LeastConnections, requests=30_000, seed=1)
    assert figures["slow_node_p99_ratio"] > 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nodes": 0},
        {"requests": 0},
        {"concurrency_per_node": 0},
        {"load": 0.0},
        {"service_mean": -1.0},
        {"warmup": 1.0},
    ],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        simulate(RoundRobin(), **kwargs)  # type: ignore[arg-type]


def test_node_names() -> None:
    assert node_names(3) == ["n00", "n01", "n02"]
    assert node_names(101)[100] == "n100"
