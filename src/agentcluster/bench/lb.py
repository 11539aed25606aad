"""``agentcluster bench lb``: the load balancer's numbers.

Theory of operation:

* ``pick_p50_us`` / ``pick_p99_us`` -- per strategy and endpoint count (10, 100, 1,000): one
  ``pick`` timed with ``perf_counter_ns`` while requests start and finish around it (the
  median over five passes of 20,000 picks, the passes of all strategies and sizes taken in
  turn so that bursts of host noise -- a pass here sometimes times 5x slower than its
  neighbours -- cannot spoil the majority of one case's passes;
  :func:`~agentcluster.balancing._sims.interleaved_pick_timings`).
  ``pick_p99_us_worst_1000`` is the slowest strategy's p99 at 1,000 endpoints.
* ``balance_max_over_mean`` -- least connections (P2C), 100 nodes, 64 requests in flight per
  node on average: the mean of max/mean in-flight (:func:`~agentcluster.balancing._sims.p2c_balance`).
* ``slow_node_p99_ratio`` / ``slow_node_share`` -- the issue's slow-node scenario (10 nodes,
  10 ms exponential service, one node 10x slower, 70% load) for the default strategy
  (``latency_aware``); ``slow_node`` has every strategy's figures
  (:mod:`agentcluster.balancing.sim`).
* ``maglev_keys_moved_on_remove`` -- 100 Maglev backends, one removed, share of 100,000 keys
  that move (the bound is 1/N + 1% = 0.02).
* ``eject_time_ms`` / ``eject_failures`` -- a node failing every call at 100 rps: time and
  failures until outlier detection takes it out (the worst of 20 seeds).
* ``call_overhead_p50_us`` / ``call_overhead_p99_us`` -- this process runs a real node that
  joins a real node process hosting an ``echo`` agent; the figure is the latency of
  ``cluster.call("echo", ...)`` minus that of a bare transport round trip to the same node (a
  SWIM stream ping, sealed before and its ack opened after, as a call's request and reply
  are), percentile by percentile, over sequential calls.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from agentcluster.bench._host import CpuPressure
from agentcluster.bench.membership import percentile

__all__ = ["run"]

ECHO = "agentcluster.examples.worker:Echo"


def _cores(quick: bool) -> dict[str, Any]:
    from agentcluster.balancing._sims import interleaved_pick_timings, p2c_balance
    from agentcluster.balancing.maglev import maglev_keys_moved_on_remove
    from agentcluster.balancing.outliers import eject_time_scenario
    from agentcluster.balancing.sim import slow_node_scenario
    from agentcluster.balancing.strategies import STRATEGIES, make_strategy

    p50: dict[str, dict[str, float]] = {}
    p99: dict[str, dict[str, float]] = {}
    picks = 5_000 if quick else 20_000
    cases = [(name, n) for name in sorted(STRATEGIES) for n in (10, 100, 1000)]
    for (name, n), (a, b) in interleaved_pick_timings(cases, picks=picks, repeats=5).items():
        p50.setdefault(name, {})[str(n)] = round(a, 2)
        p99.setdefault(name, {})[str(n)] = round(b, 2)
    requests = 40_000 if quick else 200_000
    slow = {
        name: {
            k: round(v, 4)
            for k, v in slow_node_scenario(
                functools.partial(make_strategy, name), requests=requests
            ).items()
        }
        for name in sorted(STRATEGIES)
    }
    ejects = [eject_time_scenario(rps=100.0, seed=s) for s in range(20)]
    return {
        "pick_p50_us": p50,
        "pick_p99_us": p99,
        "pick_p99_us_worst_1000": max(v["1000"] for v in p99.values()),
        "balance_max_over_mean": round(p2c_balance(n=100, load=64.0, seed=0), 4),
        "slow_node_p99_ratio": slow["latency_aware"]["slow_node_p99_ratio"],
        "slow_node_share": slow["latency_aware"]["slow_node_share"],
        "slow_node": slow,
        "maglev_keys_moved_on_remove": round(maglev_keys_moved_on_remove(n=100), 4),
        "eject_time_ms": round(max(e["eject_time_ms"] for e in ejects), 2),
        "eject_failures": int(max(e["eject_failures"] for e in ejects)),
    }


async def _call_overhead(calls: int, preset: str = "local") -> dict[str, Any]:
    from agentcluster import tuning
    from agentcluster.cluster import Cluster
    from agentcluster.config import NodeConfig
    from agentcluster.launcher import LocalCluster, free_port
    from agentcluster.membership.messages import StreamAck, StreamPing
    from agentcluster.node import Node

    # Both nodes' timing preset: their background work (SWIM rounds and gossip, health
    # checks) shares the CPUs with the calls; "local" has the most of it.
    async with LocalCluster(1, preset=preset, agents=[ECHO], store_voters=0) as lc:
        await lc.wait_converged(timeout=30)
        target = lc.nodes[0]
        config = NodeConfig(
            name="bench", bind=f"127.0.0.1:{free_port()}", seeds=[target.addr], preset=preset
        )
        async with Node(config, keyring=lc.keyring) as node:
            cluster = Cluster.of(node)
            deadline = time.monotonic() + 30
            while not node.registry.index.find_capable("echo"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the echo agent never showed up in the registry")
                await asyncio.sleep(0.02)
            codec = node.stream_codec

            def ping(seq: int) -> bytes:
                # A fresh frame each time: the wire layer drops replayed frames.
                msg = StreamPing(seq=seq, target=target.name, source="bench", source_addr=node.addr)
                return codec.encode(msg)

            for k in range(200):  # warm up both paths (caches, estimates)
                await cluster.call("echo", "app.echo", {"x": 1})
                await node.transport.request(target.addr, ping(k), timeout=2.0)
            # As `agentcluster node run` does for the target (see agentcluster.tuning).
            tuning.tune()
            call_t: list[float] = []
            bare_t: list[float] = []
            perf = time.perf_counter
            with CpuPressure() as pressure:
                for i in range(calls):
                    t0 = perf()
                    await cluster.call("echo", "app.echo", {"i": i})
                    t1 = perf()
                    raw = await node.transport.request(target.addr, ping(1000 + i), timeout=2.0)
                    # Opened inside the timing, as a call opens its reply: both sides pay the
                    # same codec work on the way out and on the way back.
                    ack = codec.try_decode(raw)
                    t2 = perf()
                    if not isinstance(ack, StreamAck):
                        raise RuntimeError("the bare round trip got no stream ack")
                    call_t.append(t1 - t0)
                    bare_t.append(t2 - t1)
    call_t.sort()
    bare_t.sort()
    us = 1e6
    return {
        "call_p50_us": round(percentile(call_t, 0.5) * us, 1),
        "call_p99_us": round(percentile(call_t, 0.99) * us, 1),
        "transport_rtt_p50_us": round(percentile(bare_t, 0.5) * us, 1),
        "transport_rtt_p99_us": round(percentile(bare_t, 0.99) * us, 1),
        "call_overhead_p50_us": round((percentile(call_t, 0.5) - percentile(bare_t, 0.5)) * us, 1),
        "call_overhead_p99_us": round(
            (percentile(call_t, 0.99) - percentile(bare_t, 0.99)) * us, 1
        ),
        "calls_timed": calls,
        "call_preset": preset,
        # CPU contention meanwhile, ours and the host's (bench/_host.py).
        "host_cpu_pressure_pct": pressure.percent,
    }


def run(*, quick: bool = False, calls: int = 3_000, preset: str = "local") -> dict[str, Any]:
    """Every key; ``preset`` is the two nodes' timing preset in the call-overhead run
    (``local``, the default here, or ``lan``/``wan``; ValueError for another name)."""
    from agentcluster.cli.cluster import run_loop
    from agentcluster.membership.config import preset as timing_preset

    timing_preset(preset)  # refuse an unknown name before minutes of work
    result: dict[str, Any] = {"bench": "lb"}
    result.update(_cores(quick))
    result.update(run_loop(_call_overhead(calls, preset)))
    return result
