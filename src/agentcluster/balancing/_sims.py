"""Small discrete-event simulations and pick timings for the balancing strategies.

Theory of operation: :func:`simulate` drives one strategy with Poisson arrivals against ``n``
simulated nodes, all from seeded ``random.Random`` instances (one for the strategy's draws,
one for the workload) and a simulated clock, so a run replays exactly. A request picks a node,
``on_start`` is called, and its completion is an event on a heap; at completion
``on_finish`` reports its latency and outcome. Two node models:

* ``queueing=False`` -- infinite servers: a request takes its service time whatever else the
  node does. In-flight counts then measure only how evenly the strategy spreads work; this is
  the model for ``balance_max_over_mean``.
* ``queueing=True`` -- one FIFO server per node (an M/M/1 queue): latency includes waiting,
  so a slow node's queue grows if it is sent too much. (The bench's slow-node scenario runs
  in :mod:`agentcluster.balancing.sim`, checked against queueing theory; this one adds the
  failing node.)

A *failing* node answers every request with an error after ``fail_latency`` seconds (the fast
black hole that latency-aware balancing must avoid).

:func:`p2c_balance` is the bench's ``balance_max_over_mean``: least connections with P2C,
100 nodes, infinite servers, exponential service times, offered load ``load`` requests in
flight per node on average (Little's law sets the arrival rate); the figure is the mean, over
samples taken every ``n`` arrivals after a warm-up of five mean service times, of
``max(in_flight) / mean(in_flight)`` across nodes. The balls-into-bins bound for two choices
puts the maximum about ``log2 log n + O(1)`` (about 3 for 100 nodes) above the mean, so the
ratio reaches 1.05 only at high load (several dozen requests in flight per node).

:func:`pick_timings` times one strategy's ``pick`` (``agentcluster bench lb`` reports it for
every strategy at 10, 100 and 1,000 endpoints, through :func:`interleaved_pick_timings`).
"""

from __future__ import annotations

import heapq
import random
import statistics
import time
from collections import deque
from collections.abc import Sequence

import msgspec

from agentcluster.balancing.base import EMPTY_REQUEST, Endpoint, PickRequest, Strategy
from agentcluster.balancing.least_connections import LeastConnections
from agentcluster.balancing.strategies import make_strategy

__all__ = [
    "PickTimer",
    "SimResult",
    "interleaved_pick_timings",
    "p2c_balance",
    "pick_timings",
    "simulate",
]


class SimResult(msgspec.Struct, frozen=True):
    picks: dict[str, int]  # requests sent to each node (after warm-up)
    latencies: list[float]  # of requests that arrived after warm-up, in arrival order
    errors: int
    balance: float  # mean of max(in_flight) / mean(in_flight) over the samples (0 if none)


def _node_names(n: int) -> list[str]:
    return [f"n{i:04d}" for i in range(n)]


def simulate(
    strategy: Strategy,
    service: Sequence[float],
    arrival_rate: float,
    requests: int,
    seed: int = 0,
    *,
    queueing: bool = True,
    failing: frozenset[int] = frozenset(),
    fail_latency: float = 0.001,
    warmup: float = 0.0,
    sample_every: int = 0,
    endpoints: Sequence[Endpoint] | None = None,
) -> SimResult:
    """Run ``requests`` Poisson arrivals at ``arrival_rate`` per second against nodes whose
    mean (exponential) service times are ``service``; see the module doc for the models."""
    n = len(service)
    names = _node_names(n)
    strategy.update(endpoints if endpoints is not None else [Endpoint(node=x) for x in names])
    index = {name: i for i, name in enumerate(names)}
    pick_rng = random.Random(seed)
    work = random.Random(seed + 1_000_003)
    completions: list[tuple[float, int, int, float, bool]] = []
    busy_until = [0.0] * n
    inflight = [0] * n
    total = 0
    picks = dict.fromkeys(names, 0)
    latencies: list[float] = []
    errors = 0
    ratios: list[float] = []
    now = 0.0
    for seq in range(requests):
        now += work.expovariate(arrival_rate)
        while completions and completions[0][0] <= now:
            done, _, k, latency, ok = heapq.heappop(completions)
            inflight[k] -= 1
            total -= 1
            strategy.on_finish(names[k], latency, ok, done)
        node = strategy.pick(EMPTY_REQUEST, pick_rng, now)
        k = index[node]
        strategy.on_start(node, now)
        inflight[k] += 1
        total += 1
        ok = k not in failing
        if not ok:
            finish = now + fail_latency
        elif queueing:
            finish = max(now, busy_until[k]) + work.expovariate(1.0 / service[k])
            busy_until[k] = finish
        else:
            finish = now + work.expovariate(1.0 / service[k])
        heapq.heappush(completions, (finish, seq, k, finish - now, ok))
        if now >= warmup:
            picks[node] += 1
            latencies.append(finish - now)
            errors += not ok
            if sample_every and seq % sample_every == 0 and total:
                ratios.append(max(inflight) * n / total)
    return SimResult(
        picks=picks,
        latencies=latencies,
        errors=errors,
        balance=statistics.fmean(ratios) if ratios else 0.0,
    )


