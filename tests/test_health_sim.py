"""The HealthMonitor on simulated clusters (virtual time): quarantine is decided by the
monitors together -- one degraded observer cannot evict a healthy node, a majority can -- a
quarantined node stays a member but gets no calls, and recovery checks release it."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from agentcluster.agents import Action, ActionContext, Agent
from agentcluster.cluster import Cluster
from agentcluster.errors import CallRemoteError
from agentcluster.examples.worker import Echo
from agentcluster.health.directives import QUARANTINE_TOPIC
from agentcluster.signals import Signal
from agentcluster.testing.simcluster import SimCluster
from agentcluster.transport.memory import LinkConfig

SLOW = LinkConfig(delay=0.05)  # 100 ms round trips: a degraded path on a LAN
FAST = LinkConfig()


def _slow_links(c: SimCluster, observers: list[str], target: str, link: LinkConfig) -> None:
    for o in observers:
        c.set_link(o, target, link)
        c.set_link(target, o, link)


def _quarantined(c: SimCluster, node: str, names: list[str]) -> bool:
    return all(c.nodes[n].health.book.is_quarantined(node) for n in names)


def _view(c: SimCluster, observer: str, node: str) -> str:
    state = c.nodes[observer].runtime.lookup("health_monitor").agent.state
    peer = state.peers.get(node)
    return "unknown" if peer is None else str(peer.status)


@pytest.mark.virtual_time
async def test_one_degraded_observer_cannot_evict_a_healthy_node() -> None:
    async with SimCluster(5, seed=51, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        await c.run_for(3)  # every monitor has checked every peer
        _slow_links(c, ["n1"], "n3", SLOW)
        await c.wait_until(lambda: _view(c, "n1", "n3") == "degraded", timeout=30)
        await c.wait_until(
            lambda: c.nodes["n1"].runtime.lookup("health_monitor").agent.state.proposals >= 1,
            timeout=30,
        )
        await c.run_for(5)
        history = await Cluster.of(c.nodes["n2"]).consensus_history(topic=QUARANTINE_TOPIC)
        assert history and all(d.outcome.decision != "accepted" for d in history)
        # The others saw n3 healthy and said so.
        assert any(v == "no" for d in history for v in d.votes.values())
        assert not any(c.nodes[n].health.book.is_quarantined("n3") for n in c.names)
        assert all(c.view(n)["n3"] == "alive" for n in c.names if n != "n3")


@pytest.mark.virtual_time
async def test_a_majority_quarantines_then_recovery_releases() -> None:
    async with SimCluster(5, seed=52, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        for n in ("n2", "n3"):
            await c.nodes[n].runtime.spawn(Echo)
            await Cluster.of(c.nodes[n]).register("echo", capabilities=["echo"])
        await c.run_for(3)
        others = [n for n in c.names if n != "n3"]
        _slow_links(c, others, "n3", SLOW)
        await c.wait_until(lambda: _quarantined(c, "n3", others), timeout=60)
        # Still a member everywhere, but out of rotation: calls all go to n2.
        assert all(c.view(n)["n3"] == "alive" for n in others)
        cluster = Cluster.of(c.nodes["n1"])
        await c.wait_until(lambda: "n3" in c.nodes["n1"].balancer.quarantined, timeout=10)
        before = c.nodes["n3"].runtime.lookup("echo").agent.state.served
        for i in range(30):
            await cluster.call("echo", "app.echo", {"i": i}, timeout=2.0)
        assert c.nodes["n3"].runtime.lookup("echo").agent.state.served == before
        history = await cluster.consensus_history(topic=QUARANTINE_TOPIC)
        assert any(d.outcome.decision == "accepted" for d in history)
        # The path heals; after its minimum time the recovery checks pass and release it.
        _slow_links(c, others, "n3", FAST)
        await c.wait_until(
            lambda: not any(c.nodes[n].health.book.is_quarantined("n3") for n in others),
            timeout=600,
        )
        await c.wait_until(lambda: "n3" not in c.nodes["n1"].balancer.quarantined, timeout=10)
        assert not c.nodes["n3"].health.book.is_quarantined("n3")  # never held by itself
        entries = c.nodes["n1"].health.book.history()
        assert entries and entries[-1].node == "n3" and entries[-1].released_at is not None


class _Hang(Action[msgspec.Struct]):
    name = "hang"

    async def run(self, params: msgspec.Struct, ctx: ActionContext) -> None:
        await asyncio.Event().wait()  # stuck for good: only a restart frees the agent


class Stuck(Agent):
    name = "stuck"
    actions = (_Hang,)
    routes = (("app.hang", "hang"),)


@pytest.mark.virtual_time
async def test_a_stuck_agent_is_restarted_by_recovery() -> None:
    async with SimCluster(2, seed=53) as c:
        await c.wait_until(c.converged, timeout=30)
        node = c.nodes["n1"]
        first = await node.runtime.spawn(Stuck)
        for _ in range(3):
            first.cast_nowait(Signal(type="app.hang"))
        # The deep check sees no progress with messages queued; recovery restarts the agent.
        await c.wait_until(lambda: node.runtime.get("stuck") not in (None, first), timeout=120)
        fresh = node.runtime.lookup("stuck")
        assert fresh.mailbox_depth == 0 and fresh.processed == 0
        outcomes = node.health.recovery.history()
        assert outcomes and outcomes[-1].ok and outcomes[-1].procedure == "restart_agent"


@pytest.mark.virtual_time
async def test_failing_calls_burn_the_error_budget_and_page() -> None:
    async with SimCluster(2, seed=54) as c:
        await c.wait_until(c.converged, timeout=30)
        server = c.nodes["n2"]
        await server.runtime.spawn(Echo)
        await Cluster.of(server).register("echo", capabilities=["echo"])
        await c.wait_until(
            lambda: bool(c.nodes["n1"].registry.index.find_capable("echo")), timeout=10
        )
        alerts = server.runtime.bus.subscribe("cluster.health.alert.*", queue_size=64)
        cluster = Cluster.of(c.nodes["n1"])
        for i in range(20):
            with pytest.raises(CallRemoteError):
                await cluster.call("echo", "app.echo", {"fail": f"boom {i}"})
        signal = await asyncio.wait_for(alerts.get(), timeout=5)
        assert signal.type == "cluster.health.alert.critical"
        assert signal.data["rule"] == "call_error_budget" and signal.data["node"] == "n2"


@pytest.mark.virtual_time
async def test_a_quarantine_proposal_that_fails_leaves_no_unretrieved_task_error() -> None:
    """The agent's proposal runs in the background; when it cannot be decided (the node
    stopping, no store) the failure is logged, never left as "Task exception was never
    retrieved" on the loop."""
    import gc

    from agentcluster.coordination.consensus_service import ConsensusError
    from agentcluster.health.directives import ProposeQuarantine

    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        async with SimCluster(3, seed=5, store_voters=3) as c:
            await c.wait_until(c.converged, timeout=30)
            node = c.nodes["n1"]

            async def undecided(*args: object, **kwargs: object) -> object:
                raise ConsensusError("node n1 stopped")

            node.consensus.decide = undecided  # type: ignore[method-assign]
            server = node.runtime.lookup("health_monitor")
            before = set(node.health._tasks)
            node.health._propose(server, ProposeQuarantine("n3", "unresponsive"))
            (proposal,) = node.health._tasks - before
            await c.wait_until(proposal.done, timeout=5)
            del proposal, before
            gc.collect()
        assert not [u for u in unretrieved if "never retrieved" in str(u.get("message"))]
    finally:
        loop.set_exception_handler(previous)
