"""The slow-node simulator: a seeded discrete-event model of a balanced cluster.

Theory of operation: ``nodes`` nodes, each a FIFO queue with ``concurrency_per_node`` servers
and exponential service times (mean ``service_mean``; the slow node's mean is
``slow_factor`` times longer). Requests arrive as a Poisson process whose rate is ``load``
times the capacity of the *normal* cluster, ``load * nodes * concurrency_per_node /
service_mean`` -- so "70% load" means 70% of what the cluster could serve if every node were
healthy. With one node 10x slower the cluster really has ``9.1 / 10`` of that capacity, and
the healthy nodes must run at about 77% if the slow one is drained.

At each arrival the strategy picks (``strategy.pick`` with an empty request and the arrival
time as ``now``) and is told ``on_start``; the request's finish time follows from the node's
FIFO servers (Lindley's recursion: start when the earliest server is free), and at that time
the strategy gets ``on_finish(node, latency, True, finish)`` with latency = queueing + service.
Finishes are delivered in time order before each later arrival, so the strategy sees exactly
what a real balancer would have seen by then.

Three independent streams from ``seed`` -- arrivals, unit service draws, the strategy's rng --
mean two strategies (or a run with and without the slow node) face the same arrivals and the
same service-time draws (common random numbers), so their difference is the strategy's.
The first ``warmup`` share of requests is left out of the figures (the queues start empty).

:func:`slow_node_scenario` is the issue's figure: p99 with a slow node over p99 of the same
run without it, and the share of requests the slow node received.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import msgspec

from agentcluster.balancing.base import EMPTY_REQUEST, Endpoint, Strategy

__all__ = ["SimResult", "node_names", "simulate", "slow_node_scenario"]

SLOW_NODE_INDEX = 0  # node "n00": first in name order, the worst place for tie-breaking


class SimResult(msgspec.Struct, frozen=True):
    """Figures of one run (latencies in seconds; requests after the warm-up only)."""

    p50: float
    p99: float
    p999: float
    mean: float
    max: float
    requests: int
    share_by_node: dict[str, float]
    slow_node: str | None
    slow_share: float


def node_names(n: int) -> list[str]:
    """The simulated nodes' names, ``n00``, ``n01``, ..."""
    width = max(2, len(str(n - 1)))
    return [f"n{i:0{width}d}" for i in range(n)]


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def simulate(
    strategy: Strategy,
    *,
    nodes: int = 10,
    service_mean: float = 0.010,
    slow_node: bool = True,
    slow_factor: float = 10.0,
    load: float = 0.7,
    requests: int = 200_000,
    seed: int = 1,
    concurrency_per_node: int = 1,
    warmup: float = 0.02,
) -> SimResult:
    """Drive ``strategy`` through one run; see the module docstring for the model."""
    if nodes < 1 or requests < 1 or concurrency_per_node < 1:
        raise ValueError("nodes, requests and concurrency_per_node must be at least 1")
    if not (load > 0 and service_mean > 0 and slow_factor > 0 and 0 <= warmup < 1):
        raise ValueError("load, service_mean and slow_factor must be positive, warmup in [0, 1)")
    names = node_names(nodes)
    index = {name: i for i, name in enumerate(names)}
    means = [service_mean] * nodes
    if slow_node:
        means[SLOW_NODE_INDEX] = service_mean * slow_factor
    strategy.update([Endpoint(node=name) for name in names])

    arrivals = random.Random(f"{seed}/arrivals")
    work = random.Random(f"{seed}/service")
    pick_rng = random.Random(f"{seed}/strategy")
    rate = load * nodes * concurrency_per_node / service_mean
    # Per node: the times its servers become free (a heap of concurrency_per_node entries).
    servers = [[0.0] * concurrency_per_node for _ in range(nodes)]
    pending: list[tuple[float, int, int, float]] = []  # (finish, seq, node index, latency)
    skip = int(requests * warmup)
    latencies: list[float] = []
    counts = [0] * nodes
    pick = strategy.pick
    on_start = strategy.on_start
    on_finish = strategy.on_finish
    expo_arrival = arrivals.expovariate
    expo_work = work.expovariate
    heappush, heappop, heapreplace = heapq.heappush, heapq.heappop, heapq.heapreplace
    now = 0.0
    for seq in range(requests):
        now += expo_arrival(rate)
        while pending and pending[0][0] <= now:
            finish, _, k, latency = heappop(pending)
            on_finish(names[k], latency, True, finish)
        node = pick(EMPTY_REQUEST, pick_rng, now)
        on_start(node, now)
        k = index[node]
        free = servers[k]
        start = free[0] if free[0] > now else now
        finish = start + expo_work(1.0) * means[k]
        heapreplace(free, finish)
        latency = finish - now
        heappush(pending, (finish, seq, k, latency))
        if seq >= skip:
            latencies.append(latency)
            counts[k] += 1
    while pending:
        finish, _, k, latency = heappop(pending)
        on_finish(names[k], latency, True, finish)

    measured = len(latencies)
    latencies.sort()
    share = {name: counts[i] / measured for i, name in enumerate(names)}
    slow_name = names[SLOW_NODE_INDEX] if slow_node else None
    return SimResult(
        p50=_quantile(latencies, 0.50),
        p99=_quantile(latencies, 0.99),
        p999=_quantile(latencies, 0.999),
        mean=sum(latencies) / measured,
        max=latencies[-1],
        requests=measured,
        share_by_node=share,
        slow_node=slow_name,
        slow_share=share[slow_name] if slow_name is not None else 0.0,
    )


def slow_node_scenario(
    strategy_factory: Callable[[], Strategy],
    *,
    nodes: int = 10,
    service_mean: float = 0.010,
    slow_factor: float = 10.0,
    load: float = 0.7,
    requests: int = 200_000,
    seed: int = 1,
    concurrency_per_node: int = 1,
) -> dict[str, float]:
    """The issue's slow-node figures for a fresh strategy from ``strategy_factory``:
    ``slow_node_p99_ratio`` (p99 with one node ``slow_factor`` times slower over p99 of the
    same run, same seed, without it) and ``slow_node_share`` (share of requests it got)."""

    def run(slow_node: bool) -> SimResult:
        return simulate(
            strategy_factory(),
            nodes=nodes,
            service_mean=service_mean,
            slow_node=slow_node,
            slow_factor=slow_factor,
            load=load,
            requests=requests,
            seed=seed,
            concurrency_per_node=concurrency_per_node,
        )

    slow, base = run(True), run(False)
    return {
        "slow_node_p99_ratio": slow.p99 / base.p99,
        "slow_node_share": slow.slow_share,
    }