def p2c_balance(n: int = 100, load: float = 64.0, seed: int = 0, requests: int = 200_000) -> float:
    """``balance_max_over_mean``: least connections (P2C), ``n`` infinite-server nodes with
    exponential unit service times, ``load`` requests in flight per node on average."""
    result = simulate(
        LeastConnections(),
        [1.0] * n,
        arrival_rate=load * n,
        requests=requests,
        seed=seed,
        queueing=False,
        warmup=5.0,
        sample_every=n,
    )
    return result.balance


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _endpoints(n: int, rng: random.Random) -> list[Endpoint]:
    return [
        Endpoint(
            node=name,
            weight=float(rng.randint(1, 4)),
            zone=f"z{i % 9}",
            region=f"r{i % 3}",
            cpu=rng.random(),
            memory=rng.random(),
            network=rng.random(),
            # Other clients' calls as published: the pick compares them with its own counts.
            in_flight=float(rng.randint(0, 4)),
        )
        for i, name in enumerate(_node_names(n))
    ]


class PickTimer:
    """Times one strategy's ``pick`` over ``n`` endpoints, one pass at a time: every pick is
    followed by ``on_start``, and the oldest of ``depth`` outstanding requests (default
    ``2 * n``) then finishes, so stateful strategies see live counts. The strategy and its
    outstanding requests live on from pass to pass, so passes of several timers can be
    interleaved (see :func:`interleaved_pick_timings`)."""

    def __init__(self, name: str, n: int, *, seed: int = 0, depth: int | None = None) -> None:
        self.case = (name, n)
        self.strategy = make_strategy(name)
        self.rng = random.Random(seed)
        self.strategy.update(_endpoints(n, self.rng))
        self.request = (
            PickRequest(zone="z0", region="r0") if name == "geographic" else EMPTY_REQUEST
        )
        self.outstanding: deque[str] = deque()
        self.limit = 2 * n if depth is None else depth
        self.now = 0.0

    def run_pass(self, picks: int) -> tuple[float, float]:
        """``(p50, p99)`` in microseconds of ``picks`` picks (after 1,000 to warm up; the
        timer's own cost, about 0.05 us, is included)."""
        strategy, rng, request = self.strategy, self.rng, self.request
        outstanding, limit = self.outstanding, self.limit
        clock = time.perf_counter_ns
        now = self.now
        samples = [0] * picks
        for k in range(picks + 1_000):
            now += 0.0001
            t0 = clock()
            node = strategy.pick(request, rng, now)
            t1 = clock()
            if k >= 1_000:
                samples[k - 1_000] = t1 - t0
            strategy.on_start(node, now)
            outstanding.append(node)
            if len(outstanding) > limit:
                strategy.on_finish(outstanding.popleft(), rng.expovariate(100.0), True, now)
        self.now = now
        samples.sort()
        return samples[picks // 2] / 1000.0, samples[int(picks * 0.99)] / 1000.0


def pick_timings(
    name: str,
    n: int,
    picks: int = 20_000,
    seed: int = 0,
    depth: int | None = None,
    repeats: int = 3,
) -> tuple[float, float]:
    """``(p50, p99)`` of one ``pick`` in microseconds for strategy ``name`` over ``n``
    endpoints: the medians over ``repeats`` consecutive passes of ``picks`` picks each
    (:class:`PickTimer`)."""
    timer = PickTimer(name, n, seed=seed, depth=depth)
    passes = [timer.run_pass(picks) for _ in range(repeats)]
    return (
        statistics.median(p for p, _ in passes),
        statistics.median(p for _, p in passes),
    )


def interleaved_pick_timings(
    cases: Sequence[tuple[str, int]], picks: int = 20_000, repeats: int = 3
) -> dict[tuple[str, int], tuple[float, float]]:
    """:func:`pick_timings` for every ``(name, n)`` of ``cases``, with their passes taken
    round-robin -- every case's first pass, then every second one -- so that the passes of
    one case lie seconds apart and a burst of noise on the host (another process, a stalled
    virtual CPU) lands in at most one of them, not in the majority that the median keeps."""
    timers = {case: PickTimer(*case) for case in cases}
    passes: dict[tuple[str, int], list[tuple[float, float]]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case, timer in timers.items():
            passes[case].append(timer.run_pass(picks))
    return {
        case: (statistics.median(p for p, _ in got), statistics.median(p for _, p in got))
        for case, got in passes.items()
    }
