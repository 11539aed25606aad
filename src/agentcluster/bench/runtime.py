"""``agentcluster bench runtime``: the agent runtime's hot paths.

Theory of operation: each figure is measured on its own, in this process, on the real asyncio
loop (uvloop when installed and asked for) — never with timed unit tests:

* ``router_matches_per_s``: 1,000 routes with mixed wildcards, a stream of ~1,000 types;
* ``bus_signals_per_s``: publish -> delivery, 10 subscribers, counting deliveries;
* ``agent_call_p50_us`` / ``agent_call_p99_us``: sequential ``call`` round trips to one agent;
* ``agents_started_per_s``: 10,000 supervised agents spawned until every task is idle-waiting;
* ``idle_agent_bytes``: RSS growth per idle agent over those 10,000 agents.
"""

from __future__ import annotations

import asyncio
import gc
import platform
import time
from typing import Any

import msgspec
import psutil

from agentcluster.agents import Action, ActionContext, Agent, Reply, Runtime
from agentcluster.signals import Signal
from agentcluster.signals.bus import bench_bus
from agentcluster.signals.router import bench_router

__all__ = ["run"]


class _EchoParams(msgspec.Struct):
    n: int = 0


class _Echo(Action[_EchoParams]):
    name = "echo"
    Params = _EchoParams

    def run(self, params: _EchoParams, ctx: ActionContext) -> Reply:
        return Reply(params.n)


class _EchoAgent(Agent):
    name = "bench_echo"
    actions = (_Echo,)
    routes = (("bench.echo", "echo"),)


class _Idle(Agent):
    name = "bench_idle"


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


async def _call_latency(n_calls: int) -> tuple[float, float]:
    async with Runtime("bench") as rt:
        server = await rt.spawn(_EchoAgent)
        signal = Signal(type="bench.echo", data={"n": 1})
        for _ in range(1000):  # warm up caches and the allocator
            await server.call(signal)
        samples: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(n_calls):
            t0 = clock()
            await server.call(signal)
            samples.append((clock() - t0) / 1000.0)
    samples.sort()
    return _percentile(samples, 0.50), _percentile(samples, 0.99)


async def _start_agents(n_agents: int) -> tuple[float, float]:
    gc.collect()
    proc = psutil.Process()
    async with Runtime("bench", mailbox_size=64) as rt:
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        servers = [await rt.spawn(_Idle, id=f"idle-{i}") for i in range(n_agents)]
        deadline = time.perf_counter() + 60.0
        while not all(s.idle for s in servers):
            if time.perf_counter() > deadline:
                raise RuntimeError("agents did not all start within 60 s")
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - t0
        gc.collect()
        rss1 = proc.memory_info().rss
        rate = n_agents / elapsed
        per_agent = max(0.0, (rss1 - rss0) / n_agents)
    return rate, per_agent


async def _main(quick: bool) -> dict[str, Any]:
    n_calls = 5_000 if quick else 50_000
    n_agents = 2_000 if quick else 10_000
    p50, p99 = await _call_latency(n_calls)
    started, per_agent = await _start_agents(n_agents)
    bus_rate = await bench_bus(n_signals=10_000 if quick else 50_000, n_subscribers=10)
    return {
        "bus_signals_per_s": round(bus_rate),
        "agent_call_p50_us": round(p50, 1),
        "agent_call_p99_us": round(p99, 1),
        "agents_started_per_s": round(started),
        "idle_agent_bytes": round(per_agent),
        "agents_measured": n_agents,
        "calls_measured": n_calls,
    }


def run(*, quick: bool = False, use_uvloop: bool = False) -> dict[str, Any]:
    """Run the runtime benchmark and return its figures."""
    router_rate = bench_router(n_routes=1000, n_matches=50_000 if quick else 300_000)
    if use_uvloop:
        import uvloop

        result = uvloop.run(_main(quick))
    else:
        result = asyncio.run(_main(quick))
    return {
        "bench": "runtime",
        "router_matches_per_s": round(router_rate),
        **result,
        "loop": "uvloop" if use_uvloop else "asyncio",
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {psutil.cpu_count()} cpu",
        "quick": quick,
    }
