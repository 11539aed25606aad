"""``cluster.call`` reads the load each node publishes about itself: the in-flight figure in
its membership metadata reaches the balancer's endpoints, so a node kept busy by *other*
clients is avoided by this one (virtual time)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import pytest

from agentcluster.balancing.limits import AdaptiveConcurrency, ConcurrencyConfig
from agentcluster.cluster import Cluster
from agentcluster.examples.worker import Echo
from agentcluster.node import Node
from agentcluster.testing.simcluster import SimCluster

_ROOMY = ConcurrencyConfig(initial_limit=100.0, min_limit=100.0, max_limit=100.0, probe_limit=100)


async def _host(c: SimCluster, node: str, agent: str, capability: str) -> None:
    await c.nodes[node].runtime.spawn(Echo, id=agent, mailbox_size=100)
    await Cluster.of(c.nodes[node]).register(agent, capabilities=[capability])


def _published(viewer: Node, node: str) -> float:
    member = viewer.core.member(node)
    return member.meta.capacity.get("in_flight", 0.0) if member is not None else 0.0


def _served(c: SimCluster, node: str) -> int:
    return int(c.nodes[node].runtime.lookup("echo").agent.state.served)


@pytest.mark.virtual_time
async def test_a_node_busy_with_another_clients_calls_is_avoided() -> None:
    async with SimCluster(4, seed=51) as c:
        await c.wait_until(c.converged, timeout=30)
        n1, n2, n3 = c.nodes["n1"], c.nodes["n2"], c.nodes["n3"]
        n2.calls.limiter = AdaptiveConcurrency(_ROOMY, rng=random.Random(1))
        for node in ("n2", "n4"):
            await _host(c, node, "echo", "echo")
        # Only n2 serves these; one agent each, so each works on one call with nothing
        # queued behind it (busy, not stuck: the health monitor leaves it alone).
        busy = [f"busy{k}" for k in range(12)]
        for agent in busy:
            await _host(c, "n2", agent, agent)

        def everywhere() -> bool:
            index = n1.registry.index, n3.registry.index
            return all(len(i.find_capable("echo")) == 2 for i in index) and all(
                len(n3.registry.index.find_capable(agent)) == 1 for agent in busy
            )

        await c.wait_until(everywhere, timeout=10)
        # n3, another client, keeps n2 busy; n1 has sent it nothing.
        slow = [
            asyncio.ensure_future(
                Cluster.of(n3).call(agent, "app.echo", {"sleep": 20.0}, timeout=30.0)
            )
            for agent in busy
        ]
        # n2 reports its load; n1 learns it through membership gossip.
        await c.wait_until(lambda: _published(n1, "n2") >= 10.0, timeout=30)
        n1.balancer.set_strategy("least_connections", now=c.clock.now())
        cluster = Cluster.of(n1)
        before = {node: _served(c, node) for node in ("n2", "n4")}
        for i in range(20):
            await cluster.call("echo", "app.echo", {"i": i}, timeout=2.0)
        got = Counter({node: _served(c, node) - before[node] for node in ("n2", "n4")})
        assert got == {"n2": 0, "n4": 20}, got
        view = {n["node"]: n for n in (await cluster.routes())["nodes"]}
        assert view["n2"]["in_flight"] >= 10.0 and view["n4"]["in_flight"] == 0.0
        assert view["n2"]["weight"] == view["n4"]["weight"]  # its load alone kept it out
        await asyncio.gather(*slow)


@pytest.mark.virtual_time
async def test_a_garbled_published_figure_reads_as_zero() -> None:
    async with SimCluster(3, seed=52) as c:
        await c.wait_until(c.converged, timeout=30)
        n1, n2 = c.nodes["n1"], c.nodes["n2"]
        await _host(c, "n2", "echo", "echo")
        await c.wait_until(lambda: len(n1.registry.index.find_capable("echo")) == 1, timeout=10)
        cluster = Cluster.of(n1)
        await cluster.call("echo", "app.echo", {}, timeout=2.0)
        member = n2.core.member("n2")
        assert member is not None
        for garbled in (math.nan, -7.0, math.inf):
            n2.update_meta(capacity={**member.meta.capacity, "in_flight": garbled})

            def seen(value: float = garbled) -> bool:
                got = _published(n1, "n2")
                return got == value or (math.isnan(value) and math.isnan(got))

            await c.wait_until(seen, timeout=30)
            # The call path takes the figure in (a membership change) and routes regardless.
            assert (await cluster.call("echo", "app.echo", {"x": 1}, timeout=2.0))["echo"]
            (entry,) = [n for n in (await cluster.routes())["nodes"] if n["node"] == "n2"]
            assert entry["in_flight"] == 0.0, garbled
            # Checked where the endpoint is built, not only where it is shown.
            assert n1.balancer._routes["echo"].known["n2"].in_flight == 0.0, garbled
            known = n1.balancer.snapshot(c.clock.now())["capabilities"]["echo"]["eligible"]
            assert known == ["n2"]
